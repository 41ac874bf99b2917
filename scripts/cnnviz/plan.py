"""What a run will process, decided at DAG-build time: image list, ids and shards.

Stdlib only: the Snakefile imports this on every parse (also on every cluster job), so it must
stay cheap. Reading the images happens later, in the staging step.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
    ".jfif",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def discover_images(specs: Iterable[str]) -> list[Path]:
    """Expand folders, globs and files into a sorted, de-duplicated list of files.

    A folder contributes the files with an image suffix; a glob or an explicit file is taken as
    given (a non-image file named explicitly is reported by the staging step, not dropped here).
    A spec that matches nothing raises FileNotFoundError naming it.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            matches = [
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
        elif any(ch in spec for ch in "*?["):
            matches = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
            matches = [p for p in matches if p.is_file()]
        elif path.is_file():
            matches = [path]
        else:
            raise FileNotFoundError(
                f"images.paths entry {spec!r} is neither a file, a folder nor a glob that "
                "matches anything; fix the path in your config (relative paths start at the "
                "working directory)"
            )
        found.extend(sorted(matches))
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return list(unique.values())


def image_ids(paths: Iterable[Path]) -> list[str]:
    """A safe, unique id per image: its stem with unsafe characters replaced, de-duplicated."""
    taken: set[str] = set()
    ids = []
    for path in paths:
        base = _UNSAFE.sub("_", Path(path).stem).strip("._") or "image"
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        ids.append(candidate)
    return ids


def shards(items: list, size: int) -> dict[str, list]:
    """Split `items` into consecutive shards of `size`, named s000, s001, ..."""
    return {f"s{i // size:03d}": items[i : i + size] for i in range(0, len(items), size)}
