"""Atomic writes: a results file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _atomic(path: str | os.PathLike[str], write: Callable[[str], None], suffix: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text to ``path`` atomically (temporary file in the same directory, then rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return _atomic(path, write, ".tmp")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically, indented, with a trailing newline."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_figure(figure: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically, in the format the path's suffix names."""
    suffix = Path(path).suffix
    fmt = suffix.lstrip(".") or "png"
    return _atomic(path, lambda tmp: figure.savefig(tmp, format=fmt, **kwargs), suffix)


def save_torch(path: str | os.PathLike[str], data: Any) -> Path:
    """``torch.save`` atomically: a checkpoint is the previous one or the new one, never torn."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return _atomic(path, write, ".tmp")
