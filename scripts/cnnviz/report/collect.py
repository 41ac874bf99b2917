"""Read a results folder into plain data for the report: images, predictions, maps, timings.

Everything is discovered by globbing, so a step that has not run (or failed) simply leaves its
part empty. Layouts read (README "Artifacts"):

- staged images: `images/{shard}.json` + `images/{shard}/{id}.png` (also the older
  `images/shards/{shard}.json` + `images/{id}.png`);
- `{model}/predictions/{shard}.json`, `{model}/activations/{shard}/{shard}.json` (stats) with
  `{model}/activations/{shard}/{id}/{layer}.png` (grids) and `{layer}_ch{c}.png` (channels);
- per-image methods, per shard: `{model}/{method}/{shard}/index.json` + `maps.npy` (and
  `signed.npy`, `projections.npy`; cnnviz.methods.shard_maps), one row per image and target (or
  layer), with the pictures the render step drew in `{model}/pictures/{method}/{shard}/`
  (`pictures.json`); a row without a picture is still a map. The older per-image layout,
  `{model}/{method}/**/{image}_c{target}.png` + `.json` ({"method", "image", "target", "label",
  "layer", "time_s", "notes"}), is read too: any PNG whose JSON names an "image" counts;
- `{model}/filters|neurons/**/{layer}.{mode}.png` + `.json` + `.curve.png`;
  `{model}/atlas/**/{layer}.png` + `.json` + `{layer}/ch*.png` strips (atlas-reduce writes
  `atlas/layers/`);
  `{model}/metrics/*.json` (summary.json first, with the plots it names) and
  `metrics/*/**.json` (per shard and method: linked);
- `benchmarks/{rule}/...{model}...tsv` (Snakemake's job timings);
- job failure markers (`job-failed.json`, `*.job-failed.json`, see cnnviz.failures) under
  `models/{model}/` and `{model}/`: jobs that failed on bad input, and the jobs skipped for it.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import registry
from ..artifacts import read_json
from ..failures import find_failures, root_cause

RESERVED = {"predictions", "activations", "filters", "neurons", "atlas", "metrics", "pictures",
            "class_models"}
# Display order of the per-image methods (the registry's); unknown methods follow, sorted.
METHOD_ORDER = list(registry.METHODS)
_TARGET_STEM = re.compile(r"^(?P<image>.+)_c(?P<target>\d+)$")


@dataclass
class StagedImage:
    id: str
    source: str = ""
    path: Path | None = None
    shard: str = ""
    width: int | None = None
    height: int | None = None
    truth: str | None = None  # a ground-truth class (name or index) when the manifest gives one


@dataclass
class Explanation:
    """One per-image map of a method (one image, one target class or layer): its picture, when
    one was drawn, and its row of the shard's array file."""

    method: str
    image: str
    png: Path | None
    info: dict[str, Any]
    maps: Path | None = None  # the shard's maps folder (shard_maps), None for the older layout
    row: int | None = None

    def raw(self) -> Any:
        """The raw map (float32 [H, W]) or, for projections, the [k, 3, H, W] stack; None when
        it was not written."""
        import numpy as np

        if self.maps is not None and self.row is not None:
            return np.asarray(_shard_array(self.maps)[self.row], np.float32)
        legacy = self.png.with_suffix(".npy") if self.png is not None else None
        return np.load(legacy) if legacy is not None and legacy.exists() else None

    @property
    def target(self) -> int | None:
        value = self.info.get("target")
        return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None

    @property
    def layer(self) -> str | None:
        layer = self.info.get("layer")
        return str(layer) if layer is not None else None

    @property
    def time_s(self) -> float | None:
        value = self.info.get("time_s", self.info.get("seconds"))
        return float(value) if isinstance(value, int | float) else None

    @property
    def notes(self) -> list[str]:
        notes = self.info.get("notes") or []
        return [str(n) for n in (notes if isinstance(notes, list) else [notes])]

    @property
    def approximate(self) -> bool:
        return bool(self.info.get("approximate")) or any("approx" in n.lower() for n in self.notes)

    @property
    def sort_key(self) -> tuple[int, str, str]:
        target = self.target
        name = self.png.name if self.png is not None else ""
        return (target if target is not None else -1, self.layer or "", name)


@dataclass
class ModelResults:
    name: str
    dir: Path
    card: dict[str, Any] | None = None
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    eps: float | None = None
    act_stats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    act_dirs: dict[str, Path] = field(default_factory=dict)
    sparsity: list[Path] = field(default_factory=list)
    explanations: dict[str, dict[str, list[Explanation]]] = field(default_factory=dict)
    filters: list[dict[str, Any]] = field(default_factory=list)
    neurons: list[dict[str, Any]] = field(default_factory=list)  # filters.neurons' pictures
    atlas: list[dict[str, Any]] = field(default_factory=list)
    class_models: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    metric_details: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    jobs_failed: list[dict[str, str]] = field(default_factory=list)  # see failed_jobs()
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds (sum of jobs)

    @property
    def methods(self) -> list[str]:
        known = [m for m in METHOD_ORDER if m in self.explanations]
        return known + sorted(set(self.explanations) - set(known))

    @property
    def labels(self) -> list[str]:
        return list((self.card or {}).get("labels") or [])

    def label(self, index: int | None) -> str:
        labels = self.labels
        if index is None:
            return ""
        return labels[index] if 0 <= index < len(labels) else f"class {index}"

    def top_classes(self, n: int = 5) -> list[tuple[str, int]]:
        counts = Counter(top[0]["label"] for top in self.predictions.values() if top)
        return counts.most_common(n)

    def layer_grids(self, image_id: str) -> dict[str, Path]:
        """{file stem: path} of the activation PNGs of one image (grids and channels)."""
        folder = self.act_dirs.get(image_id)
        if folder is None or not folder.is_dir():
            return {}
        return {p.stem: p for p in folder.glob("*.png")}


@lru_cache(maxsize=64)
def _shard_array(folder: Path) -> Any:
    """A maps folder's array (maps, or projections), memory-mapped, read once per process."""
    from ..methods.shard_maps import read_array, read_index

    index = read_index(folder)
    return read_array(folder, index, "projections" if index.get("kind") == "projections"
                      else "maps")  # fmt: skip


def _visible(path: Path, root: Path) -> bool:
    """Not a temp file of an atomic write (".name.xxx") nor inside a hidden folder."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _json(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- staged images


def _manifests(results_dir: Path) -> list[Path]:
    folder = results_dir / "images"
    found = sorted(folder.glob("*.json")) + sorted((folder / "shards").glob("*.json"))
    return [p for p in found if _visible(p, results_dir)]


def _staged_path(results_dir: Path, manifest: Path, entry: dict[str, Any]) -> Path | None:
    """The staged PNG of a manifest entry, preferring a copy inside the results folder."""
    name = f"{entry['id']}.png"
    candidates = [
        manifest.parent / manifest.stem / name,  # images/{shard}/{id}.png
        manifest.parent / name,  # images/{id}.png (manifest in images/)
        manifest.parent.parent / name,  # images/shards/{shard}.json -> images/{id}.png
    ]
    given = Path(str(entry.get("path", "")))
    if given.is_absolute():
        candidates.append(given)
    else:
        candidates.insert(0, results_dir.parent / given)  # relative to the workflow's folder
    for path in candidates:
        if path.is_file():
            return path
    return None


def staged_images(results_dir: Path) -> tuple[dict[str, StagedImage], list[dict[str, str]]]:
    """{id: StagedImage} in manifest order, and the images that failed staging."""
    images: dict[str, StagedImage] = {}
    failed: list[dict[str, str]] = []
    for manifest in _manifests(results_dir):
        data = _json(manifest)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            continue
        for entry in data["images"]:
            if not isinstance(entry, dict) or "id" not in entry:
                continue
            truth = entry.get("label", entry.get("truth"))
            images[str(entry["id"])] = StagedImage(
                id=str(entry["id"]),
                source=str(entry.get("source", "")),
                path=_staged_path(results_dir, manifest, entry),
                shard=manifest.stem,
                width=entry.get("width"),
                height=entry.get("height"),
                truth=None if truth is None else str(truth),
            )
        for item in data.get("failed") or []:
            failed.append(_failure(item, "staging"))
    return images, _unique(failed)


def _failure(item: Any, step: str) -> dict[str, str]:
    if not isinstance(item, dict):
        return {"source": str(item), "error": "", "step": step}
    images = item.get("images")
    listed = ", ".join(map(str, images)) if isinstance(images, list) else ""
    source = item.get("source") or item.get("image") or item.get("id") or listed
    return {"source": str(source), "error": str(item.get("error", "")), "step": step}


def _unique(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for row in rows:
        key = (row["source"], row["error"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# --------------------------------------------------------------------------- one model


def model_results(results_dir: Path, name: str) -> ModelResults:
    card_path = results_dir / "models" / name / "model.json"
    card = _json(card_path) if card_path.exists() else None
    if not isinstance(card, dict) or "job_failed" in card:
        card = None  # missing, or the export failed (listed in jobs_failed)
    model = ModelResults(name, results_dir / name, card)
    failed: list[dict[str, str]] = []
    _read_predictions(model, failed)
    _read_activations(model, failed)
    _read_methods(model, failed)
    _read_filters(model)
    _read_filters(model, "neurons")
    _read_class_models(model)
    _read_atlas(model)
    _read_metrics(model)
    model.failed = _unique(failed)
    model.jobs_failed = failed_jobs(results_dir, [results_dir / "models" / name, model.dir])
    model.timings = step_timings(results_dir, name)
    return model


def failed_jobs(results_dir: Path, folders: list[Path]) -> list[dict[str, str]]:
    """One row per job that left failure markers in `folders`: its step, the job (its first
    output, relative to the results), the reason, and for a skipped job the root cause."""
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for record in find_failures(folder):
            outputs = tuple(record.get("outputs") or [record["marker"]])
            first = Path(outputs[0])
            try:
                job = str(first.resolve().relative_to(results_dir.resolve()))
            except ValueError:
                job = first.name
            cause = root_cause(record)
            rows.setdefault((str(record.get("step")),) + outputs, {
                "step": str(record.get("step", "?")), "job": job,
                "error": str(record.get("error", "")),
                "skipped": "yes" if cause is not record else "",
                "cause_step": str(cause.get("step", "")) if cause is not record else "",
            })  # fmt: skip
    return sorted(rows.values(), key=lambda r: (r["skipped"], r["step"], r["job"]))


def _read_predictions(model: ModelResults, failed: list[dict[str, str]]) -> None:
    folder = model.dir / "predictions"
    for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        data = _json(path)
        if not isinstance(data, dict) or not _visible(path, folder):
            continue
        for entry in data.get("images") or []:
            top = [
                {
                    "index": int(t.get("index", -1)),
                    "label": str(t.get("label", f"class {t.get('index')}")),
                    "prob": float(t.get("prob", 0.0)),
                }
                for t in entry.get("top") or []
            ]
            model.predictions[str(entry["id"])] = top
        failed += [_failure(item, "predictions") for item in data.get("failed") or []]


def _read_activations(model: ModelResults, failed: list[dict[str, str]]) -> None:
    folder = model.dir / "activations"
    if not folder.is_dir():
        return
    described: set[Path] = set()
    for path in sorted(folder.rglob("*.json")):
        data = _json(path)
        if not _visible(path, folder) or not isinstance(data, dict):
            continue
        if "layers" not in data or "images" not in data:
            continue
        model.layers = model.layers or list(data["layers"])
        model.eps = data.get("eps", model.eps)
        for entry in data["images"]:
            image_id = str(entry["id"])
            model.act_stats[image_id] = entry.get("layers", {})
            model.act_dirs[image_id] = path.parent / image_id
            described.add(path.parent / image_id)
        failed += [_failure(item, "activations") for item in data.get("failed") or []]
    for plot in sorted(folder.rglob("sparsity*.png")):
        model.sparsity.append(plot)
    for png in sorted(folder.rglob("*.png")):
        if png.parent not in described and png not in model.sparsity and _visible(png, folder):
            model.others.append(png)


def _read_methods(model: ModelResults, failed: list[dict[str, str]]) -> None:
    if not model.dir.is_dir():
        return
    for folder in sorted(p for p in model.dir.iterdir() if p.is_dir()):
        if folder.name in RESERVED or folder.name.startswith("."):
            continue
        _read_shard_maps(model, folder)
        for path in sorted(folder.rglob("*.json")):
            if not _visible(path, folder) or (path.with_suffix(".png")).exists():
                continue
            if path.name == "index.json":
                continue
            data = _json(path)
            if isinstance(data, dict):
                failed += [_failure(item, folder.name) for item in data.get("failed") or []]
        for png in sorted(folder.rglob("*.png")):
            if not _visible(png, folder):
                continue
            info = _json(png.with_suffix(".json")) if png.with_suffix(".json").exists() else None
            if not isinstance(info, dict) or "image" not in info:
                match = _TARGET_STEM.match(png.stem)
                if not match:
                    model.others.append(png)
                    continue
                info = {"image": match["image"], "target": int(match["target"])}
            method = str(info.get("method") or folder.name)
            entry = Explanation(method, str(info["image"]), png, info)
            model.explanations.setdefault(method, {}).setdefault(entry.image, []).append(entry)
    for per_image in model.explanations.values():
        for entries in per_image.values():
            entries.sort(key=lambda e: e.sort_key)


def _read_shard_maps(model: ModelResults, folder: Path) -> None:
    """One method's shards in the array layout: an entry per index row, with its picture when
    the render step drew one."""
    from ..methods.shard_maps import pictures_dir, read_pictures

    for index_path in sorted(folder.glob("*/index.json")):
        shard = index_path.parent
        index = _json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("rows"), list):
            continue
        drawn_dir = pictures_dir(shard)
        drawn = read_pictures(drawn_dir)
        for row in index["rows"]:
            if not isinstance(row, dict) or "image" not in row or "row" not in row:
                continue
            method = str(row.get("method") or index.get("method") or folder.name)
            png = drawn_dir / drawn[row["row"]] if row["row"] in drawn else None
            info = {"method": method, **row}
            entry = Explanation(method, str(row["image"]), png if png and png.is_file() else None,
                                info, shard, int(row["row"]))  # fmt: skip
            model.explanations.setdefault(method, {}).setdefault(entry.image, []).append(entry)


def _read_filters(model: ModelResults, kind: str = "filters") -> None:
    """`{model}/{kind}/{layer}.{mode}.png` + `.json` + `.curve.png`: kind "filters" (each
    filter's channel, or filters.objective) or "neurons" (each filter's centre unit)."""
    folder = model.dir / kind
    found = getattr(model, kind)
    for png in sorted(folder.rglob("*.png")) if folder.is_dir() else []:
        if png.name.endswith(".curve.png") or not _visible(png, folder):
            continue
        info = _json(png.with_suffix(".json")) if png.with_suffix(".json").exists() else None
        info = info if isinstance(info, dict) else {}
        layer, _, mode = png.stem.rpartition(".")
        curve = png.with_name(png.stem + ".curve.png")
        found.append(
            {
                "png": png,
                "curve": curve if curve.exists() else None,
                "layer": str(info.get("layer") or layer or png.stem),
                "mode": str(info.get("mode") or mode),
                "info": info,
            }
        )


def _read_class_models(model: ModelResults) -> None:
    """`{model}/class_models/class_models.png` + `.json` + `.curve.png` (methods.class_models)."""
    folder = model.dir / "class_models"
    png = folder / "class_models.png"
    if not png.exists() or not _visible(png, folder):
        return
    info = _json(png.with_suffix(".json")) if png.with_suffix(".json").exists() else None
    curve = folder / "class_models.curve.png"
    model.class_models = {"png": png, "curve": curve if curve.exists() else None,
                          "info": info if isinstance(info, dict) else {}}


def _read_atlas(model: ModelResults) -> None:
    """Per layer its picture, JSON and per-channel strips ({layer}/ch*.png beside {layer}.json,
    as the JSON names them: {channel: path}; the report's page of the layer shows them)."""
    folder = model.dir / "atlas"
    for png in sorted(folder.rglob("*.png")) if folder.is_dir() else []:
        if not _visible(png, folder) or (png.parent.parent / f"{png.parent.name}.json").is_file():
            continue  # a temp file, or a channel's strip (read with its layer)
        info = _json(png.with_suffix(".json")) if png.with_suffix(".json").exists() else None
        info = info if isinstance(info, dict) else {}
        strips: dict[int, Path] = {}
        for channel in info.get("channels") or []:
            if isinstance(channel, dict) and channel.get("strip"):
                path = png.parent / str(channel["strip"])
                if path.is_file():
                    strips[int(channel.get("channel", -1))] = path
        model.atlas.append({"png": png, "layer": str(info.get("layer") or png.stem), "info": info,
                            "strips": strips})  # fmt: skip


def _read_metrics(model: ModelResults) -> None:
    """Top-level JSON files (summary.json first) with the plots they name or share a stem with;
    JSON files in subfolders (per shard and method) are details, linked rather than shown."""
    folder = model.dir / "metrics"
    if not folder.is_dir():
        return
    used: set[Path] = set()
    top = sorted(p for p in folder.glob("*.json") if _visible(p, folder))
    top.sort(key=lambda p: p.name != "summary.json")
    for path in top:
        data = _json(path)
        plots: list[tuple[str, Path]] = []
        named = data.get("plots") if isinstance(data, dict) else None
        for key, rel in (named or {}).items() if isinstance(named, dict) else []:
            png = folder / str(rel)
            if png.is_file() and png not in used:
                plots.append((str(key), png))
                used.add(png)
        same = path.with_suffix(".png")
        if same.is_file() and same not in used:
            plots.append((path.stem, same))
            used.add(same)
        model.metrics.append({"name": path.stem, "path": path, "data": data, "plots": plots})
    for png in sorted(p for p in folder.rglob("*.png") if _visible(p, folder)):
        if png not in used:
            name = png.relative_to(folder).with_suffix("").as_posix()
            model.metrics.append({"name": name, "path": None, "data": None, "plots": [(name, png)]})
    model.metric_details = sorted(
        p for p in folder.rglob("*.json") if p.parent != folder and _visible(p, folder)
    )


# --------------------------------------------------------------------------- timings


def _benchmark_seconds(path: Path) -> float:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0.0
    total = 0.0
    for row in rows:
        try:
            total += float(row.get("s") or 0.0)
        except ValueError:
            continue
    return total


def step_timings(results_dir: Path, model: str) -> dict[str, float]:
    """{step: seconds}, the sum of Snakemake's benchmark files that belong to `model`.

    Files are `benchmarks/{rule}/{model}/...tsv` or `benchmarks/{rule}/{model}.tsv`; for the
    explain rule the step is named after the method (`benchmarks/explain/{model}/{method}/`).
    """
    root = results_dir / "benchmarks"
    timings: dict[str, float] = {}
    if not root.is_dir():
        return timings
    for rule_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = list((rule_dir / model).rglob("*.tsv")) if (rule_dir / model).is_dir() else []
        files += [rule_dir / f"{model}.tsv"] if (rule_dir / f"{model}.tsv").is_file() else []
        for path in files:
            rel = path.relative_to(rule_dir / model) if path.parent != rule_dir else Path()
            step = rule_dir.name
            if rule_dir.name == "explain" and len(rel.parts) > 1:
                step = rel.parts[0]
            timings[step] = timings.get(step, 0.0) + _benchmark_seconds(path)
    return timings
