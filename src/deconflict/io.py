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
    """Write text to ``path`` atomically (temporary file in the same directory, then rename).

    Missing parent directories are created; a reader never sees a half-written file.

    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_text(Path(folder) / "results" / "table.md", "| a |").read_text()
    '| a |'
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return _atomic(path, write, ".tmp")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically, indented, with a trailing newline.

    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_json(Path(folder) / "run.json", {"seed": 0, "method": "gradops"})
    ...     print(path.read_text(), end="")
    {
      "method": "gradops",
      "seed": 0
    }
    """
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_figure(figure: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically, in the format the path's suffix names."""
    suffix = Path(path).suffix
    fmt = suffix.lstrip(".") or "png"
    return _atomic(path, lambda tmp: figure.savefig(tmp, format=fmt, **kwargs), suffix)


def save_torch(path: str | os.PathLike[str], data: Any) -> Path:
    """``torch.save`` atomically: a checkpoint is the previous one or the new one, never torn.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     torch.load(save_torch(Path(folder) / "step.pt", {"step": 3}))
    {'step': 3}
    """
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return _atomic(path, write, ".tmp")
