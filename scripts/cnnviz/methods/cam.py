"""Class activation maps: Grad-CAM, Grad-CAM++, LayerCAM, guided Grad-CAM and Score-CAM.

The gradient variants differ only in how they weigh the maps A [C, h, w] of one conv layer
(pytorch-grad-cam's BaseCAM shape), given G = d logit_target / dA from one run of the cut vjp
graph (`build_cam_model`: the backward stops at the layer, so a run costs about one forward):

- gradcam (Selvaraju et al. 2017): w_k = mean_hw G_k; cam = ReLU(sum_k w_k A_k).
- gradcampp (Chattopadhay et al. 2018, eq. 19 as pytorch-grad-cam writes it):
  a = G^2 / (2 G^2 + sum_hw(A_k) G^3 + 1e-6), a = 0 where G == 0; w_k = sum_hw ReLU(G) a.
- layercam (Jiang et al. 2021): cam = ReLU(sum_k ReLU(G_k) * A_k) (spatial weights).
- guided Grad-CAM: the upsampled Grad-CAM times the guided-backprop input gradient [3, H, W].
- Score-CAM (Wang et al. 2020), gradient-free: channel k's map, bilinearly upsampled (corners
  aligned, as torch's UpsamplingBilinear2d in pytorch-grad-cam) and min-max normalised, masks the
  input; w = softmax over channels of the target *logit* of each masked input (pytorch-grad-cam's
  choice; the paper uses the softmax probability minus the baseline's). Masked inputs run through
  one session in batches. Channels whose map is constant (all zero on sparse ReLU6 maps) give a
  zero mask, i.e. the blank input, scored once; channels with identical normalised maps share one
  forward pass.

Every map then goes the same way (pytorch-grad-cam's scale_cam_image): ReLU, min-max normalise at
the layer's resolution, bilinear upsample (half-pixel centres, as cv2.resize) to the model input
size, min-max normalise again. A flat map becomes zeros (pytorch-grad-cam divides by max + 1e-7).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError

VARIANTS = ("gradcam", "gradcampp", "layercam")
SEED_PREFIX = "seed:"
GRAD_PREFIX = "grad:"
GRADCAMPP_EPS = 1e-6  # pytorch-grad-cam's eps in the alpha denominator
SCORECAM_EPS = 1e-8  # pytorch-grad-cam's eps in the mask normalisation


# ---- layers and the cut gradient graph ----------------------------------------------------------
def layer_tensor(card: dict[str, Any], layer: str | None) -> str:
    """The ONNX tensor of a named layer (friendly name or tensor), or of the last spatial conv."""
    from ..modelcard import find_layer
    from .common import last_conv_layer

    row = last_conv_layer(card) if layer is None else find_layer(card, layer)
    return row["tensor"]


def build_cam_model(
    model: onnx.ModelProto,
    card: dict[str, Any],
    layer: str | None,
    batch: int,
    fallback: str = "error",
) -> tuple[onnx.ModelProto, str]:
    """The vjp graph w.r.t. the layer's tensor, batch fixed to `batch`; (model, layer tensor).

    Inputs: the model input and `seed:<logits>`; outputs: the logits, the layer tensor A and
    `grad:<A>`. Only the tail after the layer is differentiated.
    """
    from ..autodiff import vjp

    tensor = layer_tensor(card, layer)
    return vjp(model, wrt=[tensor], policy="gradient", batch=batch, fallback=fallback), tensor


class _CamSession:
    """Input/seed/output names of a cam session, read from the session itself."""

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
        if layer is None and len(grads) == 1:
            self.tensor = grads[0]
        else:
            self.tensor = layer_tensor(card, layer)
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
    targets: list[int],
    layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(A, G, logits): the layer's maps [N, C, h, w], d logit_t / dA [N, C, h, w], logits [N, K].

    One-hot seeds per row, so images with different targets share a run. The session's batch is
    static (build_cam_model): longer batches run in chunks; a short chunk is padded with zero
    images and zero seeds, whose rows are dropped.
    """
    names = _CamSession(session, card, layer)
    x = np.ascontiguousarray(batch, dtype=np.float32)
    if len(targets) != len(x):
        raise ConfigError(f"{len(x)} images but {len(targets)} targets")
    t = np.asarray(targets, dtype=np.int64)
    if t.size and (t.min() < 0 or t.max() >= names.classes):
        raise ConfigError(f"target class out of range 0..{names.classes - 1}: {t.tolist()}")
    seeds = np.zeros((len(x), names.classes), np.float32)
    seeds[np.arange(len(x)), t] = 1.0
    chunk = names.batch or max(1, len(x))
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), chunk):
        xs, ss = x[start : start + chunk], seeds[start : start + chunk]
        real = len(xs)
        if names.batch and real < chunk:
            xs = np.concatenate([xs, np.zeros((chunk - real, *xs.shape[1:]), np.float32)])
            ss = np.concatenate([ss, np.zeros((chunk - real, *ss.shape[1:]), np.float32)])
        out = session.run(names.outputs, {names.input: xs, names.seed: ss})
        parts.append([o[:real] for o in out])
    joined = [np.concatenate([p[i] for p in parts]) for i in range(len(names.outputs))]
    return joined[0], joined[1], (joined[2] if len(joined) > 2 else None)


# ---- the CAM family as one graph (cnnviz.methodgraph; run by cnnviz.runner.Runner) ----------
def cam_graph(
    model: onnx.ModelProto,
    card: dict[str, Any],
    layer: str | None,
    images: int,
    variants: tuple[str, ...] | list[str] = VARIANTS,
    guided: bool = False,
    fallback: str = "error",
):  # noqa: ANN201 - MethodGraph
    """Every requested CAM variant from one (A, G) run, finished in the graph.

    In: images [B, 3, H, W], targets [B]. Out: one map [B, H, W] per variant (ReLU, normalise,
    bilinear upsample, normalise, as `finish_maps`); with `guided`, also `guided_gradcam`
    ([B, H, W], max |.| over channels) and `guided_gradcam_signed` (Grad-CAM times the guided
    backprop input gradient [B, 3, H, W]), from a second, inlined vjp under the guided policy.
    """
    from ..methodgraph import (
        GraphBuilder,
        MethodGraph,
        channel_max_abs,
        one_hot,
        seed_input,
        static_dims,
    )
    from .backprop import _image_inputs, _inline_gradient, model_input_name

    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown CAM variant {v!r}; use one of {', '.join(VARIANTS)}")
    wanted = list(dict.fromkeys([*variants, *(["gradcam"] if guided else [])]))
    core, tensor = build_cam_model(model, card, layer, images, fallback)
    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    seed = seed_input(core)
    seed_dims = static_dims(seed)[1:]
    seeds = one_hot(b, t, int(np.prod(seed_dims)), seed_dims)
    weights = {t.name for t in model.graph.initializer}
    names = b.inline(core, {model_input_name(model): x, seed.name: seeds}, "cam", shared=weights)
    a, g = names[tensor], names[GRAD_PREFIX + tensor]
    shape = next(static_dims(o) for o in core.graph.output if o.name == tensor)
    maps = {v: _finish_in_graph(b, _raw_cam_in_graph(b, v, a, g), shape[2:], dims[-2:])
            for v in wanted}
    for v in variants:
        b.output(v, maps[v])
    if guided:
        gg = _inline_gradient(b, model, x, t, images, "guided", fallback, prefix="guided")
        signed = b.op("Mul", [b.reshape(maps["gradcam"], [images, 1, *dims[-2:]]), gg["grad"]])
        b.output("guided_gradcam_signed", signed)
        b.output("guided_gradcam", channel_max_abs(b, signed))
    graph = MethodGraph(b.build("cam_family"), images)
    graph.metadata["layer"] = tensor
    return graph


def _raw_cam_in_graph(b, variant: str, a: str, g: str) -> str:
    """[N, h, w] before the ReLU (as `raw_cam`), from A and G [N, C, h, w]."""
    if variant == "layercam":
        return b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), a]), [1])
    if variant == "gradcam":
        weights = b.reduce("ReduceMean", g, [2, 3], keepdims=True)
    else:  # gradcampp; alpha is 0 where G == 0 without a mask (its numerator is G^2)
        g2 = b.op("Mul", [g, g])
        sum_a = b.reduce("ReduceSum", a, [2, 3], keepdims=True)
        denominator = b.op("Add", [
            b.op("Add", [b.op("Mul", [g2, b.f(2.0)]), b.op("Mul", [sum_a, b.op("Mul", [g2, g])])]),
            b.f(GRADCAMPP_EPS),
        ])
        alpha = b.op("Div", [g2, denominator])
        weights = b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), alpha]), [2, 3], True)
    return b.reduce("ReduceSum", b.op("Mul", [weights, a]), [1])


def _finish_in_graph(b, raw: str, low: tuple[int, int] | list[int], size) -> str:
    """`finish_maps` in the graph: ReLU, normalise, upsample to `size`, normalise."""
    from ..methodgraph import normalize, resize

    low_res = normalize(b, b.op("Relu", [raw]))
    return normalize(b, resize(b, low_res, low, size))


# ---- the weights and maps (pure numpy) ----------------------------------------------------------
def cam_weights(variant: str, activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Channel weights [N, C] of gradcam / gradcampp from A, G [N, C, h, w]."""
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
    raise ConfigError(f"CAM variant {variant!r} has no channel weights; use gradcam or gradcampp")


def raw_cam(variant: str, activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """[N, h, w] before the ReLU: the weighted sum of the layer's maps."""
    a = np.asarray(activations, dtype=np.float64)
    if variant == "layercam":
        return (np.maximum(np.asarray(grads, dtype=np.float64), 0.0) * a).sum(axis=1)
    if variant in ("gradcam", "gradcampp"):
        return np.einsum("nc,nchw->nhw", cam_weights(variant, a, grads), a)
    raise ConfigError(f"unknown CAM variant {variant!r}; use one of {', '.join(VARIANTS)}")


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max each map [N, h, w] to [0, 1]; a flat map becomes zeros."""
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def interpolation_matrix(size_out: int, size_in: int, align_corners: bool = False) -> np.ndarray:
    """[size_out, size_in] linear interpolation weights along one axis.

    align_corners=False: half-pixel centres, clamped at the border (cv2.resize INTER_LINEAR and
    torch's bilinear default); True: the corner pixels coincide (torch UpsamplingBilinear2d).
    """
    out = np.arange(size_out, dtype=np.float64)
    if align_corners:
        src = out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(1)
    else:
        src = np.maximum((out + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), high), frac)
    return m


def resize_bilinear(
    maps: np.ndarray, size: tuple[int, int], align_corners: bool = False
) -> np.ndarray:
    """Bilinear resize of [N, h, w] maps to [N, H, W] (separable, float64)."""
    maps = np.asarray(maps, dtype=np.float64)
    mh = interpolation_matrix(size[0], maps.shape[-2], align_corners)
    mw = interpolation_matrix(size[1], maps.shape[-1], align_corners)
    return np.einsum("Hh,nhw,Ww->nHW", mh, maps, mw, optimize=True)


def finish_maps(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ReLU, normalise, upsample to `size` (H, W), normalise again -> float32 [N, H, W]."""
    low_res = normalize(np.maximum(raw, 0.0))
    return normalize(resize_bilinear(low_res, size)).astype(np.float32)


def cam_maps(
    activations: np.ndarray,
    grads: np.ndarray,
    size: tuple[int, int],
    variants: tuple[str, ...] | list[str] = VARIANTS,
) -> dict[str, np.ndarray]:
    """{variant: float32 [N, H, W] in [0, 1]} from A and G [N, C, h, w]."""
    return {v: finish_maps(raw_cam(v, activations, grads), size) for v in variants}


def grad_cam_family(
    session: ort.InferenceSession,
    card: dict[str, Any],
    batch: np.ndarray,
    targets: list[int],
    layer: str | None = None,
    variants: tuple[str, ...] | list[str] = VARIANTS,
) -> dict[str, np.ndarray]:
    """{variant: [N, H, W]} for a batch [N, 3, H, W], one target class per image.

    `session` runs `build_cam_model(...)` (one run per chunk of the session's batch).
    """
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown CAM variant {v!r}; use one of {', '.join(VARIANTS)}")
    a, g, _ = cam_inputs(session, card, batch, targets, layer)
    return cam_maps(a, g, tuple(np.shape(batch)[-2:]), variants)


def guided_grad_cam(cams: np.ndarray, guided: np.ndarray) -> np.ndarray:
    """[N, 3, H, W]: Grad-CAM [N, H, W] times the guided-backprop gradient [N, 3, H, W].

    `guided` from cnnviz.methods.backprop.guided_backprop (a policy="guided" session). The saved
    [H, W] map is the max |.| over the colour channels, as for the other input-gradient maps.
    """
    cams = np.asarray(cams, dtype=np.float32)
    return (cams[:, None] * np.asarray(guided, dtype=np.float32)).astype(np.float32)


# ---- Score-CAM ----------------------------------------------------------------------------------
def _output_name(session: ort.InferenceSession, card: dict[str, Any]) -> str:
    outputs = [o.name for o in session.get_outputs()]
    wanted = card.get("output", {}).get("name")
    return wanted if wanted in outputs else outputs[0]


def _input_name(session: ort.InferenceSession, card: dict[str, Any]) -> str:
    inputs = [i.name for i in session.get_inputs()]
    wanted = card.get("input", {}).get("name")
    return wanted if wanted in inputs else inputs[0]


def _target_scores(
    session: ort.InferenceSession,
    card: dict[str, Any],
    inputs: np.ndarray,
    target: int,
    batch_size: int,
) -> np.ndarray:
    """The model output's target entry for each input [M, 3, H, W], run in batches."""
    in_name, out_name = _input_name(session, card), _output_name(session, card)
    scores = []
    for start in range(0, len(inputs), max(1, batch_size)):
        part = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        scores.append(session.run([out_name], {in_name: part})[0][:, target])
    return np.concatenate(scores).astype(np.float64)


def score_cam_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, H, W] masks: each map upsampled (corners aligned) and min-max normalised (+1e-8)."""
    up = resize_bilinear(activations, size, align_corners=True)
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    return ((up - low) / (high - low + SCORECAM_EPS)).astype(np.float32)


def score_plan(maps: np.ndarray, dedupe: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(constant [C] bool, owner [C], unique channels) for the layer maps [C, h, w] of one image.

    A constant channel's mask is zero (the blank input); channels with identical normalised
    maps share one forward pass: `owner[c]` is the channel whose pass scores channel c, and
    `unique` the varying channels that own their pass.
    """
    flat = np.asarray(maps).reshape(len(maps), -1).astype(np.float64)
    channels = len(flat)
    low, high = flat.min(axis=1), flat.max(axis=1)
    constant = high == low if dedupe else np.zeros(channels, bool)
    owner = np.arange(channels)
    if dedupe and (~constant).any():
        varying = np.flatnonzero(~constant)
        normed = (flat[varying] - low[varying, None]) / (high - low)[varying, None]
        _, first, inverse = np.unique(normed, axis=0, return_index=True, return_inverse=True)
        owner[varying] = varying[first[inverse.reshape(-1)]]
    unique = np.flatnonzero(~constant & (owner == np.arange(channels)))
    return constant, owner, unique


def score_weights(scores: np.ndarray) -> np.ndarray:
    """Softmax over the channels' target scores [C] (float64)."""
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def scorecam_graphs(model: onnx.ModelProto, card: dict[str, Any], layer: str | None,
                    images: int, points: int):  # noqa: ANN201 - three MethodGraphs
    """Score-CAM as three graphs around a per-image choice of channels (`score_plan`):

    - `acts`: images [B, 3, H, W] -> `acts` [B, C, h, w], the layer's maps;
    - `scores`: one image and target, the call's `points` low-res channel maps (`lowres`
      [P, h, w], a per-point input) -> upsampled (corners aligned), min-max normalised (+1e-8),
      each masking the image, scored by the model -> `scores` [1, P], the target logits;
    - `finish`: `acts` [B, C, h, w] and softmax `weights` [B, C] -> `map` [B, H, W].
    """
    from ..autodiff.prepare import prepare
    from ..graph import cut_at
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph, one_hot, resize, static_dims
    from .backprop import _image_inputs, model_input_name

    tensor = layer_tensor(card, layer)
    x_name = model_input_name(model)
    b = GraphBuilder.for_model(model)
    x, _, dims = _image_inputs(b, model, images)
    cut = prepare(cut_at(model, [tensor]), images)
    names = b.inline(cut, {x_name: x}, "model")
    b.output("acts", names[tensor])
    b.inputs = [i for i in b.inputs if i.name != "targets"]
    acts = MethodGraph(b.build("scorecam_acts"), images, image_inputs=("images",))
    shape = next(static_dims(o) for o in cut.graph.output if o.name == tensor)
    if len(shape) != 4 or not all(shape):
        raise ConfigError(f"Score-CAM needs a [N, C, h, w] layer; {tensor!r} is {shape}")
    channels, low = shape[1], shape[2:]

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, 1)
    lowres = b.input("lowres", FLOAT, [points, *low])
    up = resize(b, lowres, low, dims[-2:], align_corners=True)
    lo = b.reduce("ReduceMin", up, [1, 2], keepdims=True)
    span = b.op("Sub", [b.reduce("ReduceMax", up, [1, 2], keepdims=True), lo])
    masks = b.op("Div", [b.op("Sub", [up, lo]), b.op("Add", [span, b.f(SCORECAM_EPS)])])
    masked = b.op("Mul", [x, b.reshape(masks, [points, 1, *dims[-2:]])])  # [P, 3, H, W]
    forward = prepare(model, points)
    names = b.inline(forward, {x_name: masked}, "model")
    out_name = card.get("output", {}).get("name")
    outputs = [o.name for o in forward.graph.output]
    logits = b.reshape(names[out_name if out_name in outputs else outputs[0]], [points, -1])
    classes = int(card["output"]["num_classes"])
    picked = b.op("Mul", [logits, one_hot(b, t, classes, [classes])])
    b.output("scores", b.reshape(b.reduce("ReduceSum", picked, [1]), [1, points]))
    scores = MethodGraph(b.build("scorecam_scores"), 1, points, point_inputs=("lowres",),
                         per_point=("scores",))

    b = GraphBuilder.for_model(model)
    a = b.input("acts", FLOAT, [images, channels, *low])
    w = b.input("weights", FLOAT, [images, channels])
    raw = b.reduce("ReduceSum", b.op("Mul", [a, b.reshape(w, [images, channels, 1, 1])]), [1])
    b.output("map", _finish_in_graph(b, raw, low, dims[-2:]))
    finish = MethodGraph(b.build("scorecam_finish"), images, image_inputs=("acts", "weights"))
    return acts, scores, finish, tensor


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
    """Score-CAM [H, W] of one image [1, 3, H, W] and its layer maps [C, h, w].

    `session` is a plain forward session of the model (free batch axis). `dedupe`: constant
    channels share the blank input's score and identical normalised maps share one pass (the
    masks differ from pytorch-grad-cam's by at most its 1e-8 eps). `info`, when given, receives
    the counts: channels, constant, forward passes.
    """
    x = np.asarray(batch1, dtype=np.float32).reshape(1, *np.shape(batch1)[-3:])
    maps = np.asarray(activations, dtype=np.float32)
    channels, size = len(maps), x.shape[-2:]
    constant, owner, unique = score_plan(maps, dedupe)
    scores = np.zeros(channels)
    # Masks in slices of `batch_size` so that only one batch of masked inputs is in memory.
    step = max(1, batch_size)
    for start in range(0, len(unique), step):
        idx = unique[start : start + step]
        masks = score_cam_masks(maps[idx], size)
        scores[idx] = _target_scores(session, card, x * masks[:, None], target, step)
    scores = scores[owner]
    if constant.any():
        blank = _target_scores(session, card, np.zeros_like(x), target, 1)[0]
        scores[constant] = blank
    weights = score_weights(scores)
    if info is not None:
        info.update(
            channels=channels,
            constant=int(constant.sum()),
            forward_passes=len(unique) + int(constant.any()),
        )
    raw = np.einsum("c,chw->hw", weights, maps.astype(np.float64))[None]
    return finish_maps(raw, tuple(size))[0]
