"""One method's maps for one shard as a few array files and an index (DESIGN.md, "artifacts are
the interface"): the explain step writes them, the render, metrics, report and audit steps read
them. Three files per image did not scale (benchmarks/PIPELINE.md).

`{out_dir}` = `results/{model}/{method}/{shard}/`:

- `maps.npy`      float32 [R, H, W]: row r's raw map at the model's input size (not for
                  projections);
- `signed.npy`    float16 [R, 3, H, W], signed methods only (guided backprop, deconvnet, guided
                  Grad-CAM): the input-space signal the picture shows, each row divided by its
                  largest |value| (the index keeps that as `signed_scale`: value = stored x scale);
- `projections.npy` float16 [R, k, 3, H, W], projections only: per (image, layer) row the top-k
                  channels' deconvnet projections, each divided by its largest |value| (the
                  channel's `scale` in the index); a layer with fewer than k channels leaves
                  zeros;
- `index.json`    {"layout", "method", "model", "kind" ("map" | "projections"), "arrays"
                  {name: file}, "rows": [{"row", "image", "target" (maps) or "layer" and
                  "channels" (projections), "label", "time_s", ... what the method noted}]}.

The pictures people see are drawn from these by their own jobs (cnnviz.pictures) into
`results/{model}/pictures/{method}/{shard}/` with a `pictures.json`, only for the rows the
config's `report.pictures` selects; `pictures_dir` names that folder for a maps folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import read_json, write_json, write_with
from ..errors import CnnvizError

LAYOUT = "shard-maps/1"
INDEX = "index.json"
PICTURES_INDEX = "pictures.json"


def _save(path: Path, array: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))

    write_with(path, save)


def unit_rows(stack: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each row of `stack` divided by its largest |value| (float16: a picture's scale-free
    signal keeps 3 significant digits), and those largest values."""
    stack = np.asarray(stack, np.float32)
    flat = np.abs(stack.reshape(len(stack), -1)) if len(stack) else np.zeros((0, 1), np.float32)
    scales = flat.max(axis=1) if flat.shape[1] else np.zeros(len(stack), np.float32)
    safe = np.where(scales > 0, scales, 1.0).reshape((-1,) + (1,) * (stack.ndim - 1))
    return (stack / safe).astype(np.float16), [float(s) for s in scales]


def write_shard_maps(
    out_dir: str | Path,
    method: str,
    model: str | None,
    rows: Sequence[dict[str, Any]],
    maps: Sequence[np.ndarray] | np.ndarray,
    signed: Sequence[np.ndarray | None] | None = None,
) -> list[dict[str, Any]]:
    """Write maps.npy (+ signed.npy when any row has a signed signal) and index.json; return
    the index rows. `rows[r]` holds "image", "target" and whatever else the row should record."""
    out_dir = Path(out_dir)
    maps = np.asarray(maps, np.float32) if len(maps) else np.zeros((0, 1, 1), np.float32)
    if maps.ndim != 3 or len(maps) != len(rows):
        raise CnnvizError(f"{method}: {len(rows)} rows but maps of shape {maps.shape}")
    index_rows = [{"row": r, **row} for r, row in enumerate(rows)]
    arrays = {"maps": "maps.npy"}
    _save(out_dir / arrays["maps"], maps)
    if signed is not None and any(s is not None for s in signed):
        if any(s is None for s in signed):
            raise CnnvizError(f"{method}: a signed signal for some rows but not all")
        stored, scales = unit_rows(np.stack([np.asarray(s, np.float32) for s in signed]))
        arrays["signed"] = "signed.npy"
        _save(out_dir / arrays["signed"], stored)
        for row, scale in zip(index_rows, scales, strict=True):
            row["signed_scale"] = scale
    write_json(out_dir / INDEX, {"layout": LAYOUT, "method": method, "model": model,
                                 "kind": "map", "arrays": arrays, "rows": index_rows})
    return index_rows


class ProjectionWriter:
    """projections.npy filled row by row (a memory-mapped temporary: memory holds one row, not
    the shard), then index.json; `close()` moves both into place."""

    def __init__(self, out_dir: str | Path, model: str | None, count: int, k: int,
                 shape: Sequence[int]) -> None:
        from numpy.lib.format import open_memmap

        self.out_dir, self.model, self.k = Path(out_dir), model, k
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.final = self.out_dir / "projections.npy"
        self.tmp = self.out_dir / ".projections.npy.partial"
        self.array = open_memmap(self.tmp, mode="w+", dtype=np.float16,
                                 shape=(count, k, 3, *shape))
        self.rows: list[dict[str, Any]] = []

    def add(self, image: str, layer: str, items: Sequence[dict[str, Any]],
            info: dict[str, Any]) -> dict[str, Any]:
        r = len(self.rows)
        scales: list[float] = []
        if items:
            stored, scales = unit_rows(np.stack([it["projection"] for it in items]))
            self.array[r, : len(items)] = stored
        meta = [{**{k: v for k, v in it.items() if k != "projection"}, "scale": scale}
                for it, scale in zip(items, scales, strict=True)]
        row = {"row": r, "image": image, "layer": layer, "channels": meta, **info}
        self.rows.append(row)
        return row

    def close(self) -> list[dict[str, Any]]:
        import os

        self.array.flush()
        del self.array
        os.replace(self.tmp, self.final)
        write_json(self.out_dir / INDEX, {
            "layout": LAYOUT, "method": "projections", "model": self.model,
            "kind": "projections", "arrays": {"projections": self.final.name}, "rows": self.rows,
        })  # fmt: skip
        return self.rows


# ---- reading ---------------------------------------------------------------------------------
def has_shard_maps(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise CnnvizError(f"{path} does not exist; run the explain step first")
    index = read_json(path)
    if index.get("layout") != LAYOUT:
        raise CnnvizError(f"{path}: layout {index.get('layout')!r}, expected {LAYOUT!r}")
    return index


def read_array(folder: str | Path, index: dict[str, Any], name: str) -> np.ndarray:
    """One of the folder's arrays, memory-mapped (a reader touches only the rows it uses)."""
    file = index.get("arrays", {}).get(name)
    if file is None:
        raise CnnvizError(f"{Path(folder) / INDEX} lists no {name!r} array")
    array = np.load(Path(folder) / file, mmap_mode="r")
    if len(array) != len(index["rows"]):
        raise CnnvizError(f"{Path(folder) / file}: {len(array)} rows, index lists "
                          f"{len(index['rows'])}; rerun explain")
    return array


def read_shard_maps(folder: str | Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(index rows, maps [R, H, W] float32, memory-mapped) of one method and shard."""
    index = read_index(folder)
    return index["rows"], read_array(folder, index, "maps")


def signed_row(array: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """Row `row["row"]` of signed.npy in its original units (float32 [3, H, W])."""
    return np.asarray(array[row["row"]], np.float32) * float(row.get("signed_scale", 1.0))


def pictures_dir(maps_dir: str | Path) -> Path:
    """Where the render step draws a maps folder's pictures:
    `{model}/{method}/{shard}` -> `{model}/pictures/{method}/{shard}`."""
    maps_dir = Path(maps_dir)
    return maps_dir.parent.parent / "pictures" / maps_dir.parent.name / maps_dir.name


def read_pictures(folder: str | Path) -> dict[int, str]:
    """{row: PNG file name} of a pictures folder (empty when it was not rendered)."""
    path = Path(folder) / PICTURES_INDEX
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return {int(p["row"]): str(p["png"]) for p in data.get("pictures", [])
            if isinstance(p, dict) and "row" in p and "png" in p}  # fmt: skip


def picture_name(row: dict[str, Any]) -> str:
    """`{image}_c{target}.png` for a map, `{image}_{layer}.png` for a projection row."""
    if "layer" in row and "target" not in row:
        return f"{row['image']}_{row['layer']}.png"
    return f"{row['image']}_c{row['target']}.png"
