"""NYUv2 as the preprocessed NumPy arrays of the MTAN / CAGrad / Nash-MTL experiments.

Layout (Liu, Johns & Davison, CVPR 2019, whose files the later papers reuse)::

    <root>/train/image/0.npy, 1.npy, ...   RGB image, float, H x W x 3
    <root>/train/label/<index>.npy         semantic class per pixel, H x W, 0..12, -1 = ignore
    <root>/train/depth/<index>.npy         depth, H x W x 1, 0 = no measurement
    <root>/train/normal/<index>.npy        surface normal, H x W x 3, all zeros = no measurement
    <root>/val/...                         the same four folders

The public files hold 795 training and 654 validation images of 288 x 384 pixels and store the
channels last (the reference loaders move the last axis to the front); channels-first arrays
(3 x H x W, 1 x H x W) and 2-D depth maps are accepted too. Labels may be stored as floats (the
public files do) as long as every value is an integer in -1..12.

``root`` is the directory given (or $DECONFLICT_DATA), or its ``nyuv2`` subfolder. Anything
malformed - a missing folder, image / label / depth / normal folders that do not hold the same
indices, an array of the wrong shape or dtype, a non-integer or out-of-range label, a non-finite
value, an unreadable file - raises DataFormatError naming the file.

Everything is read into memory: about 3.3 MB per sample (4.8 GB for both splits at full size),
so ``limit`` takes the first samples (by index) for quick runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import DataFormatError
from . import data_directory

SPLITS = ("train", "val")
FOLDERS = ("image", "label", "depth", "normal")
CLASSES = 13
IGNORE_INDEX = -1
_CHANNELS = {"image": 3, "depth": 1, "normal": 3}


@dataclass(frozen=True)
class NYUv2Split:
    """One split as tensors: images N x 3 x H x W (float32), labels N x H x W (int64, -1 =
    ignore), depth N x 1 x H x W and normals N x 3 x H x W (float32)."""

    images: Tensor
    labels: Tensor
    depth: Tensor
    normals: Tensor
    directory: Path

    def __len__(self) -> int:
        return self.images.shape[0]


def _indices(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: folder missing (NYUv2 needs "
                              f"{', '.join(FOLDERS)} in each split)")
    found: dict[int, Path] = {}
    for path in folder.glob("*.npy"):
        try:
            found[int(path.stem)] = path
        except ValueError:
            raise DataFormatError(f"{path}: NYUv2 files must be named <index>.npy") from None
    return found


def _read(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise DataFormatError(f"{path}: not a readable .npy array ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise DataFormatError(f"{path}: expected a numeric array, got dtype "
                              f"{getattr(array, 'dtype', type(array).__name__)}")
    return array


def _channels_first(array: np.ndarray, kind: str, path: Path) -> np.ndarray:
    """The array as C x H x W, from H x W x C (public files), C x H x W or, for depth, H x W."""
    channels = _CHANNELS[kind]
    if kind == "depth" and array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        # The public files are channels-last, so that reading wins when both would fit.
        if array.shape[-1] == channels:
            return np.moveaxis(array, -1, 0)
        if array.shape[0] == channels:
            return array
    expected = f"H x W x {channels} or {channels} x H x W"
    if kind == "depth":
        expected += " or H x W"
    raise DataFormatError(f"{path}: {kind} array has shape {array.shape}, expected {expected}")


def _check_finite(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataFormatError(f"{path}: holds NaN or infinite values")


def _check_labels(array: np.ndarray, path: Path) -> None:
    _check_finite(array, path)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DataFormatError(f"{path}: labels must be integer class ids")
    bad = (array < IGNORE_INDEX) | (array >= CLASSES)
    if bad.any():
        raise DataFormatError(f"{path}: label {array[bad].flat[0]:g} is outside 0..{CLASSES - 1} "
                              f"(and {IGNORE_INDEX} for unlabelled pixels)")


def load_nyuv2(directory: str | os.PathLike[str] | None = None, split: str = "train",
               limit: int | None = None) -> NYUv2Split:
    """One split (``"train"`` or ``"val"``) of the preprocessed NYUv2 arrays.

    Args:
        directory: the root holding ``train/`` and ``val/`` (or its parent, with a ``nyuv2``
            subfolder); None reads $DECONFLICT_DATA.
        split: ``"train"`` or ``"val"``.
        limit: keep only the first ``limit`` samples (in index order).

    Raises:
        DataNotFoundError: no ``<split>/image/0.npy`` under the directory.
        DataFormatError: malformed data (the message names the file).
    """
    if split not in SPLITS:
        raise ValueError(f"NYUv2 split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    root = data_directory(directory, "nyuv2", (f"{split}/image/0.npy",))
    base = root / split
    files = {kind: _indices(base / kind) for kind in FOLDERS}
    indices = sorted(files["image"])
    for kind in FOLDERS[1:]:
        if set(files[kind]) != set(indices):
            missing = sorted(set(indices) - set(files[kind]))
            extra = sorted(set(files[kind]) - set(indices))
            detail = (f"missing {base / kind / f'{missing[0]}.npy'}" if missing
                      else f"{files[kind][extra[0]]} has no image")
            raise DataFormatError(f"{base}: image/ holds {len(indices)} arrays but {kind}/ "
                                  f"holds {len(files[kind])} ({detail})")
    if limit is not None:
        indices = indices[:limit]

    arrays: dict[str, np.ndarray] = {}
    size: tuple[int, int] | None = None
    for position, index in enumerate(indices):
        for kind in FOLDERS:
            path = files[kind][index]
            array = _read(path)
            if kind == "label":
                if array.ndim != 2:
                    raise DataFormatError(f"{path}: label array has shape {array.shape}, "
                                          "expected H x W")
                _check_labels(array, path)
            else:
                array = _channels_first(array, kind, path)
                _check_finite(array, path)
            if size is None:
                size = array.shape[-2:]
            elif array.shape[-2:] != size:
                raise DataFormatError(f"{path}: {kind} is {array.shape[-2]} x {array.shape[-1]} "
                                      f"pixels, but {files['image'][indices[0]]} is "
                                      f"{size[0]} x {size[1]}")
            if kind not in arrays:
                # Filled in place: stacking a list would hold the split in memory twice.
                arrays[kind] = np.empty((len(indices), *array.shape),
                                        dtype=np.int64 if kind == "label" else np.float32)
            arrays[kind][position] = array
    return NYUv2Split(torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"]),
                      torch.from_numpy(arrays["depth"]), torch.from_numpy(arrays["normal"]),
                      base)
