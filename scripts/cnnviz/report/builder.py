"""The HTML report: index -> one page per model -> one page per image, from whatever results exist.

Pages (all under the report folder, by default results/report/):

- `index.html`: the run at a glance (images, failures, models, top classes, compute time), one
  row per model, the staging failures, and the run's provenance and config (`#run`).
- `{model}.html`: summary, the image table (sortable and filterable; per image one strip with
  every method's map: the method x image grid), layer by layer (sparsity, blank channels, an
  example grid, filters, atlas), filters, atlas, metrics, failures, provenance. It never embeds
  per-image activation grids, so a model with 1,000 images still opens in well under 2 s.
- `{model}/{image}.html`: everything about one image: its predictions, every method's pictures,
  every layer's activation grid; links back, and to the previous and next image.
- `{model}/atlas/{layer}.html`: the feature atlas of one layer: every chosen channel's top-k
  projections above their receptive-field patches, each column linked to its image's page.

A model page is a list of sections; a section builder looks at the results and returns
`Section`s (or nothing when its results are absent); a small partial template draws each. A new
step plugs in by adding a builder to SECTION_BUILDERS. Pictures nobody claims still appear in
"Other pictures", so none is ever left out.

Pictures are linked where the steps wrote them, by relative links; only thumbnails and strips
are written (report/thumbs/). The portable unit is therefore the results folder (portable.py
zips exactly what the pages reach). `self_contained=True` writes one HTML file with every
picture embedded instead (standalone.py). JavaScript only sorts and filters tables; without
it, every table is complete and every picture is there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from ..artifacts import write_with
from ..pictures import truth_matches
from ..render import SEPARATOR, grid_shape
from . import captions
from .collect import Explanation, ModelResults, StagedImage, model_results, staged_images
from .links import Links, page_id
from .provenance import config_yaml, format_duration, model_rows, run_rows
from .thumbs import GAP, SMALL_SIDE, THUMB_SIDE, TILE, Thumbnails, strip_width

TEMPLATES = Path(__file__).parent / "templates"
STEP_ORDER = ["export", "stage_shard", "predict", "activations", "sparsity"]


# --------------------------------------------------------------------------- data


@dataclass
class Run:
    results_dir: Path
    title: str
    images: dict[str, StagedImage]
    failed: list[dict[str, str]]
    models: list[ModelResults]
    config: dict[str, Any]
    provenance: dict[str, Any]
    date: str = ""
    audit: dict[str, Any] | None = None  # audit.compare's data: what changed since a baseline

    @property
    def methods(self) -> list[str]:
        seen: list[str] = []
        for model in self.models:
            seen += [m for m in model.methods if m not in seen]
        return seen

    @property
    def compute_seconds(self) -> float:
        return sum(sum(m.timings.values()) for m in self.models)


@dataclass
class Section:
    """A block of a model page, drawn by `templates/{template}` with `section` in scope."""

    id: str
    title: str
    template: str
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class ModelContext:
    """What a section builder may look at for one model."""

    run: Run
    model: ModelResults
    rows: list[dict[str, Any]]  # the image table (see image_rows)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def card(self) -> dict[str, Any] | None:
        return self.model.card

    @property
    def results_dir(self) -> Path:
        return self.run.results_dir


SectionBuilder = Callable[[ModelContext], "Section | list[Section] | None"]


def image_ids(run: Run, model: ModelResults) -> list[str]:
    """Staged images in manifest order, then any image only the model's results name."""
    ids = list(run.images)
    extra = set(model.predictions) | set(model.act_stats)
    for per_image in model.explanations.values():
        extra |= set(per_image)
    return ids + sorted(extra - set(ids))


def _pick(entries: list[Explanation], top: list[dict[str, Any]]) -> Explanation:
    """The picture for the predicted class when there is one, else the first."""
    best = top[0]["index"] if top else None
    return next((e for e in entries if e.target == best), entries[0])


def image_rows(run: Run, model: ModelResults) -> list[dict[str, Any]]:
    rows = []
    for image_id in image_ids(run, model):
        image = run.images.get(image_id)
        top = model.predictions.get(image_id, [])
        truth = image.truth if image else None
        cells, undrawn = {}, 0
        for method in model.methods:
            every = model.explanations[method].get(image_id) or []
            entries = [e for e in every if e.png is not None]  # the drawn ones (report.pictures)
            undrawn += len(every) - len(entries)
            if entries:
                cells[method] = {"entry": _pick(entries, top), "count": len(entries)}
        strip = (
            [cells[m]["entry"].png if m in cells else None for m in model.methods],
            [cells[m]["count"] - 1 if m in cells else 0 for m in model.methods],
        )
        rows.append(
            {
                "id": image_id,
                "image": image,
                "top": top,
                "truth": truth,
                "correct": truth_matches(truth, top[0]) if truth and top else None,
                "in_top": any(truth_matches(truth, t) for t in top) if truth and top else None,
                "cells": cells,
                "undrawn": undrawn,  # maps of this image without a picture (report.pictures)
                "strip_sources": strip,  # one picture per method, for the grid's row
                "strip": None,  # the strip file, once written (write_pages)
            }
        )
    return rows


# --------------------------------------------------------------------------- sections


def summary_section(ctx: ModelContext) -> Section:
    model, rows = ctx.model, ctx.rows
    predicted = sum(1 for r in rows if r["top"])
    judged = [r for r in rows if r["correct"] is not None]
    accuracy = None
    if judged:
        accuracy = {
            "top1": sum(r["correct"] for r in judged) / len(judged),
            "topk": sum(bool(r["in_top"]) for r in judged) / len(judged),
            "n": len(judged),
            "k": max(len(r["top"]) for r in judged),
        }
    methods = []
    for method in model.methods:
        entries = [e for per in model.explanations[method].values() for e in per]
        times = [e.time_s for e in entries if e.time_s is not None]
        methods.append(
            {
                "method": method,
                "title": captions.method_title(method),
                "summary": captions.method_summary(method),
                "images": len(model.explanations[method]),
                "maps": len(entries),
                "mean_time": (sum(times) / len(times)) if times else None,
                "approximate": sum(e.approximate for e in entries),
            }
        )
    steps = sorted(
        model.timings.items(),
        key=lambda kv: (STEP_ORDER.index(kv[0]) if kv[0] in STEP_ORDER else 99, kv[0]),
    )
    return Section(
        "summary", "Summary", "_summary.html",
        {"predicted": predicted, "total": len(rows),
         "failed": len(model.failed) + len(ctx.run.failed),
         "layers": len(model.layers or (model.card or {}).get("layers", [])),
         "methods": methods, "accuracy": accuracy, "top_classes": model.top_classes(8),
         "steps": [(s, format_duration(v)) for s, v in steps],
         "time": format_duration(sum(model.timings.values())) if model.timings else None},
        note="The run for this model at a glance. Compute time is the sum of the Snakemake jobs' "
        "wall times (benchmarks/).",
    )  # fmt: skip


def images_section(ctx: ModelContext) -> Section | None:
    if not ctx.rows:
        return None
    model = ctx.model
    k = max((len(r["top"]) for r in ctx.rows), default=0)
    classes = sorted({r["top"][0]["label"] for r in ctx.rows if r["top"]})
    return Section(
        "images", "Images", "_images.html",
        {"rows": ctx.rows, "methods": [(m, captions.method_short(m), captions.method_summary(m))
                                       for m in model.methods],
         "has_truth": any(r["truth"] for r in ctx.rows), "k": k, "classes": classes,
         "heat": any(captions.uses_heat(m) for m in model.methods),
         "strip_width": strip_width(len(model.methods)), "tile": TILE, "gap": GAP},
        note="One row per image: the input, the model's top prediction, then one small map per "
        "method for the predicted class. Click a row's maps or its name for the image's page: "
        "every map full size and every layer's activations. Click a column header to sort.",
    )  # fmt: skip


def _grid_size(shape: list[int]) -> tuple[int, int]:
    """(width, height) in px of render.channel_grid for a [C, H, W] activation (for layout)."""
    if len(shape) != 3:
        return 768, 768
    c, h, w = (max(1, int(v)) for v in shape)
    rows, cols = grid_shape(c)
    down = math.ceil(cols * w / 1024) if cols * w > 1024 else 1
    h, w = max(1, h // down), max(1, w // down)
    up = max(1, 768 // (cols * w)) if down == 1 else 1
    th, tw = h * up, w * up
    return cols * (tw + SEPARATOR) - SEPARATOR, rows * (th + SEPARATOR) - SEPARATOR


def layers_section(ctx: ModelContext) -> Section | None:
    model = ctx.model
    if not (model.act_stats or model.sparsity or model.filters or model.atlas):
        return None
    layers = model.layers or (model.card or {}).get("layers", [])
    example_id = next((r["id"] for r in ctx.rows if r["id"] in model.act_dirs), None)
    example = model.layer_grids(example_id) if example_id else {}
    filters = {}
    for item in model.filters:
        filters.setdefault(item["layer"], item)
    atlas = {item["layer"]: item for item in model.atlas}
    table = []
    for row in layers:
        values = [s[row["name"]] for s in model.act_stats.values() if row["name"] in s]
        blank = [float(v["blank_fraction"]) for v in values if "blank_fraction" in v]
        peaks = [float(v["max"]) for v in values if "max" in v]
        table.append(
            {
                "name": row["name"],
                "depth": row.get("depth", ""),
                "shape": "\u00d7".join(str(v) for v in row.get("shape", [])),
                "activation": row.get("activation") or "none",
                "blank": sum(blank) / len(blank) if blank else None,
                "blank_min": min(blank) if blank else None,
                "blank_max": max(blank) if blank else None,
                "peak": sum(peaks) / len(peaks) if peaks else None,
                "grid": example.get(row["name"]),
                "filter": filters.get(row["name"]),
                "atlas": atlas.get(row["name"]),
            }
        )
    return Section(
        "layers", "Layers", "_layers.html",
        {"sparsity": [{"png": p, "caption": captions.SPARSITY_CAPTION} for p in model.sparsity],
         "table": table, "example": example_id, "eps": model.eps,
         "has_filters": bool(filters), "has_atlas": bool(atlas)},
        note="Every conv layer, shallow to deep. Blank = the share of channels that never fire "
        "on an image (mean over images, with the range). The example column shows each "
        f"layer's channels for {example_id or 'the first image'}; every image's grids are on "
        "its own page.",
    )  # fmt: skip


def _optimized_pictures(ctx: ModelContext, found: list[dict[str, Any]], anchor: str
                        ) -> dict[str, Any]:
    """The filters / neurons section's data: shallow to deep (then lucent before seed), so the
    progression the seed describes shows; `anchor` prefixes each pair's id."""
    depth = {row["name"]: i for i, row in enumerate((ctx.model.card or {}).get("layers", []))}
    ordered = sorted(found, key=lambda it: (depth.get(it["layer"], 1 << 30), it["layer"],
                                            it["mode"]))
    items = [
        {**item, "caption": captions.filter_caption(item),
         "curve_caption": captions.curve_caption(item) if item["curve"] else ""}
        for item in ordered
    ]  # fmt: skip
    return {"items": items, "anchor": anchor}


def filters_section(ctx: ModelContext) -> Section | None:
    if not ctx.model.filters:
        return None
    return Section(
        "filters", "Filter visualization", "_filters.html",
        _optimized_pictures(ctx, ctx.model.filters, "filter"),
        note="What each filter looks for, with no image at all: an input optimized by gradient "
        "ascent to excite one filter, beside the optimization's progress.",
    )  # fmt: skip


def neurons_section(ctx: ModelContext) -> Section | None:
    if not ctx.model.neurons:
        return None
    return Section(
        "neurons", "What one unit responds to", "_filters.html",
        _optimized_pictures(ctx, ctx.model.neurons, "neuron"),
        note="The same filters, but each picture excites only the unit at the centre of the "
        "filter's map (lucent's neuron objective), so the pattern appears once, where that unit "
        "looks, and its size shows the unit's receptive field; a filter picture tiles its "
        "pattern everywhere.",
    )  # fmt: skip


def class_models_section(ctx: ModelContext) -> Section | None:
    item = ctx.model.class_models
    if not item:
        return None
    info = item["info"]
    rows = [
        {**row, "logit": max(row.get("final_logit") or [0.0]),
         "probability": max(row.get("final_probability") or [0.0])}
        for row in info.get("classes", [])
    ]  # fmt: skip
    return Section(
        "class-models", "What each class looks like to the model", "_class_models.html",
        {"item": item, "rows": rows, "caption": captions.class_models_caption(info),
         "curve_caption": captions.class_models_curve_caption(info)},
        note="Pictures made from nothing by gradient ascent to raise one class's score (its "
        "logit, before softmax; Simonyan et al. 2014): what the model has learned to call that "
        "class, not a photo of it. Shown for the classes the model predicted most often in "
        "this run, and any the config names.",
    )  # fmt: skip


def atlas_section(ctx: ModelContext) -> Section | None:
    if not ctx.model.atlas:
        return None
    ids = {row["id"] for row in ctx.rows}
    items = [{**item, "caption": captions.atlas_caption(item),
              "facts": _scalars(item["info"]), "channels": atlas_channels(item, ids)}
             for item in ctx.model.atlas]  # fmt: skip
    return Section(
        "atlas",
        "Feature atlas",
        "_atlas.html",
        {"items": items},
        note="For each channel of a layer, the images of this run that excite it most; each "
        "layer's page shows every chosen channel with links to the images.",
    )


def atlas_channels(item: dict[str, Any], ids: set[str]) -> list[dict[str, Any]]:
    """The rows of a layer's atlas page: per channel with a strip (atlas-reduce's
    {layer}/ch*.png) its tiles: rank, image (`linked` when it has a page), value, and where its
    column lies in the strip (percent of the strip's width, for the link over each column)."""
    info = item["info"]
    geometry = info.get("strip") if isinstance(info.get("strip"), dict) else {}
    cell, sep = int(geometry.get("cell", 48)), int(geometry.get("sep", 1))
    k = int(info.get("top_k") or 1)
    width = k * (cell + sep) - sep
    rows = []
    for channel in info.get("channels") or []:
        strip = item.get("strips", {}).get(int(channel.get("channel", -1)))
        if strip is None:
            continue
        tiles = [{"rank": j + 1, "image": str(top["image"]), "value": top.get("value"),
                  "pre": top.get("pre"), "linked": str(top["image"]) in ids,
                  "left": round(100 * j * (cell + sep) / width, 3),
                  "width": round(100 * cell / width, 3)}
                 for j, top in enumerate(channel.get("top") or [])]  # fmt: skip
        rows.append({"channel": int(channel["channel"]), "strip": strip, "tiles": tiles,
                     "selectivity": channel.get("selectivity"), "width": width,
                     "height": 2 * cell + sep})  # fmt: skip
    return rows


def metrics_section(ctx: ModelContext) -> Section | None:
    model = ctx.model
    if not model.metrics and not model.metric_details:
        return None
    items = []
    for item in model.metrics:
        data = item["data"]
        note = ""
        if isinstance(data, dict):
            note = str(data.get("description") or data.get("note") or "")
        lead = 0
        if item["name"] == "summary" and isinstance(data, dict) and "methods" in data:
            tables = summary_tables(data)
            first = ("Methods ranked", "Reading guide", "Per method", "Flags")
            lead = sum(t["title"].startswith(first) for t in tables)
        else:
            tables = metric_tables(data) if data is not None else []
        items.append(
            {"name": item["name"], "note": note, "tables": tables, "path": item["path"],
             "lead": lead,
             "figures": [{"png": png, "caption": captions.metric_caption(key)}
                         for key, png in item["plots"]]}
        )  # fmt: skip
    return Section(
        "metrics", "Metrics", "_metrics.html",
        {"items": items, "details": model.metric_details, "root": model.dir / "metrics"},
        note="How far the maps can be trusted, as written by the metrics step "
        f"(results/{model.name}/metrics/). Hover a column name for how to read it.",
    )  # fmt: skip


def others_section(ctx: ModelContext) -> Section | None:
    if not ctx.model.others:
        return None
    figures = [
        {"png": p, "caption": f"{p.relative_to(ctx.model.dir).as_posix()}: a picture no "
         "section describes (no JSON beside it names its image; left over from an earlier run?)."}
        for p in ctx.model.others
    ]  # fmt: skip
    return Section(
        "others",
        "Other pictures",
        "_gallery.html",
        {"figures": figures},
        note="Pictures in this model's results that no other section shows.",
    )


def failed_jobs_section(ctx: ModelContext) -> Section | None:
    rows = ctx.model.jobs_failed
    if not rows:
        return None
    return Section(
        "failed-jobs",
        "Failed jobs",
        "_failed_jobs.html",
        {"rows": rows, "with_model": False},
        note="These jobs stopped on bad input and wrote the reason instead of their results; "
        "the rest of the run went on. Fix what the reason names and run again: the jobs whose "
        "settings changed rerun.",
    )


def failed_section(ctx: ModelContext) -> Section | None:
    rows = ctx.run.failed + ctx.model.failed
    if not rows:
        return None
    return Section(
        "failed",
        "Failed images",
        "_failed.html",
        {"rows": rows},
        note="These inputs were skipped; the reason says what to fix. The other images ran.",
    )


def audit_section(ctx: ModelContext) -> Section | None:
    """A stamped run compared with its baseline (cnnviz.audit.compare), for this model."""
    audit = ctx.run.audit
    model = (audit or {}).get("models", {}).get(ctx.name)
    if audit is None or model is None:
        return None
    return Section(
        "audit", "What changed since the last audit", "_audit.html",
        {"audit": audit, "model": model},
        note=f"This run ({audit.get('run_id', '')}) against run {audit.get('baseline', '')}: "
        "the model file, the config, each image's top-1 prediction and how each method's map "
        "correlates with the earlier one (32 x 32 copies; 1 = the same picture).",
    )  # fmt: skip


def provenance_section(ctx: ModelContext) -> Section:
    return Section(
        "provenance", "Provenance", "_provenance.html",
        {"model": model_rows(ctx.results_dir, ctx.name, ctx.card),
         "card_missing": ctx.card is None},
        note="The model file this page describes; the software and config of the run are on "
        "the index page.",
    )  # fmt: skip


SECTION_BUILDERS: list[SectionBuilder] = [
    summary_section,
    failed_jobs_section,
    audit_section,
    images_section,
    layers_section,
    filters_section,
    neurons_section,
    class_models_section,
    atlas_section,
    metrics_section,
    others_section,
    failed_section,
    provenance_section,
]


# --------------------------------------------------------------------------- helpers


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scalars(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), _fmt(v)) for k, v in data.items() if isinstance(v, str | int | float | bool)]


def summary_tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics/summary.json: the per-method table first, its column help from "how_to_read"."""
    how = data.get("how_to_read") if isinstance(data.get("how_to_read"), dict) else {}

    def tip(column: str) -> str:
        for key in (column, column.removesuffix("_mean"), column.removesuffix("_std")):
            if key in how:
                return str(how[key])
        return ""

    tables = ranking_tables(data.get("ranking"))
    methods = data.get("methods")
    if isinstance(methods, dict) and methods:
        rows = [{"method": k, **v} if isinstance(v, dict) else {"method": k, "value": v}
                for k, v in methods.items()]  # fmt: skip
        tables += metric_tables(rows)
        tables[-1]["title"] = "Per method"
    flags = data.get("flags")
    if flags:
        flagged = metric_tables(flags if isinstance(flags, list) else [flags])
        tables += [{**t, "title": "Flags: maps not to be trusted for a property"} for t in flagged]
    skip = {"description", "how_to_read", "methods", "flags", "plots", "failed", "settings",
            "ranking"}  # fmt: skip
    tables += metric_tables({k: v for k, v in data.items() if k not in skip})
    if isinstance(data.get("settings"), dict):
        rows = [[str(k), _cell(v)] for k, v in data["settings"].items()]
        tables.append(_table("Settings", ["name", "value"], rows))
    if how:
        rows = [[str(k), str(v)] for k, v in how.items()]
        tables.append(_table("How to read", ["metric", "meaning"], rows))
    for table in tables:
        table["tips"] = {c: table.get("tips", {}).get(c) or tip(c) for c in table["columns"]}
    return tables


def ranking_tables(ranking: Any) -> list[dict[str, Any]]:
    """summary.json's "ranking": one column per metric, the methods best first (a leaderboard),
    then the reading guide (what good looks like per metric)."""
    if not isinstance(ranking, list) or not ranking:
        return []
    arrow = {"higher": "↑", "lower": "↓"}
    columns = ["rank"] + [f"{r['metric']} {arrow.get(r['better'], '')}" for r in ranking]
    depth = max(len(r["order"]) for r in ranking)
    rows = [[str(k + 1)] + [f"{r['order'][k]['method']} ({_fmt(r['order'][k]['value'])})"
                            if k < len(r["order"]) else "" for r in ranking]
            for k in range(depth)]  # fmt: skip
    board = _table("Methods ranked by each metric (best first; ↑ higher is better, ↓ lower)",
                   columns, rows)  # fmt: skip
    board["tips"] = {c: str(r.get("guide") or "") for c, r in zip(columns[1:], ranking,
                                                                    strict=True)}  # fmt: skip
    guide = _table("Reading guide: what good looks like", ["metric", "better", "meaning"],
                   [[r["metric"], r["better"], str(r.get("guide") or "")] for r in ranking])
    return [board, guide]


def _table(title: str, columns: list[str], rows: list[list[str]], more: int = 0) -> dict:
    return {"title": title, "columns": columns, "rows": rows, "more": more}


def _records(title: str, items: list[Any], limit: int) -> dict[str, Any] | None:
    """A list of dicts as one table (the union of their keys as columns); None otherwise."""
    dicts = [i for i in items if isinstance(i, dict)]
    if not dicts or len(dicts) != len(items):
        return None
    columns: list[str] = []
    for item in dicts:
        columns += [str(k) for k in item if str(k) not in columns]
    rows = [[_cell(item.get(c, "")) for c in columns] for item in dicts[:limit]]
    return _table(title, columns, rows, len(dicts) - len(rows))


def _cell(value: Any) -> str:
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(_fmt(v) for v in value[:50]) + (" …" if len(value) > 50 else "")
    if isinstance(value, dict | list):
        return json.dumps(value)[:300]
    return _fmt(value)


def _plain(value: Any) -> bool:
    """A scalar, or a list of scalars: one cell of a name/value table."""
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) for v in value)
    return not isinstance(value, dict)


def metric_tables(data: Any, limit: int = 200) -> list[dict[str, Any]]:
    """Any JSON as a few tables: {"title", "columns", "rows", "more"} (rows of strings).

    Scalars and lists of scalars go in one name/value table; a dict of dicts or a list of dicts
    becomes a table of its own; empty containers are left out.
    """
    if isinstance(data, list):
        table = _records("", data, limit)
        return [table or _table("", ["value"], [[_cell(v)] for v in data[:limit]])]
    if not isinstance(data, dict):
        return [_table("", ["value"], [[_fmt(data)]])]
    plain = [
        [str(k), _cell(v)]
        for k, v in data.items()
        if k not in ("description", "note") and _plain(v) and v != []
    ]
    tables = [_table("", ["name", "value"], plain)] if plain else []
    for key, value in data.items():
        if not value or _plain(value):
            continue
        if isinstance(value, list):
            table = _records(str(key), value, limit)
        elif all(isinstance(v, dict) for v in value.values()):
            table = _records(str(key), [{"name": k, **v} for k, v in value.items()], limit)
        else:
            table = _table(
                str(key), ["name", "value"], [[str(k), _cell(v)] for k, v in value.items()]
            )
        if table:
            tables.append(table)
    return tables


@lru_cache(maxsize=4096)
def picture_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the picture's header, for layout before it loads."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return picture.size
    except (OSError, ValueError):
        return None


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = lambda v, digits=1: "" if v is None else f"{100 * float(v):.{digits}f}%"
    env.filters["num"] = _fmt
    env.filters["duration"] = format_duration
    env.globals["picture_size"] = picture_size
    env.globals["method_title"] = captions.method_title
    return env


@lru_cache(maxsize=1)
def assets() -> tuple[Markup, Markup]:
    """The inline CSS (with the colour bars) and JavaScript of every page."""
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8") + captions.colour_bar_css()
    js = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    return Markup(css), Markup(js.replace("</", "<\\/"))


def model_sections(ctx: ModelContext, builders: Iterable[SectionBuilder]) -> list[Section]:
    sections: list[Section] = []
    for builder in builders:
        made = builder(ctx)
        if made is None:
            continue
        sections.extend(made if isinstance(made, list) else [made])
    return sections


# --------------------------------------------------------------------------- pages


class Site:
    """Renders the page fragments (what goes inside <main>) for any kind of links."""

    def __init__(self, run: Run, builders: Iterable[SectionBuilder] | None = None) -> None:
        self.run = run
        self.env = _environment()
        self.rows = {m.name: image_rows(run, m) for m in run.models}
        builders = list(SECTION_BUILDERS if builders is None else builders)
        self.sections = {
            m.name: model_sections(ModelContext(run, m, self.rows[m.name]), builders)
            for m in run.models
        }

    def fragment(self, template: str, link: Links, **context: Any) -> Markup:
        html = self.env.get_template(template).render(link=link, run=self.run, **context)
        return Markup(html)

    def index(self, link: Links) -> Markup:
        models = []
        for model in self.run.models:
            rows = self.rows[model.name]
            judged = [r for r in rows if r["correct"] is not None]
            models.append(
                {"name": model.name, "card": model.card or {}, "model": model,
                 "predicted": sum(1 for r in rows if r["top"]), "total": len(rows),
                 "failed": len(model.failed),
                 "failed_jobs": sum(1 for r in model.jobs_failed if not r["skipped"]),
                 "time": sum(model.timings.values()) if model.timings else None,
                 "accuracy": sum(r["correct"] for r in judged) / len(judged) if judged else None,
                 "sections": [s for s in self.sections[model.name]
                              if s.id not in ("summary", "provenance")]}
            )  # fmt: skip
        failed = len(self.run.failed) + sum(len(m.failed) for m in self.run.models)
        failed_jobs = [dict(row, model=m.name) for m in self.run.models for row in m.jobs_failed]
        return self.fragment(
            "index.html", link, models=models, failed=failed, failed_jobs=failed_jobs,
            run_rows=run_rows({"date": self.run.date, **self.run.provenance}),
            config=config_yaml(self.run.config),
            compute=format_duration(self.run.compute_seconds) if self.run.compute_seconds
            else None,
        )  # fmt: skip

    def model(self, model: ModelResults, link: Links) -> Markup:
        return self.fragment(
            "model.html", link, model=model, card=model.card or {},
            sections=self.sections[model.name],
        )  # fmt: skip

    def image(self, model: ModelResults, position: int, link: Links) -> Markup:
        rows = self.rows[model.name]
        row = rows[position]
        image_id = row["id"]
        methods = []
        for method in model.methods:
            every = model.explanations[method].get(image_id, [])
            if not every:
                continue
            entries = [e for e in every if e.png is not None]
            figures = [
                {"entry": e, "heat": captions.uses_heat(method, e.info),
                 "caption": captions.explanation_caption(
                     method, e.info, e.info.get("label") or model.label(e.target))}
                for e in entries
            ]  # fmt: skip
            methods.append(
                {"method": method, "title": captions.method_title(method),
                 "summary": captions.method_summary(method), "figures": figures,
                 "undrawn": [_undrawn(e, model, self.run.results_dir)
                             for e in every if e.png is None]}
            )  # fmt: skip
        grids = model.layer_grids(image_id)
        stats = model.act_stats.get(image_id, {})
        layers = []
        for layer in model.layers:
            png = grids.pop(layer["name"], None)
            if png is None:
                continue
            width, height = _grid_size(layer.get("shape", []))
            layers.append(
                {"name": layer["name"], "png": png, "width": width, "height": height,
                 "stats": stats.get(layer["name"], {}),
                 "caption": captions.activation_caption(
                     layer, image_id, stats.get(layer["name"], {}))}
            )  # fmt: skip
        channels = []
        for stem, png in sorted(grids.items()):
            name, _, channel = stem.rpartition("_ch")
            caption = (
                captions.channel_caption(name, channel, image_id)
                if name and channel.isdigit()
                else f"{stem} for {image_id}: an activation picture no stats file describes."
            )
            channels.append({"png": png, "caption": caption})
        return self.fragment(
            "image.html", link, model=model, row=row, methods=methods, layers=layers,
            channels=channels,
            prev=rows[position - 1]["id"] if position > 0 else None,
            next=rows[position + 1]["id"] if position + 1 < len(rows) else None,
        )  # fmt: skip

    def atlas_pages(self, model: ModelResults) -> list[dict[str, Any]]:
        """The atlas section's items that get a page of their own (those with strips)."""
        return [item for section in self.sections[model.name] if section.id == "atlas"
                for item in section.data["items"] if item["channels"]]  # fmt: skip

    def atlas(self, model: ModelResults, item: dict[str, Any], link: Links) -> Markup:
        return self.fragment("atlas_layer.html", link, model=model, item=item)

    def page(self, body: Markup, link: Links, title: str, current: str) -> str:
        css, js = assets()
        return self.env.get_template("page.html").render(
            link=link, run=self.run, body=body, title=title, current=current, css=css, js=js
        )


def _undrawn(entry: Explanation, model: ModelResults, results_dir: Path) -> str:
    """What the image page says of a map without a picture: its class or layer and its row."""
    what = entry.layer if entry.target is None else (entry.info.get("label")
                                                      or model.label(entry.target))
    if entry.maps is None:
        return str(what)
    try:
        where = entry.maps.relative_to(results_dir).as_posix()
    except ValueError:
        where = entry.maps.as_posix()
    return f"{what} (row {entry.row} of {where}/)"


def collect_run(
    results_dir: Path,
    config: dict[str, Any],
    models: list[str],
    provenance: dict[str, Any],
) -> Run:
    images, failed = staged_images(results_dir)
    title = str(((config.get("report") or {}).get("title")) or "cnnviz report")
    date = str(provenance.get("date") or time.strftime("%Y-%m-%d %H:%M"))
    return Run(
        results_dir, title, images, failed, [model_results(results_dir, m) for m in models],
        config, {k: v for k, v in provenance.items() if k != "date"}, date,
    )  # fmt: skip


def _request_thumbnails(site: Site, thumbs: Thumbnails) -> None:
    for image in site.run.images.values():
        if image.path is not None:
            thumbs.request(image.path, THUMB_SIDE)
    for model in site.run.models:
        for row in site.rows[model.name]:
            if row["cells"]:
                row["strip"] = thumbs.request_strip(f"{model.name}/{row['id']}",
                                                    *row["strip_sources"])  # fmt: skip
        for section in site.sections[model.name]:
            if section.id == "layers":
                for layer in section.data["table"]:
                    if layer["grid"] is not None:
                        thumbs.request(layer["grid"], THUMB_SIDE)
                    for item in (layer["filter"], layer["atlas"]):
                        if item is not None:
                            thumbs.request(item["png"], SMALL_SIDE)


def write_pages(site: Site, out_dir: Path, index_path: Path) -> Path:
    thumbs = Thumbnails(site.run.results_dir, out_dir / "thumbs")
    _request_thumbnails(site, thumbs)
    made = thumbs.make()
    for folder in {path.parent for path in thumbs.strips}:  # strips of an earlier run
        for old in set(folder.glob("*.png")) - set(thumbs.strips):
            old.unlink(missing_ok=True)
    run = site.run
    for model in run.models:
        link = Links(out_dir, out_dir, index_path.name, made)
        body = site.model(model, link)
        _write_text(
            out_dir / f"{model.name}.html",
            site.page(body, link, f"{model.name} \u00b7 {run.title}", model.name),
        )
        for item in site.atlas_pages(model):
            link = Links(out_dir, out_dir / model.name / "atlas", index_path.name, made)
            title = f"atlas {item['layer']} \u00b7 {model.name} \u00b7 {run.title}"
            _write_text(out_dir / model.name / "atlas" / f"{item['layer']}.html",
                        site.page(site.atlas(model, item, link), link, title, model.name))
        page_dir = out_dir / model.name
        for position, row in enumerate(site.rows[model.name]):
            link = Links(out_dir, page_dir, index_path.name, made)
            body = site.image(model, position, link)
            title = f"{row['id']} \u00b7 {model.name} \u00b7 {run.title}"
            _write_text(page_dir / f"{row['id']}.html", site.page(body, link, title, model.name))
    link = Links(out_dir, out_dir, index_path.name, made)
    return _write_text(index_path, site.page(site.index(link), link, run.title, "index"))


# --------------------------------------------------------------------------- entry point


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
    models: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    index: str | Path | None = None,
    self_contained: bool = False,
    audit: str | Path | None = None,
) -> Path:
    """Write the report and return the path of its index page.

    Multi-page (default): out_dir/index.html (or `index`, a file path; the other pages go beside
    it), out_dir/{model}.html, out_dir/{model}/{image}.html and thumbnails in out_dir/thumbs/.
    `self_contained=True`: one HTML file with every picture embedded (`index`, or
    out_dir/report.html), for attaching a small run to a ticket; see standalone.py.
    `models` defaults to every folder under results/models/. `audit`: a comparison with an
    earlier run (cnnviz.audit), drawn as each model's "What changed since the last audit".
    """
    results_dir = Path(results_dir)
    if index is not None:
        index_path = Path(index)
        out_dir = index_path.parent
    else:
        out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
        index_path = out_dir / ("report.html" if self_contained else "index.html")
    out_dir.mkdir(parents=True, exist_ok=True)
    if models is None:
        models_root = results_dir / "models"
        found = models_root.iterdir() if models_root.is_dir() else []
        models = sorted(p.name for p in found if p.is_dir())
    run = collect_run(results_dir, dict(config or {}), list(models), dict(provenance or {}))
    if audit is not None:
        run.audit = json.loads(Path(audit).read_text(encoding="utf-8"))
    site = Site(run)
    if self_contained:
        from .standalone import write_standalone

        return write_standalone(site, index_path)
    return write_pages(site, out_dir, index_path)


def _write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


__all__ = ["SECTION_BUILDERS", "ModelContext", "Section", "build_report", "page_id"]
