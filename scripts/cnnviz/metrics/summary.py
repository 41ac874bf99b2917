"""`cnnviz metrics-summary`: one model's metrics over all shards, as a table, flags and plots.

Writes into `out_dir` (`{results}/{model}/metrics/`): `summary.json` (shape in cnnviz.metrics'
docstring), `deletion_insertion.png` (mean curves per method) and `randomization.png` (mean
Spearman and SSIM against the cumulative layers randomized, per method).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import read_json, write_json
from ..failures import failure_of
from .run import REFERENCE

CLASS_THRESHOLD = 0.8

HOW_TO_READ = {
    "deletion_auc": "Area under the target-class probability while the map's most important "
    "pixels are replaced by the baseline first (x: fraction of pixels, 0 to 1): lower is "
    "better. Removing scattered pixels breaks any image fast (the 'random' row, a random "
    "pixel order, is therefore hard to beat for smooth maps such as CAMs), so maps of scattered "
    "pixels (gradients) score low partly for that reason: read it together with insertion.",
    "insertion_auc": "Area under the target-class probability while the image's pixels are put "
    "back onto the baseline in the map's order: higher is better, and a useful map is clearly "
    "above the 'random' row (a method that is not is flagged).",
    "randomized_spearman": "Spearman rank correlation between the map of the trained model and "
    "the map of the same model with all its weights replaced by random ones (the last point of "
    "randomization.png): it should be near 0; above the threshold the method is flagged, "
    "because its maps do not depend on what the model learned.",
    "half_randomized_spearman": "The same correlation at the first cut where at least half of "
    "the layers (from the top) are random: a method above the threshold there is flagged too "
    "(its maps follow the image's low-level structure more than what the model learned).",
    "randomized_ssim": "Structural similarity (SSIM, 1 = identical) of the same two maps, each "
    "scaled to [0, 1]: it should fall as more layers are randomized.",
    "randomization_spearman": "Mean Spearman correlation with the original maps at each cut, "
    "the named layer being the lowest one randomized (all layers above it are random too).",
    "class_spearman": "Spearman rank correlation between the map of the explained class and the "
    "map of another class of the same image (second: the next most probable class, some "
    "likeness expected; last: the least probable class): near 1 means the map shows the image, "
    "not the class.",
    "flags": "Each flag names a method and the metric that says its maps should not be trusted "
    "for that property (the value and the threshold are beside it).",
    "road_morf": "ROAD (Rong et al. 2022), most relevant first: mean target probability after "
    "the map's top pixels (each fraction of road_fractions) are removed and filled in from their "
    "neighbours (noisy linear imputation, so the hole's shape gives nothing away): lower is "
    "better.",
    "road_lerf": "ROAD, least relevant first: the same with the map's least relevant pixels "
    "removed: higher is better (the class should survive losing what the map calls unimportant).",
    "road_gap": "ROAD's LeRF minus MoRF: higher is better; near 0 (or below the 'random' row) "
    "the map's order says little about what the model uses.",
    "pointing_game": "Pointing game (Zhang et al. 2016): the share of maps whose maximum lies in "
    "the image's object box (images.boxes): higher is better; the 'random' row is about the "
    "boxes' share of the image.",
    "energy_pointing_game": "Energy-based pointing game (Wang et al. 2020): the share of the "
    "map's positive mass inside the boxes: higher is better; a uniform map scores the boxes' "
    "share of the image.",
    "sparseness": "Gini index of |map| (Chalasani et al. 2020): 0 = every pixel alike, 1 = one "
    "pixel holds everything; higher is better (a few named pixels are easier to read), as long "
    "as ROAD and the pointing games stay good.",
    "complexity": "Entropy of |map| / sum |map| (Bhatt et al. 2020): 0 = one pixel, log(H W) = "
    "uniform; lower is better.",
    "max_sensitivity": "Max-sensitivity (Yeh et al. 2019): the largest relative change "
    "||m(x + d) - m(x)|| / ||m(x)|| of the map over a few seeded uniform input perturbations "
    "|d| <= radius: lower is better (a tiny input change should not redraw the map), but 0 "
    "can also mean a map that ignores the input (deconvnet without pooling switches): read it "
    "with the class sensitivity and the randomization test.",
    "ranking": "Each metric orders the methods best first ('better' says which way); 'random' "
    "is the yardstick: a method ranked below it on a metric is no better than chance there. "
    "No method wins everywhere: CAMs tend to lead on localization and ROAD, gradients on "
    "sparseness.",
}
# (column of the per-method table, which way is better) for the ranking, in reading order.
RANKED = (
    ("road_gap_mean", "higher"),
    ("road_morf_mean", "lower"),
    ("road_lerf_mean", "higher"),
    ("insertion_auc_mean", "higher"),
    ("deletion_auc_mean", "lower"),
    ("pointing_game_mean", "higher"),
    ("energy_pointing_game_mean", "higher"),
    ("sparseness_mean", "higher"),
    ("complexity_mean", "lower"),
    ("max_sensitivity_mean", "lower"),
    ("randomized_spearman_mean", "lower"),
    ("class_last_spearman_mean", "lower"),
)


def _stats(values: list[float | None], none_as: float | None = None) -> tuple[float | None, ...]:
    vals = [none_as if v is None else v for v in values]
    vals = [float(v) for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def collect(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """{method: [per-shard metrics JSON, ...]} from the files (ordered by shard)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(map(Path, paths)):
        if failure_of(path) is not None:
            continue  # the report lists that job's failure
        data = read_json(path)
        by_method[str(data.get("method", path.stem))].append(data)
    return dict(sorted(by_method.items()))


def summarize(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write summary.json, deletion_insertion.png and randomization.png; return the summary."""
    out_dir = Path(out_dir)
    by_method = collect(paths)
    shards = [d for docs in by_method.values() for d in docs]
    settings = shards[0]["settings"] if shards else {}
    threshold = float(settings.get("randomization", {}).get("threshold", 0.5))
    class_threshold = float(settings.get("class_sensitivity", {}).get("threshold", CLASS_THRESHOLD))
    methods: dict[str, dict[str, Any]] = {}
    spearman_by_cut: dict[str, dict[str, Any]] = {}
    ssim_by_cut: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, Any]] = {}
    randomization: dict[str, dict[str, Any]] = {}
    flags: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for method, docs in by_method.items():
        images = [r for d in docs for r in d.get("images", [])]
        failed += [{"method": method, "shard": d.get("shard"), **f} for d in docs
                   for f in d.get("failed", [])]  # fmt: skip
        row: dict[str, Any] = {"maps": len(images)}
        for key in ("deletion_auc", "insertion_auc", "sparseness", "complexity",
                    "max_sensitivity"):  # fmt: skip
            if any(key in r for r in images):
                row[f"{key}_mean"], row[f"{key}_std"] = _stats([r.get(key) for r in images])
        roads = [r["road"] for r in images if r.get("road")]
        pairs = (("road_morf", "morf_mean"), ("road_lerf", "lerf_mean"), ("road_gap", "gap"))
        for name, key in pairs if roads else ():
            row[f"{name}_mean"], row[f"{name}_std"] = _stats([r[key] for r in roads])
        boxed = [r for r in images if "pointing_game" in r]
        if boxed:
            row["boxed_maps"] = len(boxed)
            row["pointing_game_mean"], _ = _stats([r["pointing_game"] for r in boxed])
            row["energy_pointing_game_mean"], row["energy_pointing_game_std"] = _stats(
                [r["energy_pointing_game"] for r in boxed]
            )
        cuts = next((d["randomization_cuts"] for d in docs if d.get("randomization_cuts")), [])
        ranked = [r["randomization"] for r in images if r.get("randomization")]
        if cuts and ranked:
            names = [c["cut"] for c in cuts]
            # A map that became constant keeps none of the original's order: counted as 0.
            steps = range(len(names))
            rho = [_stats([r[k]["spearman"] for r in ranked], none_as=0.0) for k in steps]
            sim = [_stats([r[k]["ssim"] for r in ranked]) for k in steps]
            spearman_by_cut[method] = {n: round(m, 4) for n, (m, _) in zip(names, rho, strict=True)}
            ssim_by_cut[method] = {n: round(m, 4) for n, (m, _) in zip(names, sim, strict=True)}
            randomization[method] = {"cuts": cuts, "spearman": rho, "ssim": sim}
            row["randomized_spearman_mean"], row["randomized_spearman_std"] = rho[-1]
            row["randomized_ssim_mean"], row["randomized_ssim_std"] = sim[-1]
            row["randomized_flat_maps"] = sum(bool(r[-1]["flat"]) for r in ranked)
            # Adebayo et al.'s finding for guided backprop: maps that survive randomizing the
            # top half of the network show low-level image structure, not the model's reasoning.
            half = next(k for k, c in enumerate(cuts) if c["fraction"] >= 0.5)
            row["half_randomized_spearman_mean"] = rho[half][0]
            if half < len(cuts) - 1 and rho[half][0] is not None and rho[half][0] > threshold:
                top, total = cuts[half]["layers"], cuts[-1]["layers"]
                flags.append({"method": method, "metric": "half_randomized_spearman",
                              "value": round(rho[half][0], 4), "threshold": threshold,
                              "reason": f"the maps barely change with the top {top} of {total} "
                                        "layers random: they show low-level image structure "
                                        "more than what the model learned"})  # fmt: skip
            if rho[-1][0] is not None and rho[-1][0] > threshold:
                flags.append({"method": method, "metric": "randomized_spearman",
                              "value": round(rho[-1][0], 4), "threshold": threshold,
                              "reason": "the maps barely change when every weight is random: "
                                        "they do not reflect what the model learned"})  # fmt: skip
        kinds = sorted({k for r in images for k in r.get("class_sensitivity", {})})
        for kind in kinds:
            values = [r["class_sensitivity"][kind]["spearman"] for r in images
                      if kind in r.get("class_sensitivity", {})]  # fmt: skip
            mean, std = _stats(values)
            row[f"class_{kind}_spearman_mean"], row[f"class_{kind}_spearman_std"] = mean, std
            if kind == "last" and mean is not None and mean > class_threshold:
                flags.append({"method": method, "metric": "class_last_spearman",
                              "value": round(mean, 4), "threshold": class_threshold,
                              "reason": "the map for the least probable class looks like the map "
                                        "for the explained one: it shows the image, not the "
                                        "class"})  # fmt: skip
        methods[method] = row
        fractions = next((d["fractions"] for d in docs if d.get("fractions")), [])
        if images and fractions:
            curves[method] = {
                "fractions": fractions,
                "deletion": np.mean([r["deletion_curve"] for r in images], axis=0),
                "insertion": np.mean([r["insertion_curve"] for r in images], axis=0),
            }
        timing[method] = _timing(docs)
    reference = methods.get(REFERENCE)
    if reference and reference["insertion_auc_mean"] is not None:
        # Only insertion is held against the random order: deleting scattered random pixels
        # wrecks any image fast (off the data), so smooth maps (CAMs, occlusion) rarely beat it
        # on deletion although they find the object.
        bar = reference["insertion_auc_mean"]
        for method, row in methods.items():
            value = row["insertion_auc_mean"]
            if method != REFERENCE and value is not None and value <= bar:
                flags.append({"method": method, "metric": "insertion_auc", "value": round(value, 4),
                              "threshold": round(bar, 4),
                              "reason": "inserting pixels in the map's order brings the class "
                                        "back no faster than a random order"})  # fmt: skip
    if reference and reference.get("road_gap_mean") is not None:
        # ROAD's gap is free of deletion's shape leak: a random order's gap is near 0.
        bar = reference["road_gap_mean"]
        for method, row in methods.items():
            value = row.get("road_gap_mean")
            if method != REFERENCE and value is not None and value <= bar:
                flags.append({"method": method, "metric": "road_gap", "value": round(value, 4),
                              "threshold": round(bar, 4),
                              "reason": "removing the map's most relevant pixels first hurts the "
                                        "class no more (relative to removing its least relevant) "
                                        "than a random order does"})  # fmt: skip
    for method, row in methods.items():
        row["flags"] = ", ".join(f["metric"] for f in flags if f["method"] == method)
    model = next((d.get("model") for d in shards), None)
    unboxed = sorted({i for d in shards if d.get("boxes") for i in d.get("unboxed", [])})
    summary = {
        "description": f"How far the explanations of model {model!r} can be trusted: deletion "
        "and insertion (Petsiuk et al. 2018), the model-parameter randomization test (Adebayo "
        "et al. 2018) and class sensitivity, per method (mean and standard deviation over the "
        f"maps; '{REFERENCE}' is a random pixel order, the reference). See how_to_read.",
        "model": model,
        "reference": REFERENCE if reference else None,
        "maps": sum(r["maps"] for m, r in methods.items() if m != REFERENCE),
        "shards": sorted({str(d.get("shard")) for d in shards}),
        "how_to_read": HOW_TO_READ,
        "methods": _rounded(methods),
        "ranking": ranking(methods),
        "flags": flags,
        "road_fractions": next((d["road_fractions"] for d in shards if d.get("road_fractions")),
                               []),
        "images_without_box": unboxed,
        "randomization_spearman": spearman_by_cut,
        "randomization_ssim": ssim_by_cut,
        "timing_s_per_map": timing,
        "settings": settings,
        "plots": {"deletion_insertion": "deletion_insertion.png",
                  "randomization": "randomization.png"},
        "failed": failed,
    }  # fmt: skip
    write_json(out_dir / "summary.json", summary)
    plot_curves(curves, out_dir / "deletion_insertion.png", model, settings)
    plot_randomization(randomization, out_dir / "randomization.png", model, threshold)
    return summary


def _timing(docs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    maps = [d.get("timing", {}).get("maps", 0) for d in docs]
    for key in ("deletion_insertion_s_per_map", "road_s_per_map", "randomization_s_per_map",
                "class_sensitivity_s_per_map", "max_sensitivity_s_per_map"):  # fmt: skip
        pairs = [(d["timing"][key], n) for d, n in zip(docs, maps, strict=True)
                 if key in d.get("timing", {}) and n]  # fmt: skip
        if pairs:
            out[key] = round(sum(v * n for v, n in pairs) / sum(n for _, n in pairs), 4)
    return out


def ranking(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric of RANKED that some method has: the methods best first, with the reading guide.

    {"metric", "better", "guide", "order": [{"rank", "method", "value"}]}; equal values (at 4
    digits) share a rank.
    """
    out = []
    for column, better in RANKED:
        values = {m: round(r[column], 4) for m, r in methods.items() if r.get(column) is not None}
        if not values:
            continue
        sign = -1.0 if better == "higher" else 1.0
        order = sorted(values, key=lambda m: (sign * values[m], m))
        rows: list[dict[str, Any]] = []
        for k, method in enumerate(order):
            tied = rows and rows[-1]["value"] == values[method]
            rows.append({"rank": rows[-1]["rank"] if tied else k + 1, "method": method,
                         "value": values[method]})  # fmt: skip
        metric = column.removesuffix("_mean")
        guide = HOW_TO_READ.get(metric) or HOW_TO_READ.get(metric.replace("class_last", "class"))
        out.append({"metric": metric, "better": better, "guide": guide, "order": rows})
    return out


def _rounded(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for m, row in methods.items()}  # fmt: skip


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    table = colormaps["tab20"].colors
    return {name: table[(2 * i) % 20 + (2 * i) // 20 % 2] for i, name in enumerate(names)}


def plot_curves(
    curves: dict[str, dict[str, Any]], out: Path, model: Any, settings: dict[str, Any]
) -> Path:
    """Mean deletion and insertion curves per method (the reference dashed, black)."""
    from matplotlib.figure import Figure

    from ..render import save_figure

    figure = Figure(figsize=(13, 4.8), dpi=100)
    colours = _colours([m for m in curves if m != REFERENCE])
    for col, kind in enumerate(("deletion", "insertion")):
        axes = figure.add_subplot(1, 2, col + 1)
        for method, data in curves.items():
            x = np.asarray(data["fractions"])
            areas = [
                float((np.diff(x) * (y[1:] + y[:-1]) / 2).sum())
                for y in (np.asarray(data["deletion"]), np.asarray(data["insertion"]))
            ]
            style = (
                {"color": "black", "linestyle": "--"}
                if method == REFERENCE
                else {"color": colours[method]}
            )
            label = f"{method}: {areas[0]:.3f} / {areas[1]:.3f}" if col == 0 else None
            axes.plot(x, np.asarray(data[kind]), linewidth=1.6, label=label, **style)
        better = "lower" if kind == "deletion" else "higher"
        axes.set_title(
            f"{kind.capitalize()}: mean curve per method ({better} is better)", fontsize=10
        )
        key = "baseline" if kind == "deletion" else "insertion_baseline"
        verb = "removed" if kind == "deletion" else "inserted"
        axes.set_xlabel(f"fraction of pixels {verb} (baseline: {settings.get(key, '?')})")
        axes.set_ylabel("target class probability")
        axes.set_xlim(0, 1)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if not curves:
            axes.text(0.5, 0.5, "no maps", ha="center", transform=axes.transAxes)
    if curves:
        figure.legend(
            loc="center right", fontsize=8, title="AUC: deletion / insertion", title_fontsize=8
        )
    figure.suptitle(f"{model}: deletion and insertion (Petsiuk et al. 2018)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    return save_figure(out, figure)  # fmt: skip


def plot_randomization(
    results: dict[str, dict[str, Any]], out: Path, model: Any, threshold: float
) -> Path:
    """Mean Spearman and SSIM (band: one standard deviation) against the cumulative cuts."""
    from matplotlib.figure import Figure

    from ..render import save_figure

    figure = Figure(figsize=(12.5, 4.8), dpi=100)
    colours = _colours(list(results))
    for col, metric in enumerate(("spearman", "ssim")):
        axes = figure.add_subplot(1, 2, col + 1)
        labels: list[str] = []
        low = -0.2
        for method, data in results.items():
            labels = ["none (trained)"] + [f"{c['cut']} ({c['layers']})" for c in data["cuts"]]
            mean = np.array([1.0] + [m if m is not None else np.nan for m, _ in data[metric]])
            std = np.array([0.0] + [s if s is not None else np.nan for _, s in data[metric]])
            x = np.arange(len(mean))
            label = method if col == 0 else None
            axes.plot(x, mean, marker="o", linewidth=1.6, color=colours[method], label=label)
            axes.fill_between(x, mean - std, mean + std, color=colours[method], alpha=0.15)
            low = min(low, float(np.nanmin(mean - std)) - 0.05)
        if labels:
            axes.set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        else:
            axes.text(
                0.5,
                0.5,
                "no method ran the randomization test",
                ha="center",
                transform=axes.transAxes,
            )
        if metric == "spearman":
            axes.axhline(threshold, color="grey", linestyle=":", linewidth=1)
        axes.axhline(0.0, color="black", linewidth=0.6)
        axes.set_ylim(max(-1.05, low), 1.05)
        axes.set_xlabel("randomized from the logits down to (layers randomized)")
        axes.set_ylabel("Spearman rank correlation" if metric == "spearman" else "SSIM")
        axes.set_title("similarity to the trained model's maps: should fall", fontsize=10)
        axes.grid(alpha=0.3)
    if results:
        figure.legend(loc="center right", fontsize=8)
    figure.suptitle(f"{model}: model-parameter randomization (Adebayo et al. 2018)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    return save_figure(out, figure)
