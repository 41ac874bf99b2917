"""The step-by-step definitions the method graphs are checked against (tests only).

cnnviz runs every method as one ONNX graph through one runner (cnnviz.methods.explain,
cnnviz.runner). The functions here compute the same maps the long way: plain ONNX Runtime
sessions over the engine's backward graphs (`backprop.gradient_model`, `cam.build_cam_model`)
or over the model itself, and the method's arithmetic in numpy, one step at a time, on the host.
They are independent of the graph builders (`cam.cam_graph`, `backprop.gradient_graph`, ...),
so test_method_graphs can hold the graphs to them; the graphs themselves are held to the torch
peers in test_cam_peers and test_backprop_peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from cnnviz.errors import ConfigError
from cnnviz.graph import cut_at
from cnnviz.methods import backprop
from cnnviz.methods.cam import (
    GRAD_PREFIX,
    GRADCAMPP_EPS,
    SCORECAM_EPS,
    SEED_PREFIX,
    VARIANTS,
    XGRADCAM_EPS,
    interpolation_matrix,
    layer_tensor,
    score_plan,
    score_weights,
)
from cnnviz.methods.occlusion import window_starts
from cnnviz.methods.projections import support_bbox
from cnnviz.runtime import make_session


# ==== input gradients: saliency, SmoothGrad, IG, guided backprop, deconvnet ======================
def gradient_session(
    model: onnx.ModelProto,
    policy: str = "gradient",
    batch: int = 1,
    device: str = "cpu",
    threads: int | None = 1,
    fallback: str = "error",
) -> ort.InferenceSession:
    """A plain session over the vjp of `model` w.r.t. its input; `batch` rows per run."""
    return make_session(
        backprop.gradient_model(model, policy, batch, fallback=fallback), device, threads
    )


class GradientRoles:
    """The roles of a gradient session's inputs and outputs, read from its names."""

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs = session.get_inputs()
        seeds = [i for i in inputs if i.name.startswith(SEED_PREFIX)]
        plain = [i for i in inputs if not i.name.startswith(SEED_PREFIX)]
        if len(seeds) != 1 or len(plain) != 1:
            raise ConfigError(
                "expected a gradient session with one model input and one 'seed:' input, got "
                f"{[i.name for i in inputs]}; build it with gradient_session"
            )
        self.input = plain[0].name
        self.seed = seeds[0].name
        self.seeded = self.seed[len(SEED_PREFIX) :]
        self.grad = GRAD_PREFIX + self.input
        outputs = [o.name for o in session.get_outputs()]
        if self.grad not in outputs:
            raise ConfigError(f"gradient session has no output {self.grad!r}: {outputs}")
        # The seeded tensor's value (the logits) when the graph exposes it, for IG's completeness.
        others = [o for o in outputs if not o.startswith(GRAD_PREFIX) and o != self.input]
        self.value = self.seeded if self.seeded in outputs else (others[0] if others else None)
        batch = plain[0].shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        self.seed_shape = [d if isinstance(d, int) else None for d in seeds[0].shape[1:]]


def gradients(
    session: ort.InferenceSession, x: np.ndarray, seeds: np.ndarray, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray | None]:
    """(d <seeds, f(x)> / dx [N, ...], f(x) [N, ...] or None) in runs of the session's batch;
    a short last run is padded with zero images and zero seeds, whose rows are dropped."""
    roles = GradientRoles(session)
    x = np.ascontiguousarray(x, dtype=np.float32)
    seeds = np.ascontiguousarray(seeds, dtype=np.float32)
    chunk = roles.batch or max(1, batch_size)
    wanted = [roles.grad] + ([roles.value] if roles.value else [])
    grads, values = [], []
    for start in range(0, len(x), chunk):
        xs, ss = x[start : start + chunk], seeds[start : start + chunk]
        real = len(xs)
        if roles.batch and real < chunk:
            xs = np.concatenate([xs, np.zeros((chunk - real,) + xs.shape[1:], np.float32)])
            ss = np.concatenate([ss, np.zeros((chunk - real,) + ss.shape[1:], np.float32)])
        out = session.run(wanted, {roles.input: xs, roles.seed: ss})
        grads.append(out[0][:real])
        if roles.value:
            values.append(out[1][:real])
    return np.concatenate(grads), (np.concatenate(values) if values else None)


def one_hot(targets: Sequence[int] | np.ndarray, seed_shape: Sequence[int]) -> np.ndarray:
    """[N, *seed_shape] float32 with a 1 at each row's target (flat index over seed_shape)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    size = int(np.prod(seed_shape))
    if targets.size and (targets.min() < 0 or targets.max() >= size):
        raise ConfigError(f"target class out of range 0..{size - 1}: {targets.tolist()}")
    seeds = np.zeros((len(targets), size), np.float32)
    seeds[np.arange(len(targets)), targets] = 1.0
    return seeds.reshape((len(targets), *seed_shape))


def _seed_shape(session: ort.InferenceSession) -> tuple[int, ...]:
    shape = GradientRoles(session).seed_shape
    if any(d is None for d in shape):
        raise ConfigError(f"the seed input's shape {shape} is not static")
    return tuple(shape)


def input_gradients(
    session: ort.InferenceSession, batch: np.ndarray, targets: Sequence[int]
) -> np.ndarray:
    """[N, 3, H, W]: d logit[target_i] / d x_i for each image, whatever the session's policy
    (plain gradient, guided backprop, deconvnet)."""
    batch = np.asarray(batch, dtype=np.float32)
    if len(targets) != len(batch):
        raise ConfigError(f"{len(batch)} images but {len(targets)} targets")
    return gradients(session, batch, one_hot(targets, _seed_shape(session)), len(batch))[0]


def saliency(session: ort.InferenceSession, batch: np.ndarray, targets: Sequence[int]):
    """[N, H, W]: max over channels of |gradient| (Simonyan et al. 2014; captum Saliency abs)."""
    return backprop.channel_max_abs(input_gradients(session, batch, targets))


def smoothgrad_inputs(x: np.ndarray, samples: int, noise_level: float, seed: int) -> np.ndarray:
    """The noisy points: x + N(0, sigma^2), sigma = noise_level * (max(x) - min(x)), with the
    job's unit noise (`backprop.unit_noise`, seeded)."""
    sigma = np.float32(noise_level * float(x.max() - x.min()))
    return x[None] + sigma * backprop.unit_noise(samples, x.shape, seed)


def smoothgrad_gradient(
    session: ort.InferenceSession,
    image: np.ndarray,
    target: int,
    samples: int = 25,
    noise_level: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """[3, H, W]: the mean signed gradient over `samples` noisy copies of `image`
    (Smilkov et al. 2017; the map is then max |.| over channels)."""
    noisy = smoothgrad_inputs(np.asarray(image, np.float32), samples, noise_level, seed)
    seeds = one_hot([target] * samples, _seed_shape(session))
    grads, _ = gradients(session, noisy, seeds, batch_size)
    return grads.mean(axis=0, dtype=np.float64).astype(np.float32)


def integrated_gradients(
    session: ort.InferenceSession,
    image: np.ndarray,
    target: int,
    steps: int = 50,
    baseline: str | float | np.ndarray = "zero",
    batch_size: int = 8,
    method: str = "gausslegendre",
    pre: dict[str, Any] | None = None,
) -> tuple[np.ndarray, float]:
    """([3, H, W] attributions, relative completeness error).

    attributions = (x - x0) * sum_i w_i * grad(x0 + a_i (x - x0)), with captum's weights w_i and
    alphas a_i for `method` (`backprop.ig_rule`). The completeness error is
    |sum(attributions) - (f(x) - f(x0))| / |f(x) - f(x0)| for the target logit f; f(x) and
    f(x0) come from the same runs (two extra path points).
    """
    x = np.asarray(image, dtype=np.float32)
    x0 = backprop.make_baseline(baseline, x, pre)
    weights, alphas = backprop.ig_rule(method, steps)
    points = np.concatenate([alphas, [0.0, 1.0]]).astype(np.float32)
    path = x0[None] + points.reshape(-1, 1, 1, 1) * (x - x0)[None]
    seeds = one_hot([target] * len(points), _seed_shape(session))
    grads, values = gradients(session, path, seeds, batch_size)
    total = np.tensordot(weights, grads[:steps].astype(np.float64), axes=1)
    attributions = ((x - x0).astype(np.float64) * total).astype(np.float32)
    if values is None:
        return attributions, float("nan")
    f = values.reshape(len(points), -1)[:, target].astype(np.float64)
    delta = f[-1] - f[-2]
    error = abs(float(attributions.astype(np.float64).sum()) - delta)
    return attributions, error / max(abs(delta), 1e-12)


# ==== class activation maps ====================================================================
class CamRoles:
    """Input/seed/output names of a session over `cam.build_cam_model`, read from the session."""

    def __init__(self, session: ort.InferenceSession, card: dict[str, Any], layer: str | None):
        inputs = session.get_inputs()
        seeds = [i for i in inputs if i.name.startswith(SEED_PREFIX)]
        plain = [i for i in inputs if not i.name.startswith(SEED_PREFIX)]
        outputs = [o.name for o in session.get_outputs()]
        grads = [o[len(GRAD_PREFIX) :] for o in outputs if o.startswith(GRAD_PREFIX)]
        if len(seeds) != 1 or len(plain) != 1 or not grads:
            raise ConfigError(
                "expected a Grad-CAM session (one model input, one 'seed:' input, a 'grad:' "
                f"output), got inputs {[i.name for i in inputs]}; build it with build_cam_model"
            )
        self.tensor = grads[0] if layer is None and len(grads) == 1 else layer_tensor(card, layer)
        if self.tensor not in grads:
            raise ConfigError(
                f"this Grad-CAM session was built for {grads}, not for layer {layer!r} "
                f"({self.tensor}); rebuild it with build_cam_model for that layer"
            )
        self.input, self.seed = plain[0].name, seeds[0].name
        self.logits = self.seed[len(SEED_PREFIX) :]
        self.outputs = [self.tensor, GRAD_PREFIX + self.tensor]
        self.outputs += [self.logits] if self.logits in outputs else []
        batch = plain[0].shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        classes = seeds[0].shape[-1]
        self.classes = classes if isinstance(classes, int) else int(card["output"]["num_classes"])


def cam_inputs(
    session: ort.InferenceSession,
    card: dict[str, Any],
    batch: np.ndarray,
    targets: Sequence[int],
    layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(A, G, logits): the layer's maps [N, C, h, w], d logit_t / dA [N, C, h, w], logits [N, K],
    one-hot seeds per row, in runs of the session's batch (a short run padded with zeros)."""
    roles = CamRoles(session, card, layer)
    x = np.ascontiguousarray(batch, dtype=np.float32)
    if len(targets) != len(x):
        raise ConfigError(f"{len(x)} images but {len(targets)} targets")
    seeds = one_hot(targets, [roles.classes])
    chunk = roles.batch or max(1, len(x))
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), chunk):
        xs, ss = x[start : start + chunk], seeds[start : start + chunk]
        real = len(xs)
        if roles.batch and real < chunk:
            xs = np.concatenate([xs, np.zeros((chunk - real, *xs.shape[1:]), np.float32)])
            ss = np.concatenate([ss, np.zeros((chunk - real, *ss.shape[1:]), np.float32)])
        out = session.run(roles.outputs, {roles.input: xs, roles.seed: ss})
        parts.append([o[:real] for o in out])
    joined = [np.concatenate([p[i] for p in parts]) for i in range(len(roles.outputs))]
    return joined[0], joined[1], (joined[2] if len(joined) > 2 else None)


def cam_weights(variant: str, activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Channel weights [N, C] of gradcam / gradcampp / xgradcam from A, G [N, C, h, w].

    gradcam (Selvaraju et al. 2017): w_k = mean_hw G_k. gradcampp (Chattopadhay et al. 2018,
    eq. 19 as pytorch-grad-cam writes it): a = G^2 / (2 G^2 + sum_hw(A_k) G^3 + 1e-6), a = 0
    where G == 0; w_k = sum_hw ReLU(G) a. xgradcam (Fu et al. 2020, as pytorch-grad-cam writes
    it): w_k = sum_hw(G_k A_k) / (sum_hw A_k + 1e-7).
    """
    a = np.asarray(activations, dtype=np.float64)
    g = np.asarray(grads, dtype=np.float64)
    if variant == "gradcam":
        return g.mean(axis=(2, 3))
    if variant == "gradcampp":
        g2 = g * g
        sum_a = a.sum(axis=(2, 3), keepdims=True)
        alpha = g2 / (2.0 * g2 + sum_a * g2 * g + GRADCAMPP_EPS)
        alpha = np.where(g != 0, alpha, 0.0)
        return (np.maximum(g, 0.0) * alpha).sum(axis=(2, 3))
    if variant == "xgradcam":
        return (g * a).sum(axis=(2, 3)) / (a.sum(axis=(2, 3)) + XGRADCAM_EPS)
    raise ConfigError(
        f"CAM variant {variant!r} has no channel weights; use gradcam, gradcampp or xgradcam"
    )


def raw_cam(variant: str, activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """[N, h, w] before the ReLU: the weighted sum of the layer's maps (layercam, Jiang et al.
    2021: spatial weights ReLU(G); hirescam, Draelos & Carin 2020: spatial weights G)."""
    a = np.asarray(activations, dtype=np.float64)
    if variant == "layercam":
        return (np.maximum(np.asarray(grads, dtype=np.float64), 0.0) * a).sum(axis=1)
    if variant == "hirescam":
        return (np.asarray(grads, dtype=np.float64) * a).sum(axis=1)
    if variant in ("gradcam", "gradcampp", "xgradcam"):
        return np.einsum("nc,nchw->nhw", cam_weights(variant, a, grads), a)
    raise ConfigError(f"unknown CAM variant {variant!r}; use one of {', '.join(VARIANTS)}")


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max each map [N, h, w] to [0, 1]; a flat map becomes zeros."""
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def resize_bilinear(
    maps: np.ndarray, size: tuple[int, int], align_corners: bool = False
) -> np.ndarray:
    """Bilinear resize of [N, h, w] maps to [N, H, W] (separable, float64)."""
    maps = np.asarray(maps, dtype=np.float64)
    mh = interpolation_matrix(size[0], maps.shape[-2], align_corners)
    mw = interpolation_matrix(size[1], maps.shape[-1], align_corners)
    return np.einsum("Hh,nhw,Ww->nHW", mh, maps, mw, optimize=True)


def finish_maps(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image: ReLU, normalise, upsample to `size` (half-pixel
    centres, as cv2.resize), normalise again -> float32 [N, H, W]."""
    low_res = normalize(np.maximum(raw, 0.0))
    return normalize(resize_bilinear(low_res, size)).astype(np.float32)


def grad_cam_family(
    session: ort.InferenceSession,
    card: dict[str, Any],
    batch: np.ndarray,
    targets: Sequence[int],
    layer: str | None = None,
    variants: Sequence[str] = VARIANTS,
) -> dict[str, np.ndarray]:
    """{variant: [N, H, W]} for a batch [N, 3, H, W], one target class per image; `session`
    runs `cam.build_cam_model(...)`."""
    a, g, _ = cam_inputs(session, card, batch, targets, layer)
    size = tuple(np.shape(batch)[-2:])
    return {v: finish_maps(raw_cam(v, a, g), size) for v in variants}


def guided_grad_cam(cams: np.ndarray, guided: np.ndarray) -> np.ndarray:
    """[N, 3, H, W]: Grad-CAM [N, H, W] times the guided-backprop gradient [N, 3, H, W]."""
    return (np.asarray(cams, np.float32)[:, None] * np.asarray(guided, np.float32)).astype(
        np.float32
    )


def _io_names(session: ort.InferenceSession, card: dict[str, Any]) -> tuple[str, str]:
    """(input, output) of a plain forward session: the card's names where the session has them."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    wanted_in = card.get("input", {}).get("name")
    wanted_out = card.get("output", {}).get("name")
    return (
        wanted_in if wanted_in in inputs else inputs[0],
        wanted_out if wanted_out in outputs else outputs[0],
    )


def _target_scores(
    session: ort.InferenceSession,
    card: dict[str, Any],
    inputs: np.ndarray,
    target: int,
    batch_size: int,
) -> np.ndarray:
    """The model output's target entry for each input [M, 3, H, W], run in batches."""
    in_name, out_name = _io_names(session, card)
    scores = []
    for start in range(0, len(inputs), max(1, batch_size)):
        part = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        scores.append(session.run([out_name], {in_name: part})[0][:, target])
    return np.concatenate(scores).astype(np.float64)


def score_cam_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, H, W] masks: each map upsampled (corners aligned, as torch's UpsamplingBilinear2d
    in pytorch-grad-cam) and min-max normalised (+1e-8)."""
    up = resize_bilinear(activations, size, align_corners=True)
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    return ((up - low) / (high - low + SCORECAM_EPS)).astype(np.float32)


def score_cam(
    session: ort.InferenceSession,
    card: dict[str, Any],
    batch1: np.ndarray,
    target: int,
    activations: np.ndarray,
    batch_size: int = 64,
    dedupe: bool = True,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Score-CAM (Wang et al. 2020) [H, W] of one image [1, 3, H, W] and its layer maps
    [C, h, w]: w = softmax over channels of the target logit of the image masked by each
    channel's mask; the weighted maps finished as `finish_maps`.

    `session` is a plain forward session of the model (free batch axis). `dedupe`: constant
    channels share the blank input's score and identical normalised maps share one pass
    (`cam.score_plan`). `info`, when given, receives the counts: channels, constant, forward
    passes.
    """
    x = np.asarray(batch1, dtype=np.float32).reshape(1, *np.shape(batch1)[-3:])
    maps = np.asarray(activations, dtype=np.float32)
    channels, size = len(maps), x.shape[-2:]
    constant, owner, unique = score_plan(maps, dedupe)
    scores = np.zeros(channels)
    step = max(1, batch_size)  # only one batch of masked inputs in memory
    for start in range(0, len(unique), step):
        idx = unique[start : start + step]
        masks = score_cam_masks(maps[idx], size)
        scores[idx] = _target_scores(session, card, x * masks[:, None], target, step)
    scores = scores[owner]
    if constant.any():
        scores[constant] = _target_scores(session, card, np.zeros_like(x), target, 1)[0]
    if info is not None:
        info.update(
            channels=channels,
            constant=int(constant.sum()),
            forward_passes=len(unique) + int(constant.any()),
        )
    raw = np.einsum("c,chw->hw", score_weights(scores), maps.astype(np.float64))[None]
    return finish_maps(raw, tuple(size))[0]


# ==== occlusion ==============================================================================
def occlusion(
    session: ort.InferenceSession,
    card: dict[str, Any],
    image: np.ndarray,
    target: int,
    window: int = 32,
    stride: int = 16,
    batch_size: int = 64,
    baseline: float = 0.0,
) -> np.ndarray:
    """float32 [H, W]: the mean drop in p(target) over the patches covering each pixel (captum's
    Occlusion on the softmax: windows at `occlusion.window_starts`, the last one cut at the
    border). `session`: a plain forward session of the model; `image` [3, H, W] preprocessed."""
    x = np.asarray(image, dtype=np.float32).reshape(np.shape(image)[-3:])
    _, height, width = x.shape
    boxes = [
        (top, left)
        for top in window_starts(height, window, stride)
        for left in window_starts(width, window, stride)
    ]
    in_name, out_name = _io_names(session, card)
    kind = card.get("output", {}).get("kind", "logits")

    def probabilities(batch: np.ndarray) -> np.ndarray:
        out = session.run([out_name], {in_name: batch})[0].astype(np.float64)
        if kind != "probabilities":
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        return out[:, target]

    reference = probabilities(x[None])[0]
    drops = np.zeros(len(boxes))
    step = max(1, batch_size)
    for start in range(0, len(boxes), step):
        part = boxes[start : start + step]
        batch = np.repeat(x[None], len(part), axis=0)
        for row, (top, left) in enumerate(part):
            batch[row, :, top : top + window, left : left + window] = baseline
        drops[start : start + len(part)] = reference - probabilities(batch)
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for drop, (top, left) in zip(drops, boxes, strict=True):
        total[top : top + window, left : left + window] += drop
        count[top : top + window, left : left + window] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


# ==== deconvnet projections ======================================================================
def top_channels(act: np.ndarray, k: int, rank: np.ndarray | None = None) -> list[int]:
    """The k channels of [C, h, w] with the largest maximum activation, largest first.

    `rank` (the pre-activation, same shape) breaks ties: a saturated ReLU6 layer has many
    channels whose maximum is exactly 6. Ties left after that go to the lower channel index.
    """
    peaks = act.reshape(act.shape[0], -1).max(axis=1)
    keys = [-peaks]
    if rank is not None:
        keys.insert(0, -rank.reshape(rank.shape[0], -1).max(axis=1))
    order = np.lexsort(keys)  # last key is primary: the activation's peak
    return [int(c) for c in order[: max(0, k)]]


def unit_seeds(
    act: np.ndarray, channels: Sequence[int], rank: np.ndarray | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Seeds [k, C, h, w]: each channel's max activation at its argmax, zeros elsewhere.

    The argmax is taken over `rank` (the pre-activation) when given, which picks one of the
    positions tied at a ReLU6's ceiling; the seed value is the activation there.
    """
    c_total, h, w = act.shape
    where = act if rank is None else rank
    seeds = np.zeros((len(channels), c_total, h, w), np.float32)
    info = []
    for i, c in enumerate(channels):
        if not 0 <= c < c_total:
            raise ConfigError(f"channel {c} is out of range for a layer with {c_total} channels")
        y, x = np.unravel_index(int(np.argmax(where[c])), (h, w))
        value = float(act[c, y, x])
        seeds[i, c, y, x] = value
        info.append({"channel": int(c), "value": value, "position": [int(y), int(x)]})
    return seeds, info


class Projector:
    """Deconvnet projections (Zeiler & Fergus 2014) step by step: one forward session for the
    layers' tensors, the channels and seeds chosen on the host (`top_channels`, `unit_seeds`),
    one deconvnet session per layer over the model cut at the layer."""

    def __init__(
        self,
        model: onnx.ModelProto,
        card: dict[str, Any],
        layers: Sequence[str],
        batch: int = 8,
        device: str = "cpu",
        threads: int | None = 1,
        fallback: str = "error",
    ) -> None:
        from cnnviz.modelcard import find_layer

        self.rows = {name: find_layer(card, name) for name in layers}
        self.input = backprop.model_input_name(model)
        self.forward = make_session(cut_at(model, self._forward_tensors()), device, threads)
        self.sessions = {
            name: make_session(
                backprop.gradient_model(
                    cut_at(model, [row["tensor"]]),
                    "deconvnet",
                    batch,
                    seed_output=row["tensor"],
                    fallback=fallback,
                ),
                device,
                threads,
            )
            for name, row in self.rows.items()
        }

    def _forward_tensors(self) -> list[str]:
        names = []
        for row in self.rows.values():
            names.append(row["tensor"])
            if row.get("conv_output") and row["conv_output"] != row["tensor"]:
                names.append(row["conv_output"])  # the pre-activation breaks ReLU6 ties
        return list(dict.fromkeys(names))

    def activations(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """{layer: (activation [N, C, h, w], pre-activation or None)} from one forward run."""
        names = self._forward_tensors()
        outs = self.forward.run(names, {self.input: np.asarray(images, np.float32)})
        values = dict(zip(names, outs, strict=True))
        result = {}
        for name, row in self.rows.items():
            pre = row.get("conv_output")
            result[name] = (
                values[row["tensor"]],
                values[pre] if pre in values and pre != row["tensor"] else None,
            )
        return result

    def project_layers(self, images: np.ndarray, channels: Sequence[int] | int) -> dict:
        """{layer: project(...)} for every layer of this projector, from one forward run."""
        forward = self.activations(images)
        return {layer: self.project(images, layer, channels, forward) for layer in self.rows}

    def project(
        self,
        images: np.ndarray,
        layer: str,
        channels: Sequence[int] | int,
        forward: dict | None = None,
    ) -> list[list[dict]]:
        """Per image, per channel: {channel, value, position [y, x], projection [3, H, W], bbox}.

        `channels`: an int k (the k strongest channels of each image) or the channel indices.
        """
        images = np.asarray(images, np.float32)
        acts, pres = (forward or self.activations(images))[layer]
        xs, seeds, infos = [], [], []
        for i, act in enumerate(acts):
            pre = None if pres is None else pres[i]
            chosen = (
                top_channels(act, channels, pre) if isinstance(channels, int) else list(channels)
            )
            s, info = unit_seeds(act, chosen, pre)
            xs.append(np.repeat(images[i : i + 1], len(chosen), axis=0))
            seeds.append(s)
            infos.append(info)
        if not any(len(s) for s in seeds):
            return infos
        grads, _ = gradients(self.sessions[layer], np.concatenate(xs), np.concatenate(seeds))
        start = 0
        for info in infos:
            for item in info:
                item["projection"] = grads[start]
                item["bbox"] = support_bbox(grads[start])
                start += 1
        return infos
