"""Small pictures for pages that show many at once, written under report/thumbs/.

- thumbnails: one picture shrunk to fit a square (the staged inputs, layer examples);
- strips: one row of the method x image grid, every method's map for one image side by side in
  a single PNG. A model page with 1,000 images and 12 methods then loads 1,000 pictures, not
  12,000, and its HTML stays small: that is what keeps it opening in well under two seconds.

Thumbnails are 256-colour PNGs (a third of the bytes of RGB; nothing visible is lost at this
size). Each is rebuilt only when missing or older than its sources, so a rerun of the report is
cheap; a picture already no larger than the thumbnail is linked as it is. Work is spread over a
few threads (Pillow releases the GIL while decoding and encoding).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

from ..artifacts import write_with

THUMB_SIDE = 160  # staged images and layer examples in tables
SMALL_SIDE = 112  # filter and atlas previews in the layer table
TILE = 64  # one map in a strip of the method x image grid
GAP = 4  # px between the tiles of a strip
EMPTY = (238, 240, 243)  # the tile of a method that has no map for this image
WHITE = (255, 255, 255)


def _shrunk(path: Path, max_side: int) -> Image.Image:
    with Image.open(path) as picture:
        picture.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        picture.info = {}
        return picture


@lru_cache(maxsize=512)
def _tile(path: str, side: int, _stamp: tuple[int, int, int]) -> Image.Image:
    """A map shrunk to fit side x side (cached by file identity: hard-linked copies decode once)."""
    return _shrunk(Path(path), side).convert("RGB")


def _palette(picture: Image.Image) -> Image.Image:
    """256 colours: a third of the bytes of an RGB PNG and faster to write; fine at this size."""
    if picture.mode != "RGB":
        return picture
    return picture.quantize(256, method=Image.Quantize.FASTOCTREE)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    _palette(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_bytes(path: Path, max_side: int) -> bytes:
    """The PNG bytes of `path` shrunk to fit max_side x max_side (aspect kept)."""
    return _png(_shrunk(path, max_side))


def fits(path: Path, max_side: int) -> bool:
    """True when the picture is already no larger than max_side (reads the header only)."""
    try:
        with Image.open(path) as picture:
            return max(picture.size) <= max_side
    except (OSError, ValueError):
        return False


def strip_width(count: int, tile: int = TILE) -> int:
    return max(1, count * tile + (count - 1) * GAP)


def strip(
    pictures: Sequence[Path | None], more: Sequence[int] = (), tile: int = TILE
) -> Image.Image:
    """One row of tiles: each picture shrunk into a tile x tile square, centred; None -> an empty
    grey tile; more[i] > 0 marks "+n" (further maps of that method) in the tile's corner."""
    canvas = Image.new("RGB", (strip_width(len(pictures), tile), tile), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, path in enumerate(pictures):
        left = i * (tile + GAP)
        if path is None:
            draw.rectangle((left, 0, left + tile - 1, tile - 1), fill=EMPTY)
            continue
        try:
            info = os.stat(path)
            small = _tile(str(path), tile, (info.st_dev, info.st_ino, info.st_mtime_ns))
        except (OSError, ValueError):
            draw.rectangle((left, 0, left + tile - 1, tile - 1), fill=EMPTY)
            draw.line((left, 0, left + tile - 1, tile - 1), fill=(200, 60, 60), width=2)
            continue
        canvas.paste(small, (left + (tile - small.width) // 2, (tile - small.height) // 2))
        extra = more[i] if i < len(more) else 0
        if extra > 0:
            text = f"+{extra}"
            box = draw.textbbox((0, 0), text)
            w, h = box[2] - box[0] + 4, box[3] - box[1] + 4
            x, y = left + tile - w, tile - h
            draw.rectangle((x, y, x + w, y + h), fill=WHITE)
            draw.text((x + 2 - box[0], y + 2 - box[1]), text, fill=(40, 40, 40))
    return canvas


def strip_bytes(pictures: Sequence[Path | None], more: Sequence[int] = ()) -> bytes:
    return _png(strip(pictures, more))


class Thumbnails:
    """Maps pictures to thumbnail files under `folder`, mirroring their paths below `root`."""

    def __init__(self, root: Path, folder: Path, workers: int | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.folder = folder
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.wanted: dict[tuple[Path, int], Path] = {}
        self.strips: dict[Path, tuple[tuple[Path | None, ...], tuple[int, ...]]] = {}

    def path(self, picture: Path, max_side: int) -> Path:
        resolved = Path(os.path.abspath(picture))
        try:
            rel = resolved.relative_to(self.root).with_suffix("")
        except ValueError:  # outside the results folder: a stable name from its path
            rel = Path("_outside") / hashlib.sha1(str(resolved).encode()).hexdigest()[:16]
        return self.folder / f"{max_side}" / f"{rel.as_posix()}.png"

    def request(self, picture: Path, max_side: int) -> None:
        self.wanted.setdefault((picture, max_side), self.path(picture, max_side))

    def requests(self, pictures: Iterable[Path], max_side: int) -> None:
        for picture in pictures:
            self.request(picture, max_side)

    def request_strip(
        self, name: str, pictures: Sequence[Path | None], more: Sequence[int]
    ) -> Path:
        """The strip file for `pictures` (its name: `name` plus a digest of the sources)."""
        digest = hashlib.sha1(
            "\n".join(str(p) for p in pictures).encode() + repr(tuple(more)).encode()
        ).hexdigest()[:10]
        out = self.folder / "strips" / f"{name}.{digest}.png"
        self.strips[out] = (tuple(pictures), tuple(more))
        return out

    def make(self) -> dict[tuple[Path, int], Path]:
        """Write every requested thumbnail and strip that is missing or stale; returns
        {(picture, side): file}. A picture already small enough maps to itself; one that cannot
        be read maps to itself too (the page then shows the broken original, honestly)."""
        jobs = list(self.wanted.items())
        with ThreadPoolExecutor(self.workers) as pool:
            done = list(pool.map(lambda job: self._one(*job), jobs))
            list(pool.map(lambda item: self._strip(*item), self.strips.items()))
        return {key: result for (key, _), result in zip(jobs, done, strict=True)}

    def _one(self, key: tuple[Path, int], thumb: Path) -> Path:
        picture, max_side = key
        try:
            if thumb.exists() and thumb.stat().st_mtime >= picture.stat().st_mtime:
                return thumb
            if fits(picture, max_side):
                return picture
            data = thumbnail_bytes(picture, max_side)
            write_with(thumb, lambda tmp: tmp.write_bytes(data))
            return thumb
        except (OSError, ValueError):
            return picture

    def _strip(self, out: Path, sources: tuple[tuple[Path | None, ...], tuple[int, ...]]) -> None:
        pictures, more = sources
        try:
            made = out.stat().st_mtime
            if all(p is None or p.stat().st_mtime <= made for p in pictures):
                return
        except OSError:
            pass
        data = strip_bytes(pictures, more)
        write_with(out, lambda tmp: tmp.write_bytes(data))
