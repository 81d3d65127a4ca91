"""Built-in and bring-your-own image datasets, all offline.

Every loader returns an :class:`ImageData`: ``float64`` images of shape ``(N, C, H, W)`` in
*pixel space* (values in ``[0, 1]``), ``int64`` labels of shape ``(N,)``, the number of
classes and a name. Nothing here downloads anything: data either ships with the package
(:func:`builtin_images`, :func:`rgb_patches` from scikit-image's bundled photographs), is
generated (:func:`synthetic_images`), or is read from files the user already has
(:func:`load_idx`, :func:`load_fashion_mnist`, :func:`load_cifar10`, :func:`load_npz`).

Models are often trained on normalised inputs (``(x - mean) / std`` per channel, see
:class:`Normalization`); reconstructions should be mapped back with
:meth:`Normalization.invert` and compared with the truth in pixel space.

Examples
--------
>>> data = synthetic_images(8, shape=(1, 6, 6), num_classes=3)
>>> tuple(data.images.shape), data.images.dtype, int(data.labels.max()) < 3
((8, 1, 6, 6), torch.float64, True)
>>> images, labels = sample_batch(data, 4, seed=1)
>>> tuple(images.shape), tuple(labels.shape)
((4, 1, 6, 6), (4,))
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "FASHION_MNIST_DIRS",
    "RGB_PATCH_SOURCES",
    "ImageData",
    "Normalization",
    "builtin_images",
    "load_cifar10",
    "load_fashion_mnist",
    "load_idx",
    "load_npz",
    "rgb_patches",
    "sample_batch",
    "synthetic_images",
]

#: Where :func:`load_fashion_mnist` looks when neither ``root`` nor ``SPEAR_DATA_DIR`` is
#: given. Debian's ``dataset-fashion-mnist`` package installs the IDX files here.
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

#: scikit-image sample photographs that ship inside the scikit-image wheel (no network, no
#: ``pooch``) and are used by :func:`rgb_patches`; a patch's label is the index here.
RGB_PATCH_SOURCES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "motorcycle",
)

_BUILTIN_FILE = "fashion_mnist_test_1000.npz"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
# IDX type byte -> (numpy dtype, big-endian), from the MNIST file-format description.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
# Patches whose pixel standard deviation is below this (in [0, 1] units) are flat (sky, a
# black background) and are skipped by rgb_patches: they are nearly collinear with each other.
_MIN_PATCH_STD = 0.03


# --------------------------------------------------------------------------------------
# the common record


@dataclass(frozen=True)
class ImageData:
    """A labelled image dataset in pixel space.

    Attributes
    ----------
    images:
        ``(N, C, H, W)`` ``float64`` tensor, pixel intensities in ``[0, 1]``.
    labels:
        ``(N,)`` ``int64`` tensor of class indices in ``[0, num_classes)``.
    num_classes:
        Number of classes of the task the labels come from (not just those present).
    name:
        Short human-readable name, used in reports (``"fashion-mnist-builtin"``, ...).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(
                f"ImageData.images must have shape (N, C, H, W); found shape "
                f"{tuple(self.images.shape)}. Add a channel axis with images.unsqueeze(1)."
            )
        if self.images.dtype != torch.float64:
            raise ValueError(
                f"ImageData.images must be float64 in [0, 1]; found {self.images.dtype}. "
                "Convert with images.double() (and divide uint8 data by 255)."
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"ImageData.labels must be int64 of shape ({self.images.shape[0]},); found "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}."
            )
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes
        ):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}); found range "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def subset(self, n: int | None) -> ImageData:
        """The first ``n`` examples (all of them when ``n`` is None)."""
        if n is None:
            return self
        _check_count(n, len(self), self.name)
        return ImageData(self.images[:n], self.labels[:n], self.num_classes, self.name)


def _check_count(n: int, available: int, name: str) -> None:
    if n < 0 or n > available:
        raise ValueError(
            f"asked for n={n} examples of {name!r}, which has {available}; "
            f"pass 0 <= n <= {available} (or n=None for all)."
        )


def _to_image_data(
    images: NDArray[Any],
    labels: NDArray[Any] | None,
    name: str,
    num_classes: int | None = None,
) -> ImageData:
    """Wrap ``(N, C, H, W)`` pixel arrays (uint8 or float in [0, 1]) and labels."""
    if images.dtype == np.uint8:
        pixels = images.astype(np.float64) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        pixels = images.astype(np.float64)
        if pixels.size and (
            not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0
        ):
            raise ValueError(
                f"{name}: float images must be finite and in [0, 1]; found range "
                f"[{np.nanmin(pixels):.4g}, {np.nanmax(pixels):.4g}]. Rescale them (e.g. "
                "divide 0..255 data by 255) before loading."
            )
    else:
        raise ValueError(
            f"{name}: images must be uint8 (0..255) or floating point in [0, 1]; found "
            f"dtype {images.dtype}. Convert them before loading."
        )
    count = images.shape[0]
    if labels is None:
        label_array = np.zeros(count, dtype=np.int64)
    else:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels must be integers; found dtype {labels.dtype}.")
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if label_array.shape != (count,):
            raise ValueError(
                f"{name}: found {label_array.shape[0]} labels for {count} images; the two "
                "files (or arrays) must describe the same examples."
            )
        if label_array.size and label_array.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0; found {label_array.min()}.")
    if num_classes is None:
        num_classes = int(label_array.max()) + 1 if label_array.size else 1
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(pixels)),
        labels=torch.from_numpy(label_array),
        num_classes=num_classes,
        name=name,
    )


# --------------------------------------------------------------------------------------
# shipped and generated data


def builtin_images(n: int | None = None) -> ImageData:
    """The 1000 real Fashion-MNIST test images shipped inside the package.

    Parameters
    ----------
    n:
        Return only the first ``n`` (``0 <= n <= 1000``); all of them when None.

    Returns
    -------
    ImageData
        ``images`` ``(n, 1, 28, 28)`` float64 in ``[0, 1]``, ``labels`` ``(n,)`` in
        ``0..9``, ``num_classes=10``, ``name="fashion-mnist-builtin"``.

    Examples
    --------
    >>> data = builtin_images(3)
    >>> tuple(data.images.shape), data.labels.tolist()
    ((3, 1, 28, 28), [9, 2, 1])
    """
    resource = resources.files("spear").joinpath("_data").joinpath(_BUILTIN_FILE)
    with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        images = np.asarray(archive["images"])
        labels = np.asarray(archive["labels"])
    data = _to_image_data(images[:, None], labels, "fashion-mnist-builtin", num_classes=10)
    return data.subset(n)


def synthetic_images(
    n: int,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> ImageData:
    """Deterministic smooth random images in ``(0, 1)``, correlated like real ones.

    Each image is a logistic squashing of a sum of smooth (Gaussian-filtered) random fields:
    one shared by all images (the "mean image"), one per class and one per example, so the
    images are strongly correlated but distinct, as natural images are. Labels are
    ``i % num_classes`` shuffled with the seed.

    Parameters
    ----------
    n:
        Number of images (``>= 0``).
    shape:
        ``(C, H, W)`` of one image.
    num_classes:
        Number of classes (``>= 1``).
    seed:
        Seed of the generator; the same arguments always give the same images.

    Returns
    -------
    ImageData
        ``(n, C, H, W)`` float64 images strictly inside ``(0, 1)``, name ``"synthetic"``.
    """
    from scipy.ndimage import gaussian_filter

    if n < 0 or num_classes < 1 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"synthetic_images needs n >= 0, num_classes >= 1 and shape=(C, H, W) with "
            f"positive sizes; found n={n}, num_classes={num_classes}, shape={shape}."
        )
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    sigma = max(1.0, min(height, width) / 8.0)

    def smooth(count: int) -> NDArray[np.float64]:
        noise = rng.standard_normal((count, channels, height, width))
        fields = gaussian_filter(noise, sigma=(0.0, 0.0, sigma, sigma), mode="reflect")
        spread = fields.reshape(count, -1).std(axis=1).reshape(count, 1, 1, 1)
        result: NDArray[np.float64] = fields / np.maximum(spread, 1e-12)
        return result

    shared = smooth(1)
    per_class = smooth(num_classes)
    labels = rng.permutation(np.arange(n) % num_classes)
    individual = smooth(n)
    logits = 1.2 * shared + 0.8 * per_class[labels] + 0.8 * individual
    images = 1.0 / (1.0 + np.exp(-logits))
    return _to_image_data(images, labels, "synthetic", num_classes=num_classes)


def _sample_photo(name: str) -> NDArray[np.uint8]:
    from skimage import data as skdata

    loaders: dict[str, Callable[[], Any]] = {
        "astronaut": skdata.astronaut,
        "chelsea": skdata.chelsea,
        "coffee": skdata.coffee,
        "rocket": skdata.rocket,
        "immunohistochemistry": skdata.immunohistochemistry,
        "hubble_deep_field": skdata.hubble_deep_field,
        "retina": skdata.retina,
        "motorcycle": lambda: skdata.stereo_motorcycle()[0],  # type: ignore[no-untyped-call]
    }
    photo = np.asarray(loaders[name]())
    return np.ascontiguousarray(photo[..., :3], dtype=np.uint8)


@lru_cache(maxsize=4)
def _photo_pyramid(size: int) -> tuple[tuple[NDArray[np.float64], ...], ...]:
    """For each source photo, block-mean downscalings by 2, 4 and 8 (HWC, [0, 1])."""
    from skimage.transform import downscale_local_mean

    pyramids = []
    for name in RGB_PATCH_SOURCES:
        photo = _sample_photo(name).astype(np.float64) / 255.0
        levels = []
        for factor in (2, 4, 8):
            height = photo.shape[0] // factor * factor
            width = photo.shape[1] // factor * factor
            level = downscale_local_mean(  # type: ignore[no-untyped-call]
                photo[:height, :width], (factor, factor, 1)
            )
            if min(level.shape[:2]) >= size:
                levels.append(np.asarray(level, dtype=np.float64))
        pyramids.append(tuple(levels))
    return tuple(pyramids)


def rgb_patches(n: int, size: int = 32, seed: int = 0) -> ImageData:
    """Real ``size x size`` RGB photo patches from scikit-image's bundled sample images.

    The photos in :data:`RGB_PATCH_SOURCES` ship with scikit-image (nothing is fetched).
    Each is block-averaged by 2, 4 and 8; patch ``i`` comes from photo
    ``i % len(RGB_PATCH_SOURCES)`` (so classes are balanced), at a random scale and
    position. Flat patches (pixel std below 0.03) and repeats are skipped, so the patches
    are distinct real textures: enough of them (e.g. ``n = 3072 = 3*32*32``) to fill the
    input space of a CIFAR-sized layer.

    Parameters
    ----------
    n:
        Number of patches (``>= 0``).
    size:
        Side of a patch in pixels (``8 <= size <= 64``).
    seed:
        Seed for scales and positions; the same arguments always give the same patches.

    Returns
    -------
    ImageData
        ``(n, 3, size, size)`` float64 in ``[0, 1]``; label = index of the source photo in
        :data:`RGB_PATCH_SOURCES`; ``name="rgb-patches"``.
    """
    if n < 0 or not 8 <= size <= 64:
        raise ValueError(f"rgb_patches needs n >= 0 and 8 <= size <= 64; found n={n}, size={size}.")
    pyramids = _photo_pyramid(size)
    rng = np.random.default_rng(seed)
    patches = np.empty((n, size, size, 3), dtype=np.float64)
    labels = np.arange(n, dtype=np.int64) % len(RGB_PATCH_SOURCES)
    seen: set[tuple[int, int, int, int]] = set()
    for index, source in enumerate(labels):
        levels = pyramids[int(source)]
        for _attempt in range(10_000):
            level = int(rng.integers(len(levels)))
            height, width = levels[level].shape[:2]
            top = int(rng.integers(height - size + 1))
            left = int(rng.integers(width - size + 1))
            key = (int(source), level, top, left)
            patch = levels[level][top : top + size, left : left + size]
            if key not in seen and patch.std() >= _MIN_PATCH_STD:
                seen.add(key)
                patches[index] = patch
                break
        else:  # pragma: no cover - the photos have far more textured positions than this
            raise RuntimeError(
                f"could not find a new textured patch in {RGB_PATCH_SOURCES[source]!r}; "
                f"ask for fewer than n={n} patches."
            )
    images = np.clip(patches.transpose(0, 3, 1, 2), 0.0, 1.0)
    return _to_image_data(images, labels, "rgb-patches", num_classes=len(RGB_PATCH_SOURCES))


# --------------------------------------------------------------------------------------
# bring-your-own files


def _read_maybe_gzip(path: Path) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(2)
    if head == _GZIP_MAGIC:
        with gzip.open(path, "rb") as compressed:
            return compressed.read()
    return path.read_bytes()


def _parse_idx(path: Path) -> NDArray[Any]:
    """Parse one IDX file (MNIST format), gzip-compressed or raw."""
    try:
        raw = _read_maybe_gzip(path)
    except (OSError, EOFError) as error:
        raise ValueError(f"could not read IDX file {path}: {error}") from error
    if len(raw) < 4:
        raise ValueError(
            f"{path} is not an IDX file: it has {len(raw)} bytes, fewer than the 4-byte "
            "magic number."
        )
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} is not an IDX file: expected the magic number 0x0000 <type> <ndim> with "
            f"type in {{{', '.join(hex(c) for c in _IDX_DTYPES)}}} and ndim >= 1; found "
            f"{raw[:4].hex()}. Pass the *-idx3-ubyte / *-idx1-ubyte files (optionally .gz)."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} < {header_size} bytes).")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        raise ValueError(
            f"{path}: the header announces shape {dims} of {dtype.newbyteorder('=')} "
            f"({expected} data bytes) but the file has {found}; it is truncated or corrupt."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def load_idx(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str] | None = None,
    *,
    n: int | None = None,
) -> ImageData:
    """Read MNIST-format IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte``).

    Parameters
    ----------
    images_path:
        IDX file of shape ``(N, H, W)``, type uint8 (scaled by 1/255) or float in [0, 1].
        Gzip compression is detected from the content, not the name.
    labels_path:
        IDX file of shape ``(N,)`` with integer labels. When None, every label is 0 and
        ``num_classes`` is 1.
    n:
        Keep only the first ``n`` examples.

    Returns
    -------
    ImageData
        ``(N, 1, H, W)`` float64 images in ``[0, 1]``; ``num_classes = max(label) + 1``;
        ``name`` is the images file's name.

    Raises
    ------
    ValueError
        When a file is not IDX, is truncated, or the two files disagree.
    """
    images_file = Path(images_path)
    images = _parse_idx(images_file)
    if images.ndim != 3:
        raise ValueError(
            f"{images_file}: expected an images IDX file of shape (N, H, W); found shape "
            f"{images.shape}. Did you swap the images and labels files?"
        )
    labels = None
    if labels_path is not None:
        labels = _parse_idx(Path(labels_path))
        if labels.ndim != 1:
            raise ValueError(
                f"{labels_path}: expected a labels IDX file of shape (N,); found shape "
                f"{labels.shape}."
            )
    name = images_file.name.removesuffix(".gz")
    return _to_image_data(images[:, None], labels, name).subset(n)


def _candidate_dirs(base: Path) -> list[Path]:
    return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    n: int | None = None,
) -> ImageData:
    """Fashion-MNIST from IDX files already on this machine.

    Looks for ``train-images-idx3-ubyte[.gz]`` / ``t10k-...`` (and their labels) in, in
    order: ``root`` when given (and *only* there, so a wrong ``root`` is an error rather
    than a silent fallback); otherwise ``$SPEAR_DATA_DIR`` and then
    :data:`FASHION_MNIST_DIRS` (``/usr/share/datasets/fashion-mnist``, where Debian's
    ``dataset-fashion-mnist`` package puts them). In each directory the subfolders
    ``fashion-mnist/`` and ``FashionMNIST/raw/`` (torchvision's layout) are tried too.

    Parameters
    ----------
    split:
        ``"train"`` (60000 images) or ``"test"`` (10000 images).
    root:
        A directory holding the files.
    n:
        Keep only the first ``n`` examples (the train split is 376 MB as float64).

    Returns
    -------
    ImageData
        ``(N, 1, 28, 28)`` float64 in ``[0, 1]``, ten classes, name
        ``"fashion-mnist-<split>"``.

    Raises
    ------
    FileNotFoundError
        Listing every directory searched and how to get the data.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test'; found {split!r}.")
    images_stem, labels_stem = _FASHION_MNIST_FILES[split]
    if root is not None:
        bases = [Path(root)]
    else:
        bases = [Path(os.environ["SPEAR_DATA_DIR"])] if os.environ.get("SPEAR_DATA_DIR") else []
        bases.extend(FASHION_MNIST_DIRS)
    searched: list[Path] = []
    for base in bases:
        for directory in _candidate_dirs(base):
            searched.append(directory)
            images_file = _find_file(directory, images_stem)
            labels_file = _find_file(directory, labels_stem)
            if images_file is not None and labels_file is not None:
                data = load_idx(images_file, labels_file, n=n)
                return ImageData(data.images, data.labels, 10, f"fashion-mnist-{split}")
    places = "\n".join(f"  - {directory}" for directory in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({images_stem}[.gz], {labels_stem}[.gz]) not found. "
        f"Looked in:\n{places}\nTo get them: `apt-get install dataset-fashion-mnist` (Debian/"
        "Ubuntu, installs to /usr/share/datasets/fashion-mnist), or put the IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist in a folder and pass root= (or set "
        "SPEAR_DATA_DIR), or use spear.data.builtin_images() for the 1000 shipped images."
    )


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy arrays need when unpickled, under all their historical names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, lists, dicts and strings, and nothing else.

    Pickles can run arbitrary code through any global they name (``os.system``, ...). This
    one resolves only the few numpy functions that rebuild arrays and refuses every other
    global with :class:`pickle.UnpicklingError`.
    """

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': this file is not a plain CIFAR-10 "
                "python batch (only numpy arrays, lists and strings are allowed). Do not load "
                "pickles from sources you do not trust."
            ) from None


def _restricted_load(handle: BinaryIO) -> Any:
    return _NumpyOnlyUnpickler(handle, encoding="bytes").load()


def _cifar_field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(
        f"{path} has no {key!r} entry (found keys {sorted(map(str, batch))}); expected a "
        "CIFAR-10 python batch with 'data' (N, 3072) uint8 and 'labels'."
    )


def load_cifar10(root: str | os.PathLike[str], split: str = "train") -> ImageData:
    """CIFAR-10 from the *python* batches the user already has, loaded safely.

    The batches (``data_batch_1`` ... ``data_batch_5``, ``test_batch``) are pickles; they
    are read with a restricted unpickler that only rebuilds numpy arrays, so a tampered
    file raises :class:`pickle.UnpicklingError` instead of running code.

    Parameters
    ----------
    root:
        The ``cifar-10-batches-py`` directory, or a directory containing it.
    split:
        ``"train"`` (all five data batches, 50000 images) or ``"test"`` (10000 images).

    Returns
    -------
    ImageData
        ``(N, 3, 32, 32)`` float64 in ``[0, 1]`` (rows are stored R, G, B planes), ten
        classes, name ``"cifar10-<split>"``.
    """
    if split not in _CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test'; found {split!r}.")
    base = Path(root)
    directory = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    names = _CIFAR10_FILES[split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} batches {missing} not found in {directory}. Pass the extracted "
            "'cifar-10-batches-py' folder (or its parent) of the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html."
        )
    images, labels = [], []
    for name in names:
        path = directory / name
        with path.open("rb") as handle:
            batch = _restricted_load(handle)
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: expected a dict, found {type(batch).__name__}.")
        data = np.asarray(_cifar_field(batch, "data", path))
        batch_labels = np.asarray(_cifar_field(batch, "labels", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: expected 'data' uint8 of shape (N, 3072); found {data.dtype} of "
                f"shape {data.shape}."
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return _to_image_data(
        np.concatenate(images), np.concatenate(labels), f"cifar10-{split}", num_classes=10
    )


def _to_nchw(images: NDArray[Any], path: Path) -> NDArray[Any]:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[3] in (1, 3):
            channels_last: NDArray[Any] = images.transpose(0, 3, 1, 2)
            return channels_last
    raise ValueError(
        f"{path}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with C in "
        f"{{1, 3}}; found shape {images.shape}."
    )


def load_npz(
    path: str | os.PathLike[str],
    images_key: str = "images",
    labels_key: str | None = "labels",
) -> ImageData:
    """Images (and labels) from a ``.npz`` archive, without unpickling anything.

    Layout rule: 3-d arrays are ``(N, H, W)`` (one channel); a 4-d array is ``(N, C, H, W)``
    when axis 1 has size 1 or 3, else ``(N, H, W, C)`` when the last axis has size 1 or 3,
    else an error. Values: uint8 is divided by 255; floating point must already be in
    ``[0, 1]``; other dtypes are refused.

    Parameters
    ----------
    path:
        The ``.npz`` file (saved with ``numpy.savez``; object arrays are refused).
    images_key, labels_key:
        Names of the arrays. ``labels_key=None`` gives all-zero labels and one class.

    Returns
    -------
    ImageData
        ``(N, C, H, W)`` float64 in ``[0, 1]``; ``num_classes = max(label) + 1``; ``name``
        is the file's stem.
    """
    file = Path(path)
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = list(archive.keys())
            wanted = [images_key] + ([labels_key] if labels_key is not None else [])
            absent = [key for key in wanted if key not in keys]
            if absent:
                raise KeyError(
                    f"{file} has no array(s) {absent}; it holds {keys}. Pass images_key= / "
                    "labels_key= (labels_key=None when there are no labels)."
                )
            images = np.asarray(archive[images_key])
            labels = np.asarray(archive[labels_key]) if labels_key is not None else None
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise ValueError(
                f"{file} stores Python objects (a pickle), which spear refuses to load; "
                "save plain numeric arrays with numpy.savez."
            ) from error
        raise
    return _to_image_data(_to_nchw(images, file), labels, file.stem)


# --------------------------------------------------------------------------------------
# normalisation and batches


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x - mean) / std``.

    Models are often trained on normalised inputs; an attack then recovers normalised
    inputs, which :meth:`invert` maps back to pixel space before they are compared with the
    truth (metrics and figures work in pixel space, ``[0, 1]``).

    Attributes
    ----------
    mean, std:
        One value per channel (pixel units); ``std`` must be positive.

    Examples
    --------
    >>> norm = Normalization(mean=(0.5,), std=(0.25,))
    >>> x = torch.full((2, 1, 2, 2), 0.75, dtype=torch.float64)
    >>> norm.apply(x)[0, 0, 0, 0].item(), norm.invert(norm.apply(x)).equal(x)
    (1.0, True)
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"Normalization needs one mean and one std per channel; found "
                f"{len(self.mean)} means and {len(self.std)} stds."
            )
        if min(self.std) <= 0:
            raise ValueError(f"Normalization std must be positive; found {self.std}.")

    @classmethod
    def fit(cls, data: ImageData) -> Normalization:
        """Per-channel mean and standard deviation of a dataset's pixels."""
        pixels = data.images.transpose(0, 1).reshape(data.images.shape[1], -1)
        return cls(tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist()))

    def _broadcast(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim < 3 or images.shape[-3] != len(self.mean):
            raise ValueError(
                f"expected images of shape (..., {len(self.mean)}, H, W) for this "
                f"{len(self.mean)}-channel Normalization; found {tuple(images.shape)}."
            )
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return mean, std

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel space -> model input space: ``(images - mean) / std`` on axis ``-3``."""
        mean, std = self._broadcast(images)
        return (images - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Model input space -> pixel space: ``images * std + mean`` on axis ``-3``."""
        mean, std = self._broadcast(images)
        return images * std + mean


def sample_batch(
    data: ImageData,
    batch_size: int,
    seed: int = 0,
    *,
    distinct: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random batch of a dataset.

    Parameters
    ----------
    data:
        The dataset.
    batch_size:
        Number of examples ``b``.
    seed:
        The same seed always picks the same examples.
    distinct:
        When True (the default) the examples are different indices *and* different images
        (exact duplicate images in the dataset are skipped, since no attack can tell them
        apart). When False, indices are drawn with replacement, so a batch may repeat an
        example (useful to test how attacks handle duplicates) and ``b`` may exceed ``N``.

    Returns
    -------
    tuple of torch.Tensor
        ``images`` ``(b, C, H, W)`` float64 and ``labels`` ``(b,)`` int64.
    """
    count = len(data)
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0; found {batch_size}.")
    rng = np.random.default_rng(seed)
    if not distinct:
        if count == 0 and batch_size > 0:
            raise ValueError(f"cannot sample from the empty dataset {data.name!r}.")
        index = rng.integers(count, size=batch_size) if batch_size else np.zeros(0, np.int64)
        chosen = torch.from_numpy(index.astype(np.int64))
        return data.images[chosen], data.labels[chosen]
    if batch_size > count:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {count} examples of {data.name!r}; "
            "use a smaller batch, a bigger dataset, or distinct=False to allow repeats."
        )
    picked: list[int] = []
    seen: set[bytes] = set()
    flat = data.images.reshape(count, -1)
    for candidate in rng.permutation(count):
        if len(picked) == batch_size:
            break
        digest = hashlib.sha1(flat[int(candidate)].numpy().tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            picked.append(int(candidate))
    if len(picked) < batch_size:
        raise ValueError(
            f"{data.name!r} has only {len(picked)} distinct images, fewer than "
            f"batch_size={batch_size}; use a smaller batch or distinct=False."
        )
    chosen = torch.tensor(picked, dtype=torch.int64)
    return data.images[chosen], data.labels[chosen]
