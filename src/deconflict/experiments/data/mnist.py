"""MNIST in the original idx format (http://yann.lecun.com/exdb/mnist/), gzipped or not.

An idx file is a big-endian header - two zero bytes, a type byte (0x08: unsigned bytes), the
number of dimensions, then each dimension as a 32-bit integer - followed by the data. Images are
``*-images-idx3-ubyte`` (N x 28 x 28), labels ``*-labels-idx1-ubyte`` (N). Anything else (a bad
magic number, a truncated file, labels and images of different counts) raises DataFormatError
naming the file.

Available here: the 10,000 test images and labels (and the training labels, useless without the
training images); ``load_mnist`` then splits the test set deterministically and says so.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataFormatError
from . import data_directory

_UNSIGNED_BYTE = 0x08
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLIT_SEED = 0


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an idx file (uint8)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataFormatError(f"{path}: cannot be read to the end ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(f"{path}: not an idx file (bad magic number)")
    if data[2] != _UNSIGNED_BYTE:
        raise DataFormatError(f"{path}: unsupported idx data type 0x{data[2]:02x} "
                              "(only unsigned bytes, 0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataFormatError(f"{path}: header says shape {shape} ({expected:,} bytes of data) "
                              f"but the file holds {len(data) - header:,}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array in idx format (gzipped if the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UNSIGNED_BYTE, array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


def _find(root: Path, stem: str) -> Path | None:
    return next((root / name for name in (f"{stem}.gz", stem) if (root / name).is_file()), None)


@dataclass(frozen=True)
class MnistData:
    """Images as float32 in [0, 1] (N x 28 x 28) and labels (N,), per split."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    note: str


def _pair(root: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray] | None:
    image_path, label_path = _find(root, FILES[images]), _find(root, FILES[labels])
    if image_path is None or label_path is None:
        return None
    x, y = read_idx(image_path), read_idx(label_path)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataFormatError(f"{image_path} holds images of shape {x.shape} but {label_path} "
                              f"holds labels of shape {y.shape}")
    if y.max() > 9:
        raise DataFormatError(f"{label_path}: labels must be digits 0-9, found {int(y.max())}")
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


def load_mnist(directory: str | os.PathLike[str] | None = None,
               validation_fraction: float = 0.1) -> MnistData:
    """The MNIST splits from ``directory`` (or $DECONFLICT_DATA).

    With the training images, validation is the last ``validation_fraction`` of the training
    set; with the test set only, the 10,000 test images are split deterministically (fixed
    permutation) into 80% train, 10% validation and 10% test.
    """
    root = data_directory(directory, "mnist", tuple(f"{FILES['test_images']}{s}"
                                                    for s in (".gz", "")))
    test = _pair(root, "test_images", "test_labels")
    if test is None:
        raise DataFormatError(f"{root}: the MNIST test images and labels are missing")
    train = _pair(root, "train_images", "train_labels")
    if train is not None:
        cut = int(len(train[1]) * (1 - validation_fraction))
        return MnistData((train[0][:cut], train[1][:cut]), (train[0][cut:], train[1][cut:]),
                         test, f"MNIST from {root}: standard training and test sets")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(test[1]))
    a, b = int(0.8 * len(order)), int(0.9 * len(order))

    def take(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return test[0][index], test[1][index]

    note = (f"MNIST training images not found in {root}: the {len(order):,} test images were "
            f"split deterministically (fixed permutation) into train ({a:,}), validation "
            f"({b - a:,}) and test ({len(order) - b:,}); not comparable to the papers' split")
    return MnistData(take(order[:a]), take(order[a:b]), take(order[b:]), note)
