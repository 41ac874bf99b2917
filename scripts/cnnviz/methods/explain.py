"""`cnnviz explain`: one method over one shard of images, for one model.

The job loads the model once, builds the one or two sessions the method needs, runs every
(image, target class) pair of the shard in batches, and writes each map through
`common.save_explanation` (PNG + raw .npy + JSON). A failure that belongs to one image or to
the method (an unknown class, an op without a backward rule) is written to `failed.json` with
its reason; the job still succeeds so that the other methods and the report finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..artifacts import write_json
from ..errors import CnnvizError
from . import backprop
from .common import known_classes, normalize_map, resolve_targets, save_explanation

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

    def session(self, policy: str | None = None, batch: int | None = None):  # noqa: ANN201
        """A forward session (policy None) or an input-gradient session under `policy`."""
        from ..runtime import make_session

        if policy is None:
            return make_session(self.model, self.device, self.threads)
        return backprop.gradient_session(
            self.model, policy, batch or self.batch_size, self.device, self.threads, self.fallback
        )


def picture(job: Job, index: int, raw: np.ndarray, signed: np.ndarray | None) -> np.ndarray:
    """What people see of one map: a signed [3, H, W] signal as RGB (grey = 0) at the model's
    input size, else the raw map's positive part over the image the model saw, at the image's
    own resolution."""
    from ..render import overlay

    if signed is not None:
        return backprop.signed_rgb(signed)
    return overlay(job.views[index], normalize_map(np.maximum(raw, 0)))


# ---- the methods ---------------------------------------------------------------------------
def _cam_variant(variant: str) -> Callable[[Job], Iterator[Result]]:
    def run(job: Job) -> Iterator[Result]:
        from ..runtime import make_session
        from .cam import build_cam_model, grad_cam_family

        layer = _cam_layer(job)
        graph, tensor = build_cam_model(job.model, job.card, layer, job.batch_size, job.fallback)
        session = make_session(graph, job.device, job.threads)
        # The methods chunk and pad to the session's static batch themselves.
        maps = grad_cam_family(
            session, job.card, job.row_inputs, job.row_targets, layer, (variant,)
        )[variant]
        for r, (i, _) in enumerate(job.rows):
            yield i, maps[r], None, {"layer": tensor}

    return run


def _guided_gradcam(job: Job) -> Iterator[Result]:
    from ..runtime import make_session
    from .cam import build_cam_model, grad_cam_family, guided_grad_cam

    layer = _cam_layer(job)
    graph, tensor = build_cam_model(job.model, job.card, layer, job.batch_size, job.fallback)
    cam_session = make_session(graph, job.device, job.threads)
    cams = grad_cam_family(
        cam_session, job.card, job.row_inputs, job.row_targets, layer, ("gradcam",)
    )["gradcam"]
    guided_session = job.session("guided")
    guided = backprop.guided_backprop(guided_session, job.row_inputs, job.row_targets)
    combined = guided_grad_cam(cams, guided)
    for r, (i, _) in enumerate(job.rows):
        yield i, backprop.channel_max_abs(combined[r]), combined[r], {"layer": tensor}


def _scorecam(job: Job) -> Iterator[Result]:
    from ..graph import expose
    from ..runtime import make_session
    from .cam import layer_tensor, score_cam

    tensor = layer_tensor(job.card, _cam_layer(job))
    session = job.session()
    # Score-CAM needs the layer's maps once per image: a forward that also returns them.
    forward = make_session(expose(job.model, [tensor]), job.device, job.threads)
    input_name = forward.get_inputs()[0].name
    batch_size = int(job.options.get("batch_size", 64))
    for i, target in job.rows:
        x = job.inputs[i : i + 1]
        acts = forward.run([tensor], {input_name: x})[0][0]
        counts: dict[str, Any] = {}
        raw = score_cam(session, job.card, x, target, acts, batch_size, info=counts)
        yield i, raw, None, {"layer": tensor, **counts}


def _saliency(job: Job) -> Iterator[Result]:
    session = job.session("gradient")
    maps = backprop.saliency(session, job.row_inputs, job.row_targets)
    for r, (i, _) in enumerate(job.rows):
        yield i, maps[r], None, {}


def _signed_method(policy: str) -> Callable[[Job], Iterator[Result]]:
    def run(job: Job) -> Iterator[Result]:
        session = job.session(policy)
        grads = backprop.input_gradients(session, job.row_inputs, job.row_targets)
        for r, (i, _) in enumerate(job.rows):
            yield i, backprop.channel_max_abs(grads[r]), grads[r], {"policy": policy}

    return run


def _smoothgrad(job: Job) -> Iterator[Result]:
    samples = int(job.options.get("samples", 25))
    session = job.session("gradient", min(samples, job.batch_size))
    for i, target in job.rows:
        raw = backprop.smoothgrad(
            session,
            job.inputs[i],
            target,
            samples=samples,
            noise_level=float(job.options.get("noise_level", 0.15)),
            seed=int(job.options.get("seed", 0)),
            batch_size=job.batch_size,
        )
        yield i, raw, None, {"samples": samples}


def _integrated_gradients(job: Job) -> Iterator[Result]:
    steps = int(job.options.get("steps", 50))
    session = job.session("gradient", min(steps + 2, max(job.batch_size, 8)))
    for i, target in job.rows:
        attributions, error = backprop.integrated_gradients(
            session,
            job.inputs[i],
            target,
            steps=steps,
            baseline=job.options.get("baseline", "zero"),
            batch_size=job.batch_size,
            pre=job.card["preprocess"],
        )
        raw = np.abs(attributions).max(axis=0)
        yield i, raw, None, {"steps": steps, "completeness_error": error}


def _occlusion(job: Job) -> Iterator[Result]:
    from .occlusion import occlusion

    session = job.session()
    window, stride = int(job.options.get("window", 32)), int(job.options.get("stride", 16))
    for i, target in job.rows:
        raw = occlusion(session, job.card, job.inputs[i], target, window, stride,
                        batch_size=max(job.batch_size, 16))
        yield i, raw, None, {"window": window, "stride": stride}


METHODS: dict[str, Callable[[Job], Iterator[Result]]] = {
    "gradcam": _cam_variant("gradcam"),
    "gradcampp": _cam_variant("gradcampp"),
    "layercam": _cam_variant("layercam"),
    "guided_gradcam": _guided_gradcam,
    "scorecam": _scorecam,
    "saliency": _saliency,
    "smoothgrad": _smoothgrad,
    "integrated_gradients": _integrated_gradients,
    "guided_backprop": _signed_method("guided"),
    "deconvnet": _signed_method("deconvnet"),
    "occlusion": _occlusion,
}


def _cam_layer(job: Job) -> str | None:
    layer = job.options.get("cam_layer", "auto")
    return None if layer in (None, "auto") else layer


# ---- the job -------------------------------------------------------------------------------
def load_job(
    model_dir: Path, manifest: Path, options: dict[str, Any], device: str, threads: int | None,
    batch_size: int,
) -> tuple[Job, list[dict[str, Any]]]:
    """Read the model and the shard's images, predict, and pick each image's target classes."""
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
    job = Job(model, card, ids, batch, views, [], options, device, threads, batch_size)
    if not ids:
        return job, failed
    spec, unknown = known_classes(card, options.get("target", "top1"))
    failed += [{"image": f"all {len(ids)} images", "error": error} for error in unknown]
    probs = predict(make_session(model, device, threads), card, list(batch), batch_size)
    for i, image_id in enumerate(ids):
        try:
            targets = resolve_targets(card, probs[i], spec)
        except CnnvizError as error:
            failed.append({"image": image_id, "error": str(error)})
            continue
        job.rows.extend((i, t) for t in targets)
    return job, failed


def explain_shard(
    model_dir: Path,
    manifest: Path,
    method: str,
    out_dir: Path,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Compute `method` for every image of the shard; write maps, `summary.json`, `failed.json`."""
    options = options or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job, failed = load_job(Path(model_dir), Path(manifest), options, device, threads, batch_size)
    done: list[dict[str, Any]] = []
    if method == "projections":
        done, failures = _projections(job, out_dir)
        failed.extend(failures)
    elif job.rows:
        if method not in METHODS:
            raise CnnvizError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        done, failures = _run_method(job, method, out_dir)
        failed.extend(failures)
    summary = {"method": method, "model": job.card.get("name"), "maps": done, "failed": failed}
    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "failed.json", failed)
    return summary


def _run_method(job: Job, method: str, out_dir: Path) -> tuple[list, list]:
    labels = job.card.get("labels") or []
    started = time.perf_counter()
    done, failed = [], []
    try:
        results = list(METHODS[method](job))
    except CnnvizError as error:
        log.error("%s failed: %s", method, error)
        return [], [{"method": method, "images": job.ids, "error": str(error)}]
    seconds = (time.perf_counter() - started) / max(1, len(results))
    notes = approximation_notes(job, method)
    for r, (i, raw, signed, extra) in enumerate(results):
        target = job.rows[r][1]
        info = {
            **({"picture": "signed"} if signed is not None else {}),
            "label": labels[target] if target < len(labels) else str(target),
            "time_s": round(seconds, 4),
            **extra,
            **notes,
        }
        shown = picture(job, i, raw, signed)
        paths = save_explanation(out_dir, method, job.ids[i], target, raw, shown, info)
        done.append({"image": job.ids[i], "target": target, **paths})
    log.info("%s: %d maps, %.3f s per map", method, len(done), seconds)
    return done, failed


GRADIENT_FREE = {"scorecam", "occlusion"}


def approximation_notes(job: Job, method: str) -> dict[str, Any]:
    """Mark maps whose gradient went through the finite-difference fallback (ops without a
    rule): the values are then estimates, and the report says so."""
    from ..autodiff import ops_without_rules

    if method in GRADIENT_FREE or job.fallback != "finite-differences":
        return {}
    nodes = ops_without_rules(job.model)
    if not nodes:
        return {}
    shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
    return {
        "approximate": True,
        "notes": [f"approximate: no backward rule for {shown}; finite differences used"],
    }


def _projections(job: Job, out_dir: Path) -> tuple[list, list]:
    from .projections import Projector, save_projections

    layers = job.options.get("layers", "auto")
    if layers in (None, "auto"):
        layers = spread_layers(job.card, 3)
    top_k = int(job.options.get("top_k", 4))
    try:
        projector = Projector(
            job.model, job.card, layers, top_k, job.device, job.threads, job.fallback
        )
    except CnnvizError as error:
        return [], [{"method": "projections", "images": job.ids, "error": str(error)}]
    done = []
    for i, image_id in enumerate(job.ids):
        started = time.perf_counter()
        per_layer = projector.project_layers(job.inputs[i : i + 1], top_k)
        seconds = time.perf_counter() - started
        display = np.asarray(job.views[i])
        for layer, items in per_layer.items():
            paths = save_projections(out_dir, image_id, layer, display, items[0],
                                     {"time_s": round(seconds, 4), "layer": layer})
            done.append({"image": image_id, "layer": layer, **paths})
    return done, []


def spread_layers(card: dict[str, Any], n: int) -> list[str]:
    """`n` layers with an activation, spread from shallow to deep (for projections)."""
    rows = [row for row in card["layers"] if row.get("activation")] or card["layers"]
    picks = np.linspace(0, len(rows) - 1, n + 1)[1:].round().astype(int)
    return list(dict.fromkeys(rows[p]["name"] for p in picks))
