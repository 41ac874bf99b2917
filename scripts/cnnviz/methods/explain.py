"""`cnnviz explain`: one method over one shard of images, for one model.

The job loads the model once, builds the method's graph (one runner, cnnviz.runner), runs every
(image, target class) pair of the shard in batches, and writes the maps as one array file per
method and shard with an index (`shard_maps`; pictures are drawn later by `cnnviz render`,
cnnviz.pictures). A failure that belongs to one image or to
the method (an unknown class, an op without a backward rule) is written to `failed.json` with
its reason; the job still succeeds so that the other methods and the report finish.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import registry
from ..artifacts import write_json
from ..errors import CnnvizError, ConfigError
from . import backprop
from .common import known_classes, resolve_targets

log = logging.getLogger("cnnviz.explain")

# Each method yields, per job row: (image index, raw map [H, W] float32, the signed input-space
# signal [3, H, W] or None, extra info). The picture is drawn from these when the row is written:
# a signed signal as RGB (grey = 0), else the raw map's positive part over the image.
Result = tuple[int, np.ndarray, np.ndarray | None, dict[str, Any]]


@dataclass
class Job:
    """Everything a method needs for one shard: model, inputs, targets and settings."""

    model: onnx.ModelProto
    card: dict[str, Any]
    ids: list[str]
    inputs: np.ndarray  # [N, 3, H, W] preprocessed
    views: list[np.ndarray]  # uint8 [h, w, 3]: the region the model saw, at its own resolution
    rows: list[tuple[int, int]]  # (image index, target class) pairs, the unit of work
    options: dict[str, Any]
    device: str = "auto"
    threads: int | None = None
    batch_size: int = 8
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def fallback(self) -> str:
        """The engine's answer to an op without a backward rule (config `gradient_fallback`)."""
        return str(self.options.get("gradient_fallback", "error"))

    @property
    def row_inputs(self) -> np.ndarray:
        return self.inputs[[i for i, _ in self.rows]]

    @property
    def row_targets(self) -> list[int]:
        return [t for _, t in self.rows]


# ---- the methods ---------------------------------------------------------------------------
# Each method is one graph (cnnviz.methodgraph) run by the one runner (cnnviz.runner): the host
# feeds the staged inputs and targets and gets finished maps back.
def _runner(job: Job, graph: Any) -> Any:
    from ..runner import Runner

    return Runner(graph, job.device, job.threads)


def _images_per_call(job: Job, points: int = 1) -> tuple[int, int]:
    """(images, points) per call: `batch_size` rows, never more images than the job has."""
    from ..runner import chunk_plan

    images, points = chunk_plan(points, job.batch_size)
    return max(1, min(images, len(job.rows))), points


def _row_feeds(job: Job) -> dict[str, np.ndarray]:
    return {"images": job.row_inputs, "targets": np.asarray(job.row_targets, np.int64)}




def cam_family(job: Job, members: list[str] | tuple[str, ...]) -> dict[str, list[Result]]:
    """The CAM family's members from one (activations, gradients) run per chunk: one graph
    holds every requested variant (and guided Grad-CAM's guided backprop)."""
    from .cam import VARIANTS, cam_graph

    job = _for_method(job, members[0])  # the members share their options
    variants = [m for m in members if m in VARIANTS]
    guided = "guided_gradcam" in members
    images, _ = _images_per_call(job)
    graph = cam_graph(job.model, job.card, _cam_layer(job), images, variants, guided,
                      job.fallback)
    out = _runner(job, graph).run(_row_feeds(job))
    info = {"layer": graph.metadata["layer"]}
    results = {v: [(i, out[v][r], None, info) for r, (i, _) in enumerate(job.rows)]
               for v in variants}
    if guided:
        results["guided_gradcam"] = [
            (i, out["guided_gradcam"][r], out["guided_gradcam_signed"][r], info)
            for r, (i, _) in enumerate(job.rows)
        ]
    return results


def scorecam(job: Job) -> Iterator[Result]:
    """Score-CAM: the layer's maps of every image in one graph, each image's channels scored in
    another (blank and duplicate channels once: `cam.score_plan`), the weighted maps finished
    in a third."""
    from .cam import scorecam_graphs

    rows = max_rows(job.card, int(job.options["batch_size"]))  # masked inputs per call
    images, _ = _images_per_call(job)
    acts_graph, scores_graph, finish_graph, tensor = scorecam_graphs(
        job.model, job.card, _cam_layer(job), images, rows
    )
    acts = _runner(job, acts_graph).run({"images": job.inputs})["acts"]
    scorer = _runner(job, scores_graph)
    weights, infos = [], []
    for i, target in job.rows:
        w, counts = score_channels(scorer, job.inputs[i : i + 1], target, acts[i])
        weights.append(w)
        infos.append({"layer": tensor, **counts})
    index = [i for i, _ in job.rows]
    maps = _runner(job, finish_graph).run({"acts": acts[index], "weights": np.stack(weights)})
    for r, i in enumerate(index):
        yield i, maps["map"][r], None, infos[r]


def score_channels(scorer: Any, image: np.ndarray, target: int,
                   acts: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """One image's Score-CAM weights [C] (float32) and counts: `scorer` (the runner of
    `cam.scorecam_graphs`' scores graph) scores the image [1, 3, H, W] masked by its distinct
    channel maps `acts` [C, h, w], blank and duplicate channels once (`cam.score_plan`)."""
    from .cam import score_plan, score_weights

    constant, owner, unique = score_plan(acts)
    # one constant channel stands for all of them: its mask is zero, the blank input
    scored = np.concatenate([unique, np.flatnonzero(constant)[:1]])
    out = scorer.run({"images": image, "targets": np.array([target])}, {"lowres": acts[scored]})
    scores = np.zeros(len(owner))
    scores[scored] = out["scores"][0]
    scores = scores[owner]
    if constant.any():
        scores[constant] = scores[scored[-1]]
    counts = {"channels": len(owner), "constant": int(constant.sum()),
              "forward_passes": len(scored)}
    return score_weights(scores).astype(np.float32), counts


def _gradient_method(policy: str, signed: bool) -> Callable[[Job], Iterator[Result]]:
    """Saliency (policy gradient, shown as a heat map), guided backprop and deconvnet (signed)."""

    def run(job: Job) -> Iterator[Result]:
        images, _ = _images_per_call(job)
        graph = backprop.gradient_graph(job.model, policy, images, job.fallback)
        out = _runner(job, graph).run(_row_feeds(job))
        extra: dict[str, Any] = {"policy": policy} if signed else {}
        if policy == "deconvnet":
            extra.update(_deconvnet_note(job.model))
        for r, (i, _) in enumerate(job.rows):
            yield i, out["map"][r], (out["signed"][r] if signed else None), extra

    return run


def _deconvnet_note(model: onnx.ModelProto) -> dict[str, Any]:
    """Say so when the deconvnet map cannot depend on the image: without max pooling its rule
    never looks at the forward pass (projection_policy), so every image of a class gets the
    same map."""
    from .projection_policy import switches_below

    if any(switches_below(model, out.name) for out in model.graph.output):
        return {}
    return {"image_independent": True, "notes": [
        "the same map for every image of this class: the model has no max pooling, and "
        "without its switches the deconvnet never looks at the image (guided backprop does)"]}


saliency = _gradient_method("gradient", signed=False)
guided_backprop = _gradient_method("guided", signed=True)
deconvnet = _gradient_method("deconvnet", signed=True)


def smoothgrad(job: Job) -> Iterator[Result]:
    samples = int(job.options["samples"])
    noise_level = float(job.options["noise_level"])
    if samples < 1 or noise_level < 0:
        raise ConfigError(f"smoothgrad needs samples >= 1 and noise_level >= 0, got "
                          f"{samples}, {noise_level}")
    images, points = _images_per_call(job, samples)
    graph = backprop.smoothgrad_graph(job.model, images, points, noise_level, job.fallback)
    noise = backprop.unit_noise(samples, job.inputs.shape[1:], int(job.options["seed"]))
    weights = np.full(samples, 1.0 / samples, np.float32)
    out = _runner(job, graph).run(_row_feeds(job), {"noise": noise, "weights": weights})
    for r, (i, _) in enumerate(job.rows):
        yield i, backprop.channel_max_abs(out["signed"][r]), None, {"samples": samples}


def integrated_gradients(job: Job) -> Iterator[Result]:
    steps = int(job.options["steps"])
    alphas, weights = ig_points(str(job.options.get("method", "gausslegendre")), steps)
    images, points = _images_per_call(job, len(alphas))
    graph = backprop.integrated_gradients_graph(job.model, images, points, job.fallback)
    baseline = backprop.make_baseline(job.options["baseline"], job.inputs[0],
                                      job.card["preprocess"])
    out = _runner(job, graph).run(
        _row_feeds(job), {"alphas": alphas, "weights": weights}, {"baseline": baseline[None]}
    )
    for r, (i, _) in enumerate(job.rows):
        error = completeness_error(out["signed"][r], out["values"][r])
        raw = backprop.channel_max_abs(out["signed"][r])
        yield i, raw, None, {"steps": steps, "completeness_error": error}


def completeness_error(attributions: np.ndarray, values: np.ndarray) -> float:
    """|sum(attributions) - (f(x) - f(x0))| / |f(x) - f(x0)| for one image's IG attributions
    and its target logits at the path points, whose last two are x0 and x (`ig_points`)."""
    delta = float(values[-1]) - float(values[-2])
    total = float(np.asarray(attributions, np.float64).sum())
    return abs(total - delta) / max(abs(delta), 1e-12)


def ig_points(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) float32 of the path points a job runs: the rule's (`backprop.ig_rule`)
    and the two end points (weight 0), which give f(x0) and f(x) for the completeness error."""
    weights, alphas = backprop.ig_rule(method, steps)
    alphas = np.concatenate([alphas, [0.0, 1.0]]).astype(np.float32)
    return alphas, np.concatenate([weights, [0.0, 0.0]]).astype(np.float32)


def max_rows(card: dict[str, Any], rows: int) -> int:
    """`rows`, or fewer when the model's graph fixes its batch (export could not free it)."""
    fixed = card["input"]["shape"][0]
    return min(rows, fixed) if isinstance(fixed, int) and fixed > 0 else rows


def occlusion(job: Job) -> Iterator[Result]:
    from .occlusion import occlusion_graph, patch_counts, patch_origins

    window, stride = int(job.options["window"]), int(job.options["stride"])
    size = tuple(job.inputs.shape[-2:])
    origins = patch_origins(size, window, stride)
    # forward passes only: twice the rows of a gradient call fit in the same memory
    rows = max_rows(job.card, max(job.batch_size, 16))
    images, points = _images_per_call(dataclasses.replace(job, batch_size=rows), len(origins))
    graph = occlusion_graph(job.model, job.card, images, points, window)
    out = _runner(job, graph).run(_row_feeds(job), {"origins": origins})
    count = np.maximum(patch_counts(size, window, stride), 1)
    for r, (i, _) in enumerate(job.rows):
        raw = (out["total"][r] / count).astype(np.float32)
        yield i, raw, None, {"window": window, "stride": stride}


# Declared in cnnviz.registry (name, family, options, caption, "module:function").
METHODS = tuple(registry.METHODS)


def run_method(job: Job, method: str) -> Iterator[Result]:
    """One per-image method's results for job.rows (a family member from its family's one
    run), its options filled in from the registry's defaults where the job gives none."""
    spec = registry.METHODS[method]
    if spec.scored is False:
        raise CnnvizError(f"{method} writes its own rows (explain_shard), not per-row maps")
    job = _for_method(job, method)
    if spec.family:
        yield from registry.resolve(registry.FAMILIES[spec.family])(job, [method])[method]
    else:
        yield from registry.resolve(spec.run)(job)


def _cam_layer(job: Job) -> str | None:
    layer = job.options["cam_layer"]
    return None if layer in (None, "auto") else layer


# ---- the job -------------------------------------------------------------------------------
def load_job(
    model_dir: Path, manifest: Path, options: dict[str, Any], device: str, threads: int | None,
    batch_size: int, predictions: Path | None = None,
) -> tuple[Job, list[dict[str, Any]]]:
    """Read the model and the shard's images and pick each image's target classes (from the
    predict step's `predictions` JSON when it has what the target needs, else by predicting)."""
    from ..images import load_image, original_view, preprocess, read_manifest
    from ..modelcard import load_card, model_path
    from ..runtime import make_session
    from .predictions import predict

    card = load_card(model_dir)
    model = onnx.load(str(model_path(model_dir)))
    shard = read_manifest(manifest)
    failed = [dict(f, stage="staging") for f in shard.get("failed", [])]
    ids, inputs, views = [], [], []
    for entry in shard["images"]:
        image = load_image(entry["path"])
        ids.append(entry["id"])
        inputs.append(preprocess(image, card["preprocess"]))
        views.append(original_view(image, card["preprocess"]))
    batch = np.stack(inputs) if inputs else np.zeros((0, 3, *card["preprocess"]["size"]), "f4")
    batch_size = max_rows(card, batch_size)
    job = Job(model, card, ids, batch, views, [], options, device, threads, batch_size)
    if not ids:
        return job, failed
    spec, unknown = known_classes(card, options.get("target", registry.TARGET_DEFAULT))
    failed += [{"image": f"all {len(ids)} images", "error": error} for error in unknown]
    probs = _predicted(predictions, ids, card, spec)
    if probs is None:
        probs = predict(make_session(model, device, threads), card, list(batch), batch_size)
    for i, image_id in enumerate(ids):
        try:
            targets = resolve_targets(card, probs[i], spec)
        except CnnvizError as error:
            failed.append({"image": image_id, "error": str(error)})
            continue
        job.rows.extend((i, t) for t in targets)
    return job, failed


def _predicted(
    predictions: Path | None, ids: list[str], card: dict[str, Any], spec: Any
) -> np.ndarray | None:
    """Class scores [N, classes] holding each image's recorded top-k probabilities (zeros
    elsewhere), or None when the file is missing or failed, lacks an image, or the target asks
    for more classes than it ranked."""
    from ..artifacts import read_json
    from ..failures import failure_of

    if predictions is None or not Path(predictions).is_file() or failure_of(Path(predictions)):
        return None
    ranked = {entry["id"]: entry["top"] for entry in read_json(predictions).get("images", [])}
    need = int(spec["top_k"]) if isinstance(spec, dict) and "top_k" in spec else 1
    if any(len(ranked.get(i, [])) < need for i in ids):
        return None
    probs = np.zeros((len(ids), int(card["output"]["num_classes"])), np.float32)
    for row, image_id in enumerate(ids):
        for entry in ranked[image_id]:
            probs[row, int(entry["index"])] = float(entry["prob"])
    return probs


def explain_shard(
    model_dir: Path,
    manifest: Path,
    method: str | list[str],
    out_dir: Path | list[Path],
    options: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Compute `method` (or several methods, each with its own `out_dir`; members of one family
    such as the CAMs come from one run) for every image of the shard; write maps,
    `summary.json` and `failed.json` per method. Targets come from `predictions` (the predict
    step's JSON for the shard) when given, else from a forward pass."""
    methods = [method] if isinstance(method, str) else list(method)
    out_dirs = [Path(out_dir)] if isinstance(out_dir, (str, Path)) else [Path(d) for d in out_dir]
    if len(methods) != len(out_dirs):
        raise CnnvizError(f"{len(methods)} methods but {len(out_dirs)} output folders")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CnnvizError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    options = options or {}
    for folder in out_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    job, failed = load_job(Path(model_dir), Path(manifest), options, device, threads, batch_size,
                           predictions)
    outcome: dict[str, tuple[list, list]] = {m: ([], []) for m in methods}
    if "projections" in methods:
        outcome["projections"] = projections(
            _for_method(job, "projections"), out_dirs[methods.index("projections")]
        )
    computed = [m for m in methods if m != "projections"]
    if job.rows and computed:
        outcome.update(_run_methods(job, computed, [out_dirs[methods.index(m)] for m in computed]))
    summaries = {}
    for m, folder in zip(methods, out_dirs, strict=True):
        done, failures = outcome[m]
        summary = {"method": m, "model": job.card.get("name"), "maps": done,
                   "failed": failed + failures}
        write_json(folder / "summary.json", summary)
        write_json(folder / "failed.json", summary["failed"])
        summaries[m] = summary
    return summaries[methods[0]] if len(methods) == 1 else summaries


def _run_methods(job: Job, methods: list[str], out_dirs: list[Path]) -> dict[str, tuple]:
    """Compute the methods (a family's members together) and write each one's rows."""
    folders = dict(zip(methods, out_dirs, strict=True))
    groups: dict[str, list[str]] = {}
    for m in methods:
        groups.setdefault(registry.METHODS[m].family or m, []).append(m)
    outcome = {}
    for members in groups.values():
        started = time.perf_counter()
        try:
            family = registry.METHODS[members[0]].family
            if family:
                results = registry.resolve(registry.FAMILIES[family])(job, members)
            else:
                results = {members[0]: list(run_method(job, members[0]))}
        except CnnvizError as error:
            log.error("%s failed: %s", ", ".join(members), error)
            for m in members:
                outcome[m] = ([], [{"method": m, "images": job.ids, "error": str(error)}])
            continue
        count = sum(len(r) for r in results.values())
        seconds = (time.perf_counter() - started) / max(1, count)
        for m in members:
            outcome[m] = _write_rows(job, m, results[m], seconds, folders[m])
    return outcome


def _for_method(job: Job, method: str) -> Job:
    """The job with `method`'s own options filled in where the caller gave none (the
    registry's defaults: a CLI call or a test need not spell them out)."""
    return dataclasses.replace(job, options=registry.with_defaults(method, job.options))


def _write_rows(
    job: Job, method: str, results: list[Result], seconds: float, out_dir: Path
) -> tuple[list, list]:
    """Write one method's rows as one array file per shard and an index (shard_maps: raw maps,
    the signed signal of signed methods, per row image, target, label, info); the pictures are
    drawn by the render step. `seconds`: compute time per map."""
    from .shard_maps import write_shard_maps

    labels = job.card.get("labels") or []
    notes = approximation_notes(job, method)
    # signed attributions are drawn in a diverging colour map (render.relevance_picture)
    kind = {"picture": "relevance"} if registry.METHODS[method].reading == (
        registry.RELEVANCE_READING) else {}
    rows, maps, signals = [], [], []
    for r, (i, raw, signed, extra) in enumerate(results):
        target = job.rows[r][1]
        rows.append({
            "image": job.ids[i], "target": target, "method": method,
            **({"picture": "signed"} if signed is not None else {}),
            "label": labels[target] if target < len(labels) else str(target),
            "time_s": round(seconds, 4), **extra, **notes, **kind,
        })  # fmt: skip
        if extra.get("notes") and notes.get("notes"):
            rows[-1]["notes"] = [*extra["notes"], *notes["notes"]]
        maps.append(raw)
        signals.append(signed)
    done = write_shard_maps(out_dir, method, job.card.get("name"), rows, maps, signals)
    log.info("%s: %d maps, %.3f s per map", method, len(done), seconds)
    return [{"image": d["image"], "target": d["target"], "row": d["row"]} for d in done], []




def approximation_notes(job: Job, method: str) -> dict[str, Any]:
    """Mark maps whose gradient went through the finite-difference fallback (ops without a
    rule) or a straight-through estimator (QuantizeLinear of activations): the values are then
    estimates, and the report says so."""
    from ..autodiff import ops_without_rules, straight_through_nodes

    if not registry.METHODS[method].gradient:
        return {}

    def listed(nodes: list[str]) -> str:
        return ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")

    notes = []
    missing = ops_without_rules(job.model) if job.fallback == "finite-differences" else []
    if missing:
        notes.append(
            f"approximate: no backward rule for {listed(missing)}; finite differences used"
        )
    rounded = straight_through_nodes(job.model)
    if rounded:
        notes.append(
            f"approximate: straight-through gradient (rounding skipped) at {listed(rounded)}"
        )
    return {"approximate": True, "notes": notes} if notes else {}


def projections(job: Job, out_dir: Path) -> tuple[list, list]:
    """Deconvnet projections of each image's strongest units at a few layers, written as one
    array file per shard (unlike the other methods, it writes its own rows)."""
    from .projections import ProjectionRunner
    from .shard_maps import ProjectionWriter

    layers = job.options["layers"]
    if layers in (None, "auto"):
        layers = spread_layers(job.card, 3)
    top_k = int(job.options["top_k"])
    try:
        images = max(1, min(len(job.ids), job.batch_size // max(1, top_k)))
        projector = ProjectionRunner(
            job.model, job.card, layers, top_k, images, job.device, job.threads, job.fallback,
            job.options["policy"],
        )
        started = time.perf_counter()
        projected = projector.project_layers(job.inputs, top_k)
        seconds = (time.perf_counter() - started) / max(1, len(job.ids))
    except CnnvizError as error:
        return [], [{"method": "projections", "images": job.ids, "error": str(error)}]
    # one array file per shard (shard_maps: rows = image x layer), filled image by image
    writer = ProjectionWriter(out_dir, job.card.get("name"), len(job.ids) * len(projected),
                              top_k, job.inputs.shape[-2:])
    for i, image_id in enumerate(job.ids):
        for layer, items in projected.items():
            policy, why = projector.policies[layer]
            writer.add(image_id, layer, items[i],
                       {"time_s": round(seconds, 4), "policy": policy, "policy_reason": why})
    done = writer.close()
    return [{"image": d["image"], "layer": d["layer"], "row": d["row"]} for d in done], []


def spread_layers(card: dict[str, Any], n: int) -> list[str]:
    """`n` layers with an activation, spread from shallow to deep (for projections)."""
    rows = [row for row in card["layers"] if row.get("activation")] or card["layers"]
    picks = np.linspace(0, len(rows) - 1, n + 1)[1:].round().astype(int)
    return list(dict.fromkeys(rows[p]["name"] for p in picks))
