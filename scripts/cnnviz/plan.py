"""What a run will process, decided at DAG-build time: image list, ids and shards.

Stdlib only: the Snakefile imports this on every parse (also on every cluster job), so it must
stay cheap. Reading the images happens later, in the staging step, which names bad files.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def discover_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Input image paths from a folder, a glob pattern, or a list of paths / folders / globs.

    A folder yields its image files (by suffix, not recursive, hidden files skipped) and a glob its
    matching files, each sorted by name. A list keeps its own order, expanding entries the same
    way and dropping repeats; a listed file that does not exist is kept, so that staging reports
    it as failed instead of it vanishing silently.
    """
    if isinstance(spec, (str, Path)):
        found = _expand(spec, strict=True)
    else:
        found, seen = [], set()
        for entry in spec:
            for path in _expand(entry, strict=False):
                if path not in seen:
                    seen.add(path)
                    found.append(path)
    if not found and (isinstance(spec, (str, Path)) or list(spec)):
        raise ConfigError(f"images: {spec!r} matches no image files; give a folder, glob or list")
    return found


def _expand(entry: str | Path, strict: bool) -> list[Path]:
    path = Path(entry)
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
    text = str(entry)
    if glob.has_magic(text):
        return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    if strict and not path.exists():
        raise ConfigError(f"images: {text} is not a folder, glob pattern or existing file")
    return [path]


def image_id(path: str | Path, taken: set[str]) -> str:
    """A file-name-safe id from the file's stem ([A-Za-z0-9_.-]), unique within `taken`.

    Ids are compared case-insensitively (so two ids never collide on a case-insensitive file
    system); a repeat gets a suffix -2, -3, .... The new id is added to `taken`.
    """
    stem = _ID_UNSAFE.sub("_", Path(path).stem).strip("._-")[:80] or "image"
    lower = {t.lower() for t in taken}
    candidate, n = stem, 1
    while candidate.lower() in lower:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate)
    return candidate


def assign_ids(paths: Sequence[str | Path], taken: set[str] | None = None) -> list[str]:
    """`image_id` for each path in order: the same list always gets the same ids."""
    taken = set() if taken is None else taken
    return [image_id(p, taken) for p in paths]


def shards(items: list, size: int) -> dict[str, list]:
    """Split `items` into consecutive shards of `size`, named s000, s001, ..."""
    return {f"s{i // size:03d}": items[i : i + size] for i in range(0, len(items), size)}
