"""`cnnviz metrics`: the quality metrics of one method's maps over one shard of images.

Reads the maps the explain step wrote (`{maps_dir}/maps.npy` + `index.json`, shard_maps), and
writes one JSON (`{results}/{model}/metrics/{shard}/{method}.json`; shape in cnnviz.metrics'
docstring) with, per map: deletion and insertion curves and AUCs, the randomization test per
cut, and the class sensitivity. The method "random" (uniform random maps, seeded) is the
reference a useful map must beat; it has deletion / insertion only. Recomputed maps come from
cnnviz.methods.explain.METHODS through a Job built for the randomized model (`job_for`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..artifacts import write_json
from ..errors import CnnvizError, ConfigError
from ..failures import check_input
from .complexity import complexity, sparseness
from .localization import energy_pointing_game, pointing_game
from .road import road_curves

log = logging.getLogger("cnnviz.metrics")

REFERENCE = "random"
CURVE_DIGITS = 6


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The config's `metrics` section with every default filled in (a deep copy). The defaults
    are the schema's (cnnviz.config.section_defaults), the one place they are written."""
    from ..config import section_defaults

    defaults = section_defaults("metrics")
    out = {k: copy.deepcopy(v) for k, v in defaults.items() if k not in ("enabled", "methods")}
    for key, value in (settings or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def listed(method: str, methods: Any) -> bool:
    """Whether a metric's `methods` setting (a list, or auto = every scored method) has it."""
    return method != REFERENCE and (methods == "auto" or method in (methods or []))


# ---- maps from explain.py's methods -----------------------------------------------------------
def job_for(
    job: Any, model: onnx.ModelProto | None = None, rows: list[tuple[int, int]] | None = None
) -> Any:
    """A copy of an explain Job with another model and/or other (image, class) rows.

    The copy's views are 1 x 1 pixels: the metrics need the raw maps, not the overlay pictures
    the methods also draw.
    """
    tiny = [np.zeros((1, 1, 3), np.uint8)] * len(job.views)
    return dataclasses.replace(
        job,
        model=job.model if model is None else model,
        rows=list(job.rows if rows is None else rows),
        views=tiny,
        notes={},
    )


def compute_maps(job: Any, method: str) -> np.ndarray:
    """[rows, H, W] float32 raw maps of `method` for job.rows, in order (explain's METHODS)."""
    from ..methods.explain import run_method
    from ..registry import SCORED as METHODS

    if method not in METHODS:
        raise ConfigError(f"metrics: unknown method {method!r}; known: {', '.join(METHODS)}")
    maps = [np.asarray(raw, np.float32) for _, raw, _, _ in run_method(job, method)]
    if len(maps) != len(job.rows):
        raise CnnvizError(f"{method} returned {len(maps)} maps for {len(job.rows)} rows")
    return np.stack(maps) if maps else np.zeros((0, *job.inputs.shape[-2:]), np.float32)


def read_maps(job: Any, maps_dir: Path) -> tuple[list[tuple[int, int]], list, list[dict]]:
    """(rows, maps, failed) from the explain step's array file and index in `maps_dir`
    (cnnviz.methods.shard_maps)."""
    from ..methods.shard_maps import read_shard_maps

    check_input(maps_dir, f"the explain step (maps in {maps_dir})")
    entries, arrays = read_shard_maps(Path(maps_dir))
    index = {image_id: i for i, image_id in enumerate(job.ids)}
    rows, maps, failed = [], [], []
    for entry in entries:
        image, target = entry.get("image"), entry.get("target")
        if image not in index or target is None:
            failed.append({"image": image, "target": target,
                           "error": f"row {entry.get('row')} of {maps_dir}: its image is not "
                                    "in the shard; rerun explain"})  # fmt: skip
            continue
        raw = np.asarray(arrays[entry["row"]], np.float32)
        if raw.shape != job.inputs.shape[-2:]:
            failed.append({"image": image, "target": target,
                           "error": f"maps in {maps_dir} are {raw.shape}, not the model input "
                                    "size"})  # fmt: skip
            continue
        rows.append((index[image], int(target)))
        maps.append(raw)
    return rows, maps, failed


def random_maps(job: Any, seed: int) -> list[np.ndarray]:
    """The reference: one uniform random map per row, seeded by (seed, image index)."""
    size = job.inputs.shape[-2:]
    return [np.random.default_rng([seed, i]).random(size).astype(np.float32) for i, _ in job.rows]


# ---- the job ----------------------------------------------------------------------------------
def metrics_shard(
    model_dir: Path,
    manifest: Path,
    method: str,
    out: Path,
    maps_dir: Path | None = None,
    method_options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
    boxes: Path | None = None,
) -> dict[str, Any]:
    """Compute every metric of `method` over one shard and write `out` (JSON); return it.

    `boxes`: the CSV of object boxes per image (config `images.boxes`) for the pointing games.
    """
    from ..methods.explain import load_job
    from ..runtime import make_session
    from .perturbation import Scorer, baseline_image, perturbation_curves
    from .randomization import randomization_test
    from .robustness import max_sensitivity
    from .sensitivity import class_sensitivity

    s = resolve_settings(settings)
    options = dict(method_options or {})
    job, failed = load_job(Path(model_dir), Path(manifest), options, device, threads, batch_size)
    if method == REFERENCE:
        maps = random_maps(job, int(s["seed"]))
    else:
        if maps_dir is None:
            raise ConfigError(f"metrics for {method}: give the folder of its maps (--maps-dir)")
        rows, maps, missing = read_maps(job, Path(maps_dir))
        job.rows, failed = rows, failed + missing
    card, labels = job.card, job.card.get("labels") or []
    scorer = Scorer(make_session(job.model, device, threads), card, int(s["batch_size"]))
    probs = scorer.probabilities(job.inputs) if job.ids else np.zeros((0, 0))
    timing: dict[str, Any] = {"maps": len(job.rows)}
    masks, unboxed = box_masks(job, Path(manifest), boxes)

    started = time.perf_counter()
    records, fractions = [], []
    for (i, target), raw in zip(job.rows, maps, strict=True):
        base, start = (
            baseline_image(job.inputs[i], s[key], float(s["blur_sigma"]), card["preprocess"])
            for key in ("baseline", "insertion_baseline")
        )
        curves = perturbation_curves(
            scorer, job.inputs[i], raw, target, int(s["steps"]), base, int(s["seed"]), start
        )
        fractions = [round(f, CURVE_DIGITS) for f in curves["fractions"]]
        records.append({
            "image": job.ids[i], "target": target,
            "label": labels[target] if target < len(labels) else str(target),
            "prob": float(probs[i, target]),
            "deletion_auc": curves["deletion_auc"], "insertion_auc": curves["insertion_auc"],
            "deletion_curve": [round(v, CURVE_DIGITS) for v in curves["deletion"]],
            "insertion_curve": [round(v, CURVE_DIGITS) for v in curves["insertion"]],
            "sparseness": sparseness(raw), "complexity": _finite(complexity(raw)),
        })  # fmt: skip
        if i in masks:
            records[-1]["pointing_game"] = int(pointing_game(raw, masks[i]))
            records[-1]["energy_pointing_game"] = energy_pointing_game(raw, masks[i])
    timing["deletion_insertion_s_per_map"] = _per_map(time.perf_counter() - started, records)

    road_settings = s["road"]
    if road_settings["enabled"] and records:
        started = time.perf_counter()
        for record, (i, target), raw in zip(records, job.rows, maps, strict=True):
            curves = road_curves(
                scorer, job.inputs[i], raw, target, list(road_settings["fractions"]),
                float(road_settings["noise"]), np.random.default_rng([int(s["seed"]), i]),
                int(s["seed"]),
            )  # fmt: skip
            record["road"] = {
                k: [round(x, CURVE_DIGITS) for x in v] if isinstance(v, list) else v
                for k, v in curves.items()
            }
        timing["road_s_per_map"] = _per_map(time.perf_counter() - started, records)

    cuts: list[dict] = []
    originals = np.stack(maps) if maps else None
    random_settings = s["randomization"]
    if method != REFERENCE and method in random_settings["methods"] and records:
        try:
            cuts, per_row, seconds = randomization_test(
                job, method, originals, int(random_settings["cuts"]),
                int(random_settings["seed"]), str(random_settings["init"]),
            )  # fmt: skip
            for record, result in zip(records, per_row, strict=True):
                record["randomization"] = result
            timing["randomization_s_per_map"] = _per_map(seconds, records)
            timing["randomization_s_per_map_and_cut"] = _per_map(seconds / len(cuts), records)
        except CnnvizError as error:
            log.error("%s: randomization test failed: %s", method, error)
            failed.append({"metric": "randomization", "error": str(error)})
    kinds = list(s["class_sensitivity"].get("classes") or [])
    if method != REFERENCE and kinds and records:
        try:
            per_row, seconds = class_sensitivity(job, method, originals, probs, kinds)
            for record, result in zip(records, per_row, strict=True):
                record["class_sensitivity"] = result
            timing["class_sensitivity_s_per_map"] = _per_map(seconds, records)
        except CnnvizError as error:
            log.error("%s: class sensitivity failed: %s", method, error)
            failed.append({"metric": "class_sensitivity", "error": str(error)})
    sensitivity = s["max_sensitivity"]
    if listed(method, sensitivity["methods"]) and records:
        try:
            values, seconds = max_sensitivity(
                job, method, originals, int(sensitivity["samples"]), float(sensitivity["radius"]),
                int(sensitivity["seed"]),
            )  # fmt: skip
            for record, value in zip(records, values, strict=True):
                record["max_sensitivity"] = value
            timing["max_sensitivity_s_per_map"] = _per_map(seconds, records)
        except CnnvizError as error:
            log.error("%s: max-sensitivity failed: %s", method, error)
            failed.append({"metric": "max_sensitivity", "error": str(error)})

    result = {
        "description": f"Quality metrics of the {method} maps of model {card.get('name')!r} "
                       f"over shard {Path(manifest).stem}: per map deletion / insertion, ROAD, "
                       "randomization test, class sensitivity, pointing games, sparseness, "
                       "complexity, max-sensitivity (see metrics/summary.json).",
        "model": card.get("name"), "method": method, "shard": Path(manifest).stem,
        "settings": s, "options": options,
        "fractions": fractions, "randomization_cuts": cuts,
        "road_fractions": list(road_settings["fractions"]) if road_settings["enabled"] else [],
        "boxes": str(boxes) if boxes else None, "unboxed": unboxed if boxes else [],
        "images": records, "failed": failed, "timing": timing,
    }  # fmt: skip
    write_json(out, result)
    log.info("%s: metrics of %d maps, %s", method, len(records), timing)
    return result


def box_masks(
    job: Any, manifest: Path, boxes: Path | None
) -> tuple[dict[int, np.ndarray], list[str]]:
    """({image index: [H, W] bool mask of its boxes in the input frame}, ids without a box).

    An image whose boxes all lie outside the region the model sees counts as without a box.
    """
    from ..images import read_manifest
    from .localization import box_mask, boxes_of, read_boxes

    if not boxes:
        return {}, list(job.ids)
    table = read_boxes(boxes)
    entries = {e["id"]: e for e in read_manifest(manifest)["images"]}
    masks, unboxed = {}, []
    for i, image_id in enumerate(job.ids):
        found = boxes_of(entries.get(image_id, {}), table)
        mask = box_mask(entries[image_id], found, job.card["preprocess"]) if found else None
        if mask is None or not mask.any():
            unboxed.append(image_id)
        else:
            masks[i] = mask
    return masks, unboxed


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


def _per_map(seconds: float, records: list) -> float:
    return round(seconds / max(1, len(records)), 4)
