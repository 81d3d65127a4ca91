"""Tests for spear.data: shipped, generated and bring-your-own datasets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from spear import data as sd
from spear.data import (
    ImageData,
    Normalization,
    builtin_images,
    load_cifar10,
    load_fashion_mnist,
    load_idx,
    load_npz,
    rgb_patches,
    sample_batch,
    synthetic_images,
)

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _write_idx(
    path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = False
) -> Path:
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


# ---------------------------------------------------------------- ImageData and builtin


def test_builtin_images_are_the_shipped_fashion_mnist() -> None:
    data = builtin_images()
    assert data.images.shape == (1000, 1, 28, 28)
    assert data.images.dtype == torch.float64
    assert data.labels.dtype == torch.int64
    assert data.num_classes == 10 and data.name == "fashion-mnist-builtin"
    assert float(data.images.min()) == 0.0 and float(data.images.max()) == 1.0
    assert set(data.labels.tolist()) == set(range(10))
    # exactly uint8 / 255
    assert torch.equal((data.images * 255).round() / 255, data.images)
    assert len(builtin_images(7)) == 7
    assert torch.equal(builtin_images(7).images, data.images[:7])


def test_builtin_images_rejects_bad_n() -> None:
    with pytest.raises(ValueError, match="has 1000"):
        builtin_images(1001)
    with pytest.raises(ValueError, match="n=-1"):
        builtin_images(-1)


def test_image_data_validates_its_fields() -> None:
    images = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageData(images[:, 0], torch.zeros(2, dtype=torch.int64), 1, "x")
    with pytest.raises(ValueError, match="float64"):
        ImageData(images.float(), torch.zeros(2, dtype=torch.int64), 1, "x")
    with pytest.raises(ValueError, match="int64 of shape"):
        ImageData(images, torch.zeros(3, dtype=torch.int64), 1, "x")
    with pytest.raises(ValueError, match="lie in"):
        ImageData(images, torch.tensor([0, 2]), 2, "x")


# ---------------------------------------------------------------- IDX and Fashion-MNIST


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    image_file = _write_idx(tmp_path / "x-images-idx3-ubyte", images, compress=compress)
    label_file = _write_idx(tmp_path / "x-labels-idx1-ubyte", labels, compress=compress)
    data = load_idx(image_file, label_file)
    assert data.images.shape == (5, 1, 4, 3)
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images / 255.0)
    assert data.labels.tolist() == [3, 1, 4, 1, 5]
    assert data.num_classes == 6
    unlabelled = load_idx(image_file, n=2)
    assert unlabelled.labels.tolist() == [0, 0] and unlabelled.num_classes == 1


def test_load_idx_float_images(tmp_path: Path) -> None:
    images = np.linspace(0, 1, 2 * 3 * 3).reshape(2, 3, 3).astype(np.float32)
    data = load_idx(_write_idx(tmp_path / "f", images, type_code=0x0D))
    np.testing.assert_allclose(data.images[:, 0].numpy(), images, rtol=1e-7)


def test_load_idx_errors_say_what_is_wrong(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="fewer than the 4-byte"):
        load_idx(short)
    truncated = _write_idx(tmp_path / "t", np.zeros((3, 4, 4), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_idx(truncated)
    labels = _write_idx(tmp_path / "l", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="swap"):
        load_idx(labels)
    images = _write_idx(tmp_path / "i", np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        load_idx(images, labels)
    signed = _write_idx(tmp_path / "s", np.zeros((2, 2, 2), np.int16), type_code=0x0B)
    with pytest.raises(ValueError, match="uint8"):
        load_idx(signed)


@pytest.mark.skipif(not SYSTEM_FASHION.is_file(), reason="dataset-fashion-mnist not installed")
def test_load_fashion_mnist_system_copy_matches_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPEAR_DATA_DIR", raising=False)
    data = load_fashion_mnist("test", n=1000)
    assert data.name == "fashion-mnist-test" and data.num_classes == 10
    builtin = builtin_images()
    assert torch.equal(data.images, builtin.images)
    assert torch.equal(data.labels, builtin.labels)


def test_load_fashion_mnist_uses_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    _write_idx(folder / "t10k-images-idx3-ubyte", images.astype(np.uint8), compress=True)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.array([7, 2], np.uint8))
    monkeypatch.setenv("SPEAR_DATA_DIR", str(tmp_path))
    data = load_fashion_mnist("test")
    assert data.labels.tolist() == [7, 2]
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images / 255.0)


def test_load_fashion_mnist_missing_lists_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEAR_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(sd, "FASHION_MNIST_DIRS", (tmp_path / "system",))
    with pytest.raises(FileNotFoundError) as caught:
        load_fashion_mnist("train")
    message = str(caught.value)
    assert str(tmp_path / "env") in message and str(tmp_path / "system") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "builtin_images()" in message and "root=" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "given")):
        load_fashion_mnist("test", root=tmp_path / "given")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("valid")


# ---------------------------------------------------------------- CIFAR-10 (safe pickles)


def _fake_cifar_batch(path: Path, count: int, seed: int, protocol: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    batch = {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=count)],
        b"data": pixels,
        b"filenames": [f"img_{i}.png".encode() for i in range(count)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return pixels


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_cifar10_reads_fake_batches(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    test_pixels = _fake_cifar_batch(folder / "test_batch", 3, seed=0, protocol=protocol)
    train = [_fake_cifar_batch(folder / f"data_batch_{i}", 2, seed=i) for i in range(1, 6)]
    test = load_cifar10(tmp_path, "test")  # the parent folder works too
    assert test.images.shape == (3, 3, 32, 32) and test.num_classes == 10
    # rows are R plane, G plane, B plane of 32x32 each
    np.testing.assert_array_equal(
        test.images[1, 0].numpy(), test_pixels[1, :1024].reshape(32, 32) / 255
    )
    np.testing.assert_array_equal(
        test.images[2, 2].numpy(), test_pixels[2, 2048:].reshape(32, 32) / 255
    )
    full = load_cifar10(folder, "train")
    assert full.images.shape == (10, 3, 32, 32) and full.name == "cifar10-train"
    np.testing.assert_array_equal(full.images[9].numpy().reshape(-1), train[4][1] / 255)


def test_load_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(
        pickle.UnpicklingError, match=r"refused to load global '(posix|nt)\.system'"
    ):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": eval}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        load_cifar10(tmp_path, "test")


def test_load_cifar10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}))
    with pytest.raises(ValueError, match="no 'data' entry"):
        load_cifar10(tmp_path, "test")


# ---------------------------------------------------------------- npz


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((4, 5, 6), (4, 1, 5, 6)),
        ((4, 3, 5, 6), (4, 3, 5, 6)),
        ((4, 5, 6, 3), (4, 3, 5, 6)),
        ((4, 5, 6, 1), (4, 1, 5, 6)),
    ],
)
def test_load_npz_layouts(
    tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(4))
    data = load_npz(tmp_path / "d.npz")
    assert tuple(data.images.shape) == expected and data.name == "d"
    if len(shape) == 4 and shape[-1] == 3:
        np.testing.assert_array_equal(data.images[2, 1].numpy(), images[2, :, :, 1] / 255)
    assert data.labels.tolist() == [0, 1, 2, 3] and data.num_classes == 4


def test_load_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(KeyError, match=r"holds \['x'\]"):
        load_npz(tmp_path / "a.npz")
    data = load_npz(tmp_path / "a.npz", images_key="x", labels_key=None)
    assert data.labels.tolist() == [0, 0]
    np.savez(tmp_path / "b.npz", images=np.full((2, 4, 4), 255.0), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="Rescale"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 4, 4, 5)), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="C in"):
        load_npz(tmp_path / "c.npz")
    objects = np.empty(2, dtype=object)
    np.savez(tmp_path / "o.npz", images=objects, labels=np.zeros(2, int))
    with pytest.raises(ValueError, match="refuses"):
        load_npz(tmp_path / "o.npz")


# ---------------------------------------------------------------- generated data


def test_rgb_patches_are_distinct_real_textures() -> None:
    data = rgb_patches(40, seed=3)
    assert data.images.shape == (40, 3, 32, 32) and data.name == "rgb-patches"
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert data.num_classes == len(sd.RGB_PATCH_SOURCES)
    assert data.labels.tolist() == [i % data.num_classes for i in range(40)]
    flat = data.images.reshape(40, -1)
    assert torch.linalg.matrix_rank(flat) == 40
    assert float(flat.std(dim=1).min()) >= 0.03 - 1e-12
    assert torch.equal(rgb_patches(40, seed=3).images, data.images)
    assert not torch.equal(rgb_patches(40, seed=4).images, data.images)
    assert rgb_patches(2, size=16).images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="size"):
        rgb_patches(2, size=4)


def test_synthetic_images_are_deterministic_smooth_and_correlated() -> None:
    data = synthetic_images(30, shape=(3, 12, 10), num_classes=4, seed=5)
    assert data.images.shape == (30, 3, 12, 10)
    assert float(data.images.min()) > 0.0 and float(data.images.max()) < 1.0
    assert data.num_classes == 4 and sorted(set(data.labels.tolist())) == [0, 1, 2, 3]
    assert torch.equal(synthetic_images(30, (3, 12, 10), 4, seed=5).images, data.images)
    assert not torch.equal(synthetic_images(30, (3, 12, 10), 4, seed=6).images, data.images)
    flat = data.images.reshape(30, -1)
    correlation = torch.corrcoef(flat)
    assert float(correlation[~torch.eye(30, dtype=torch.bool)].mean()) > 0.2
    assert torch.linalg.matrix_rank(flat) == 30
    # smooth: neighbouring pixels differ much less than random pixels do
    neighbour = (data.images[..., 1:] - data.images[..., :-1]).abs().mean()
    shuffled = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))]
    assert float(neighbour) < 0.5 * float((shuffled[:, 1:] - shuffled[:, :-1]).abs().mean())


# ---------------------------------------------------------------- normalisation, batches


def test_normalization_round_trip_per_channel() -> None:
    norm = Normalization(mean=(0.1, 0.5, 0.9), std=(0.5, 0.25, 2.0))
    images = rgb_patches(4).images
    normalised = norm.apply(images)
    expected = (images[:, 1] - 0.5) / 0.25
    torch.testing.assert_close(normalised[:, 1], expected)
    torch.testing.assert_close(norm.invert(normalised), images)
    with pytest.raises(ValueError, match="3-channel"):
        norm.apply(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        Normalization((0.0,), (0.0,))
    with pytest.raises(ValueError, match="one mean and one std"):
        Normalization((0.0, 1.0), (1.0,))
    fitted = Normalization.fit(synthetic_images(20, (2, 5, 5)))
    standard = fitted.apply(synthetic_images(20, (2, 5, 5)).images)
    torch.testing.assert_close(standard.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64))


def test_sample_batch_is_deterministic_and_distinct() -> None:
    data = builtin_images(100)
    images, labels = sample_batch(data, 10, seed=2)
    again, _ = sample_batch(data, 10, seed=2)
    other, _ = sample_batch(data, 10, seed=3)
    assert images.shape == (10, 1, 28, 28) and labels.shape == (10,)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert torch.unique(images.reshape(10, -1), dim=0).shape[0] == 10
    everything, _ = sample_batch(data, 100)
    assert torch.unique(everything.reshape(100, -1), dim=0).shape[0] == 100
    with pytest.raises(ValueError, match="larger than the 100"):
        sample_batch(data, 101)


def test_sample_batch_skips_duplicate_images_unless_asked() -> None:
    base = synthetic_images(3, shape=(1, 4, 4))
    images = torch.cat([base.images, base.images[:1], base.images[:1]])
    data = ImageData(images, torch.zeros(5, dtype=torch.int64), 1, "dups")
    picked, _ = sample_batch(data, 3, seed=0)
    assert torch.unique(picked.reshape(3, -1), dim=0).shape[0] == 3
    with pytest.raises(ValueError, match="only 3 distinct images"):
        sample_batch(data, 4)
    repeated, _ = sample_batch(data, 12, distinct=False)
    assert repeated.shape[0] == 12
