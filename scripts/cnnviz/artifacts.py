"""Atomic artifact writes: a reader (or a rerun after a kill) never sees a partial file."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are shared like any file
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


_hidden_names: dict[Path, list[str]] = {}  # per folder, listed once per process


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete temporaries of `final` that a killed writer left (SIGKILL skips the cleanup above).

    Each artifact has one writer (Snakemake runs one job per output), so a temporary of it that
    exists before a write is stale: a rerun after a kill leaves no partial file behind. A folder's
    hidden files are listed once per process, so writing many files into one folder stays cheap.
    """
    folder = final.parent
    if folder not in _hidden_names:
        with os.scandir(folder) as entries:
            _hidden_names[folder] = [e.name for e in entries if e.name.startswith(".")]
    names = _hidden_names[folder]
    if not names:
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}{re.escape(final.suffix)}")
    stale = [name for name in names if pattern.fullmatch(name)]
    for name in stale:
        names.remove(name)
        (folder / name).unlink(missing_ok=True)
    return [folder / name for name in stale]


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return write_with(path, _save)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
