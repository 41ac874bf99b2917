"""`cnnviz render`: the pictures of the maps of one shard, drawn from the explain step's arrays
(cnnviz.methods.shard_maps) and the staged images, for the rows the report shows. One job per
model and shard draws every method (each selected image decoded once); its fixed cost (process,
imports) is paid once per shard, not once per method and shard.

Which rows (config `report.pictures`, per shard and method):

- `all`: every row;
- `{top: N}`: the rows of the N images the model is surest of (top-1 probability, from the
  predict step), every target of those images;
- `failures`: the images whose top-1 prediction misses their true class (images.labels); when no
  image of the shard has a true class, those the model is unsure of (top-1 probability < 0.5);
- `none`: no pictures (the maps are still there for metrics, the audit and your own code).

Writes `{out_dir}/{image}_c{target}.png` (projections: `{image}_{layer}.png`) and
`{out_dir}/pictures.json` ({"method", "selection", "pictures": [{"row", "image", "target" or
"layer", "png"}], "rows": how many the index has}). The picture of a map is the one
render.map_picture draws: a signed attribution in a diverging colour map (rows marked "picture":
"relevance"), a signed signal as RGB (grey = 0), else the raw map's positive part
over the image the model saw, at the image's own resolution (render.map_picture). Only the
projections' pictures import the engine (methods.projections.projection_grid).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import read_json, write_json
from .errors import ConfigError
from .methods.shard_maps import PICTURES_INDEX

log = logging.getLogger("cnnviz.pictures")

Selection = str | dict[str, int]
UNSURE = 0.5


def check_selection(spec: Selection) -> Selection:
    if spec in ("all", "failures", "none"):
        return spec
    if isinstance(spec, dict) and set(spec) == {"top"} and int(spec["top"]) >= 0:
        return {"top": int(spec["top"])}
    raise ConfigError(f"report.pictures: {spec!r}; use all, failures, none or {{top: N}}")


def truth_matches(truth: str, entry: dict[str, Any]) -> bool:
    """Whether a prediction entry ({"index", "label"}) names the true class `truth` (a class
    index, the label, or one of the label's comma-separated names)."""
    wanted = truth.strip().lower()
    if wanted.isdigit():
        return int(entry["index"]) == int(wanted)
    label = str(entry["label"]).lower()
    return wanted == label or wanted in {part.strip() for part in label.split(",")}


def chosen_images(
    spec: Selection, ids: list[str], top: dict[str, list[dict[str, Any]]],
    truth: dict[str, str],
) -> set[str]:
    """The image ids of a shard whose pictures `spec` asks for (module docstring)."""
    spec = check_selection(spec)
    if spec == "all":
        return set(ids)
    if spec == "none":
        return set()
    sure = {i: float(top[i][0]["prob"]) if top.get(i) else 0.0 for i in ids}
    if isinstance(spec, dict):
        ranked = sorted(ids, key=lambda i: (-sure[i], ids.index(i)))
        return set(ranked[: spec["top"]])
    if any(i in truth for i in ids):
        return {i for i in ids if i in truth and top.get(i)
                and not truth_matches(truth[i], top[i][0])}  # fmt: skip
    return {i for i in ids if sure[i] < UNSURE}


def render_shard(
    model_dir: str | Path,
    manifest: str | Path,
    maps_dir: str | Path | list[str | Path],
    out_dir: str | Path | list[str | Path],
    selection: Selection = "all",
    predictions: str | Path | None = None,
) -> dict[str, Any]:
    """Draw the selected rows' pictures of one shard, for one method (`maps_dir`, `out_dir`)
    or several (lists: one job per shard decodes each image once for every method); write each
    method's pictures.json. A method whose maps are missing or whose explain job failed gets a
    pictures.json that says so (its failure is listed in the report by the explain job)."""
    from .errors import CnnvizError
    from .failures import check_input
    from .images import load_image, original_view, read_manifest
    from .methods.shard_maps import read_array, read_index
    from .modelcard import load_card

    single = isinstance(maps_dir, str | Path)
    maps_dirs = [Path(maps_dir)] if single else [Path(d) for d in maps_dir]
    out_dirs = [Path(out_dir)] if isinstance(out_dir, str | Path) else [Path(d) for d in out_dir]
    if len(maps_dirs) != len(out_dirs):
        raise CnnvizError(f"{len(maps_dirs)} maps folders but {len(out_dirs)} output folders")
    selection = check_selection(selection)
    card = load_card(model_dir)
    shard = read_manifest(manifest)
    entries = {e["id"]: e for e in shard["images"]}
    truth = {e["id"]: str(e["label"]) for e in shard["images"] if e.get("label") is not None}
    top: dict[str, list[dict[str, Any]]] = {}
    if predictions is not None and Path(predictions).is_file():
        data = read_json(predictions)
        top = {str(e["id"]): list(e.get("top") or []) for e in data.get("images", [])}
    methods = []  # (out_dir, index, arrays, rows by image) of each method that has maps
    results: dict[Path, dict[str, Any]] = {}
    for folder, out in zip(maps_dirs, out_dirs, strict=True):
        out.mkdir(parents=True, exist_ok=True)
        try:
            check_input(folder, f"the explain step (maps in {folder})")
            index = read_index(folder)
            arrays = {name: read_array(folder, index, name) for name in index.get("arrays", {})}
        except CnnvizError as error:
            results[out] = {"method": folder.parent.name, "selection": selection, "rows": 0,
                            "pictures": [], "skipped": str(error)}  # fmt: skip
            continue
        rows = [row for row in index["rows"] if row["image"] in entries]
        by_image: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_image.setdefault(row["image"], []).append(row)
        methods.append((out, index, arrays, by_image))
        results[out] = {"method": index.get("method"), "selection": selection,
                        "rows": len(rows), "pictures": []}  # fmt: skip
    ids = [i for i in entries if any(i in m[3] for m in methods)]
    chosen = chosen_images(selection, ids, top, truth)
    for image_id in ids:  # one decoded image at a time, drawn for every method
        if image_id not in chosen:
            continue
        view = original_view(load_image(entries[image_id]["path"]), card["preprocess"])
        for out, index, arrays, by_image in methods:
            for row in by_image.get(image_id, []):
                results[out]["pictures"].append(_draw(view, index, arrays, row, out))
    for out, result in results.items():
        write_json(out / PICTURES_INDEX, result)
        log.info("%s: %d of %d rows drawn (%s)", result["method"], len(result["pictures"]),
                 result["rows"], selection)
    return results[out_dirs[0]] if single else {str(k): v for k, v in results.items()}


def _draw(view: np.ndarray, index: dict[str, Any], arrays: dict[str, np.ndarray],
          row: dict[str, Any], out: Path) -> dict[str, Any]:
    from .methods.shard_maps import picture_name
    from .render import save_png

    if index.get("kind") == "projections":
        picture, key = _projection_picture(view, arrays["projections"], row), "layer"
    else:
        picture, key = _map_picture(view, arrays, row), "target"
    name = picture_name(row)
    save_png(out / name, picture)
    return {"row": row["row"], "image": row["image"], key: row[key], "png": name}


def _map_picture(view: np.ndarray, arrays: dict[str, np.ndarray], row: dict[str, Any]
                 ) -> np.ndarray:
    from .methods.shard_maps import signed_row
    from .render import map_picture  # without the engine's imports

    raw = np.asarray(arrays["maps"][row["row"]], np.float32)
    signed = signed_row(arrays["signed"], row) if "signed" in arrays else None
    return map_picture(view, raw, signed, row.get("picture"))


def _projection_picture(view: np.ndarray, array: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    from .methods.projections import projection_grid

    items = [{**meta, "projection": np.asarray(array[row["row"], k], np.float32)
              * float(meta.get("scale", 1.0))}
             for k, meta in enumerate(row.get("channels", []))]  # fmt: skip
    return projection_grid(view, items)
