"""Does the map point at the object? The pointing game and the energy-based pointing game.

Boxes come per image from a CSV (config `images.boxes`): `file name (or stem), x0, y0, x1, y1`
per line, in the pixels of the image file itself (x to the right, y down, as an image viewer
shows it after EXIF rotation); a file with several boxes has several lines (or 4 more numbers per
box on one line). Each box is mapped to the model's input frame through the resizing and
cropping the model's preprocessing applies (`images.crop_box`, the same region the overlays
show); a map pixel is inside when its centre is.

- pointing game (Zhang et al. 2016; Quantus' PointingGame): a hit when a pixel of the map's
  maximum lies in a box (the union of the image's boxes). Hit rate: higher is better.
- energy-based pointing game (Wang et al. 2020, the Score-CAM paper; Quantus'
  RelevanceMassAccuracy): the share of the map's positive mass inside the boxes. Higher is
  better; a map spread uniformly scores the boxes' share of the image. Only the positive part
  of a signed map (evidence for the class) counts; for the non-negative maps of CAMs and
  gradient magnitudes this is the plain ratio of Wang et al.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

Box = tuple[float, float, float, float]


def read_boxes(path: str | Path) -> dict[str, list[Box]]:
    """{file name or stem: [(x0, y0, x1, y1), ...]} from a CSV/TSV; `#` lines and a header
    line (first line whose numbers do not parse) are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError(f"images.boxes: cannot read {path} ({error}); fix the path") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"images.boxes: {path} is not UTF-8 text ({error})") from None
    first = text.splitlines()[0] if text else ""
    dialect = "excel-tab" if "\t" in first else "excel"
    boxes: dict[str, list[Box]] = {}
    for n, row in enumerate(csv.reader(text.splitlines(), dialect=dialect), start=1):
        row = [cell.strip() for cell in row if cell.strip()]
        if not row or row[0].startswith("#"):
            continue
        try:
            numbers = [float(v) for v in row[1:]]
        except ValueError:
            if n == 1:
                continue  # a header
            raise ConfigError(
                f"images.boxes: {path} line {n}: {row[1:]} are not numbers; write "
                "`file name, x0, y0, x1, y1` per line"
            ) from None
        if not numbers or len(numbers) % 4:
            raise ConfigError(
                f"images.boxes: {path} line {n} has {len(numbers)} numbers; write "
                "`file name, x0, y0, x1, y1` (4 numbers per box)"
            )
        for k in range(0, len(numbers), 4):
            x0, y0, x1, y1 = numbers[k : k + 4]
            if not (x1 > x0 and y1 > y0):
                raise ConfigError(
                    f"images.boxes: {path} line {n}: box {numbers[k : k + 4]} is empty; "
                    "x1 > x0 and y1 > y0 (pixels, x to the right, y down)"
                )
            boxes.setdefault(row[0], []).append((x0, y0, x1, y1))
    return boxes


def boxes_of(entry: dict[str, Any], boxes: dict[str, list[Box]]) -> list[Box]:
    """The boxes of a manifest entry, by its source's file name, else its stem."""
    source = Path(str(entry.get("source", "")))
    return boxes.get(source.name, boxes.get(source.stem, []))


def box_mask(entry: dict[str, Any], image_boxes: list[Box], pre: dict[str, Any]) -> np.ndarray:
    """[H, W] bool at the model input size: the pixels whose centres lie in one of the boxes.

    `entry` is the image's manifest entry (staged `width`, `height`; `original_size` when staging
    reduced the image): boxes in the file's pixels are scaled to the staged image, then through
    the region the model sees (`crop_box`) to the input frame.
    """
    from ..images import crop_box

    height, width = (int(v) for v in pre["size"])
    staged = (int(entry["width"]), int(entry["height"]))
    original = entry.get("original_size") or staged
    sx, sy = staged[0] / float(original[0]), staged[1] / float(original[1])
    left, top, right, bottom = crop_box(staged, pre)
    kx, ky = width / (right - left), height / (bottom - top)
    cx = np.arange(width) + 0.5
    cy = np.arange(height) + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in image_boxes:
        u0, u1 = (x0 * sx - left) * kx, (x1 * sx - left) * kx
        v0, v1 = (y0 * sy - top) * ky, (y1 * sy - top) * ky
        mask |= ((cy >= v0) & (cy <= v1))[:, None] & ((cx >= u0) & (cx <= u1))[None, :]
    return mask


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> bool:
    """True when a pixel of the map's maximum value lies inside the mask."""
    a = np.asarray(saliency, dtype=np.float64)
    return bool(np.any(mask & (a == a.max())))


def energy_pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the map's positive mass inside the mask; None for a map with no positive mass."""
    a = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, None)
    total = a.sum()
    return float(a[mask].sum() / total) if total > 0 else None
