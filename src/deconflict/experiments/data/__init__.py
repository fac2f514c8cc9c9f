"""Readers for the upstream dataset formats. Nothing is downloaded, ever: data comes from a
directory given explicitly or through the DECONFLICT_DATA environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import DataNotFoundError

ENVIRONMENT_VARIABLE = "DECONFLICT_DATA"


def data_directory(explicit: str | os.PathLike[str] | None, dataset: str,
                   required: tuple[str, ...]) -> Path:
    """The directory holding a dataset's files.

    Looks in ``explicit`` (or $DECONFLICT_DATA), and in its subfolder named ``dataset``; a
    directory qualifies when one of the ``required`` alternatives (file names) is in it.
    """
    root = explicit if explicit is not None else os.environ.get(ENVIRONMENT_VARIABLE)
    if root is None:
        raise DataNotFoundError(
            f"no data for {dataset}: pass a data directory or set {ENVIRONMENT_VARIABLE} "
            f"(expected one of {', '.join(required)})"
        )
    for candidate in (Path(root), Path(root) / dataset):
        if any((candidate / name).is_file() for name in required):
            return candidate
    raise DataNotFoundError(
        f"no {dataset} files in {root} or {Path(root) / dataset} (expected one of "
        f"{', '.join(required)})"
    )
