"""What a run will process, decided at DAG-build time: image list, ids and shards.

Stdlib only: the Snakefile imports this on every parse (also on every cluster job), so it must
stay cheap. Reading the images happens later, in the staging step, which names bad files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .model_file import stat_key

IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif",
)  # fmt: skip
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def discover_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Input image paths from a folder, a glob pattern, or a list of paths / folders / globs.

    A folder yields its image files (by suffix, not recursive, hidden files skipped) and a glob its
    matching files, each sorted by name. A list keeps its own order, expanding entries the same
    way and dropping repeats. Nothing named vanishes silently: a listed file that does not exist,
    a dangling symlink (listed or in a folder) and a pattern that matches nothing are kept as
    entries, so that staging lists each under the failed images with the reason.
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
            if (p.is_file() or p.is_symlink())  # a dangling link is listed, then reported
            and not p.name.startswith(".")
            and p.suffix.lower() in IMAGE_SUFFIXES
        )
    text = str(entry)
    if glob.has_magic(text):
        matches = glob.glob(text, recursive=True)
        found = sorted(Path(p) for p in matches if Path(p).is_file() or Path(p).is_symlink())
        if not found and not strict:
            return [path]  # staging reports that the pattern matches no file
        return found
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


def existing(paths: Sequence[str | Path]) -> list[str]:
    """The paths that exist (a symlink: its target). Snakemake's inputs: a path that does not
    exist is not one (it would stop the whole run at DAG build), staging reports it instead."""
    return [str(p) for p in paths if Path(p).exists()]


# --------------------------------------------------------------------------- memory per job

# Peak RSS of one job (benchmarks/bench_memory.py, numbers in its docstring): a base for the
# interpreter, ONNX Runtime and the model, and per megapixel of the largest image. Staging decodes
# the file whole (a JPEG at a reduced scale when that suffices) and keeps at most STAGE_MAX_SIDE
# pixels a side; every later job reads that staged copy. Measured with a small CNN: staging
# 40-135 MB, predict/activations/explain 85-150 MB for images of 512 to 9400 pixels a side
# (before the limit, a 9400 x 9400 JPEG took a Grad-CAM job to 5.3 GB). The per-megapixel costs
# below are about three times what was measured, the base leaves room for a large model.
STAGE_MAX_SIDE = 2048
MEM_BASE_MB = 1000
MEM_PER_MEGAPIXEL_MB = 40  # jobs after staging, per staged megapixel
STAGE_PER_MEGAPIXEL_MB = 16  # staging, per megapixel of the file as it is
# Times the size of the model's files: the model, the graphs built from it (LRP's and the flipped
# convolutions' copies of the weights) and their sessions. regnet_y_128gf (2.58 GB of weights)
# peaked at 22.9 GB in its heaviest job (Ablation-CAM), ~9x (benchmarks/ZOO.md).
MEM_MODEL_FACTOR = 9
REFUSED_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: larger images are refused undecoded


def job_memory_mb(
    image_sizes: Sequence[tuple[int, int] | None],
    model_bytes: int = 0,
    attempt: int = 1,
    staging: bool = False,
) -> int:
    """mem_mb for a job over images of these (width, height) sizes: an estimate from the largest
    image (as staged, at most STAGE_MAX_SIDE a side; for `staging`, as the file is), growing
    with each retry."""
    largest = 0.0
    for size in image_sizes:
        if size and size[0] * size[1] <= REFUSED_PIXELS:
            width, height = size
            scale = 1.0 if staging else min(1.0, STAGE_MAX_SIDE / max(width, height, 1))
            largest = max(largest, width * height * scale * scale / 1e6)
    per_megapixel = STAGE_PER_MEGAPIXEL_MB if staging else MEM_PER_MEGAPIXEL_MB
    need = MEM_BASE_MB + per_megapixel * largest + MEM_MODEL_FACTOR * model_bytes / 1e6
    return int(-(-need // 100) * 100) * attempt


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (PNG, JPEG, GIF, BMP, WebP; stdlib only, reads a few
    kilobytes); None when the format is another or the file cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            if head[:6] in (b"GIF87a", b"GIF89a"):
                return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
            if head[:2] == b"BM":
                width = int.from_bytes(head[18:22], "little", signed=True)
                height = int.from_bytes(head[22:26], "little", signed=True)
                return abs(width), abs(height)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp_size(head + fh.read(32))
            if head[:2] == b"\xff\xd8":
                fh.seek(2)
                return _jpeg_size(fh)
    except (OSError, ValueError):
        return None
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if kind == b"VP8 ":
        return (
            int.from_bytes(head[26:28], "little") & 0x3FFF,
            int.from_bytes(head[28:30], "little") & 0x3FFF,
        )
    if kind == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _jpeg_size(fh) -> tuple[int, int] | None:  # noqa: ANN001 - a binary file
    for _ in range(10000):
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:
            continue
        length = int.from_bytes(fh.read(2), "big")
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
            data = fh.read(5)
            return int.from_bytes(data[3:5], "big"), int.from_bytes(data[1:3], "big")
        fh.seek(length - 2, 1)
    return None


# --------------------------------------------------------------------------- what an export reads


def _load_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: Path, data: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass  # a cache only


def files_digest(paths: Sequence[str | Path], cache: str | Path | None = None) -> str:
    """sha256 over the files' contents (names and checksums), each file hashed once per version
    (size, modification and change time, inode) with `cache` (a JSON file) remembering the
    checksums."""
    cache_path = Path(cache) if cache else None
    known = _load_cache(cache_path) if cache_path else {}
    total = hashlib.sha256()
    changed = False
    for name in paths:
        path = Path(name)
        try:
            key = stat_key(path)
        except OSError:
            total.update(f"{path.name}:missing\n".encode())
            continue
        if key not in known:
            stale = [k for k in known if k.split("|", 1)[0] == key.split("|", 1)[0]]
            for old_key in stale:  # the file's earlier versions
                del known[old_key]
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            known[key] = digest.hexdigest()
            changed = True
        total.update(f"{path.name}:{known[key]}\n".encode())
    if cache_path and changed:
        _save_cache(cache_path, known)
    return total.hexdigest()
