"""Images from a folder: one subfolder per class, as many tools lay datasets out.

::

    data/
      shirt/  0001.png 0002.png ...
      shoe/   0001.png ...

Classes are the subfolder names in sorted order (label 0 for the first). A folder with
images and no subfolders gives one class. PNG, JPEG, BMP and GIF files are read with
Pillow (never unpickled); greyscale images give one channel, others three (RGB). Every
image must have the same size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from spear.data import ImageData
from spear.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read(path: Path, grey: bool) -> NDArray[np.uint8]:
    """One image as ``(C, H, W)`` uint8."""
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if grey else "RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except OSError as error:
        raise InputError(f"{path} is not an image Pillow can read ({error}).") from error
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(path: str | os.PathLike[str]) -> ImageData:
    """Every image under ``path`` with its class (see the module docstring).

    Returns
    -------
    ImageData
        ``(N, C, H, W)`` float64 in ``[0, 1]``; ``num_classes`` is the number of class
        folders; ``name`` is the folder's name.

    Raises
    ------
    InputError
        No images, images of different sizes, or a file Pillow cannot read.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a folder.")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
    groups = [(label, _images_in(folder)) for label, folder in enumerate(classes)]
    if not classes:
        groups = [(0, _images_in(root))]
    files = [(label, file) for label, members in groups for file in members]
    if not files:
        raise InputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its subfolders; expected "
            "one subfolder of images per class."
        )
    with Image.open(files[0][1]) as first:
        grey = first.mode in _GREY_MODES
    arrays = [_read(file, grey) for _, file in files]
    shape = arrays[0].shape
    for (_, file), array in zip(files, arrays, strict=True):
        if array.shape != shape:
            raise InputError(
                f"{file} has size {array.shape[2]}x{array.shape[1]} but {files[0][1]} has "
                f"{shape[2]}x{shape[1]}; every image must have the same size (resize them)."
            )
    images = np.stack(arrays).astype(np.float64) / 255.0
    labels = np.array([label for label, _ in files], dtype=np.int64)
    return ImageData(
        torch.from_numpy(images), torch.from_numpy(labels), max(1, len(classes)), root.name
    )
