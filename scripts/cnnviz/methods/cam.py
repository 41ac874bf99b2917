"""Class activation maps: Grad-CAM, Grad-CAM++, LayerCAM, HiResCAM, XGrad-CAM, guided Grad-CAM
and Score-CAM.

The gradient variants differ only in how they weigh the maps A [C, h, w] of one conv layer
(pytorch-grad-cam's BaseCAM shape), given G = d logit_target / dA from one run of the cut vjp
graph (`build_cam_model`: the backward stops at the layer, so a run costs about one forward):

- gradcam (Selvaraju et al. 2017): w_k = mean_hw G_k; cam = ReLU(sum_k w_k A_k).
- gradcampp (Chattopadhay et al. 2018, eq. 19 as pytorch-grad-cam writes it):
  a = G^2 / (2 G^2 + sum_hw(A_k) G^3 + 1e-6), a = 0 where G == 0; w_k = sum_hw ReLU(G) a.
- layercam (Jiang et al. 2021): cam = ReLU(sum_k ReLU(G_k) * A_k) (spatial weights).
- hirescam (Draelos & Carin 2020): cam = ReLU(sum_k G_k * A_k), Grad-CAM without averaging the
  gradient over positions (pytorch-grad-cam's HiResCAM).
- xgradcam (Fu et al. 2020): w_k = sum_hw(G_k A_k) / (sum_hw A_k + 1e-7); cam = ReLU(sum_k w_k
  A_k) (pytorch-grad-cam's XGradCAM, its eps; no absolute value in the denominator).
- guided Grad-CAM: the upsampled Grad-CAM times the guided-backprop input gradient [3, H, W].
- Score-CAM (Wang et al. 2020), gradient-free: channel k's map, bilinearly upsampled (corners
  aligned, as torch's UpsamplingBilinear2d in pytorch-grad-cam) and min-max normalised, masks the
  input; w = softmax over channels of the target *logit* of each masked input (pytorch-grad-cam's
  choice; the paper uses the softmax probability minus the baseline's). The masked inputs are
  made and scored in a graph, a call's worth of channels at a time. Channels whose map is
  constant (all zero on sparse ReLU6 maps) give a zero mask, i.e. the blank input, scored once;
  channels with identical normalised maps share one forward pass (`score_plan`).

Every map then goes the same way (pytorch-grad-cam's scale_cam_image): ReLU, min-max normalise at
the layer's resolution, bilinear upsample (half-pixel centres, as cv2.resize) to the model input
size, min-max normalise again. A flat map becomes zeros (pytorch-grad-cam divides by max + 1e-7).

All of it runs inside the method's graphs (`cam_graph`, `scorecam_graphs`) fed by the one runner
(cnnviz.runner); the step-by-step definitions they are tested against live in the tests
(tests/reference_methods.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError

VARIANTS = ("gradcam", "gradcampp", "layercam", "hirescam", "xgradcam")
SEED_PREFIX = "seed:"
GRAD_PREFIX = "grad:"
GRADCAMPP_EPS = 1e-6  # pytorch-grad-cam's eps in the alpha denominator
XGRADCAM_EPS = 1e-7  # pytorch-grad-cam's eps in XGradCAM's weight denominator
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
    bilinear upsample, normalise); with `guided`, also `guided_gradcam`
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
    shape = next(static_dims(o) for o in core.graph.output if o.name == tensor)
    names = b.inline(core, {model_input_name(model): x, seed.name: seeds}, "cam", shared=weights)
    del core  # copied into the builder: freed before the graph is built and opened
    a, g = names[tensor], names[GRAD_PREFIX + tensor]
    maps = {
        v: _finish_in_graph(b, _raw_cam_in_graph(b, v, a, g), shape[2:], dims[-2:]) for v in wanted
    }
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
    """[N, h, w] before the ReLU: the weighted sum of the layer's maps A and G [N, C, h, w]."""
    if variant == "layercam":
        return b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), a]), [1])
    if variant == "hirescam":
        return b.reduce("ReduceSum", b.op("Mul", [g, a]), [1])
    if variant == "gradcam":
        weights = b.reduce("ReduceMean", g, [2, 3], keepdims=True)
    elif variant == "xgradcam":
        sum_a = b.reduce("ReduceSum", a, [2, 3], keepdims=True)
        sum_ga = b.reduce("ReduceSum", b.op("Mul", [g, a]), [2, 3], keepdims=True)
        weights = b.op("Div", [sum_ga, b.op("Add", [sum_a, b.f(XGRADCAM_EPS)])])
    else:  # gradcampp; alpha is 0 where G == 0 without a mask (its numerator is G^2)
        g2 = b.op("Mul", [g, g])
        sum_a = b.reduce("ReduceSum", a, [2, 3], keepdims=True)
        denominator = b.op(
            "Add",
            [
                b.op(
                    "Add", [b.op("Mul", [g2, b.f(2.0)]), b.op("Mul", [sum_a, b.op("Mul", [g2, g])])]
                ),
                b.f(GRADCAMPP_EPS),
            ],
        )
        alpha = b.op("Div", [g2, denominator])
        weights = b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), alpha]), [2, 3], True)
    return b.reduce("ReduceSum", b.op("Mul", [weights, a]), [1])


def _finish_in_graph(b, raw: str, low: tuple[int, int] | list[int], size) -> str:
    """ReLU, normalise, upsample to `size` (half-pixel centres), normalise, in the graph."""
    from ..methodgraph import normalize, resize

    low_res = normalize(b, b.op("Relu", [raw]))
    return normalize(b, resize(b, low_res, low, size))


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


# ---- Score-CAM ----------------------------------------------------------------------------------
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


def scorecam_graphs(
    model: onnx.ModelProto, card: dict[str, Any], layer: str | None, images: int, points: int
):  # noqa: ANN201 - three MethodGraphs
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
    scores = MethodGraph(
        b.build("scorecam_scores"), 1, points, point_inputs=("lowres",), per_point=("scores",)
    )

    b = GraphBuilder.for_model(model)
    a = b.input("acts", FLOAT, [images, channels, *low])
    w = b.input("weights", FLOAT, [images, channels])
    raw = b.reduce("ReduceSum", b.op("Mul", [a, b.reshape(w, [images, channels, 1, 1])]), [1])
    b.output("map", _finish_in_graph(b, raw, low, dims[-2:]))
    finish = MethodGraph(b.build("scorecam_finish"), images, image_inputs=("acts", "weights"))
    return acts, scores, finish, tensor
