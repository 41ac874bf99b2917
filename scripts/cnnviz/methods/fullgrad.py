"""FullGrad (Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural Network
Visualization"): the input-gradient term and one bias-gradient term per layer with a bias, from
ONE vjp graph (wrt = the model input and the output z of every biased layer), one run per chunk.

    map = scale( sum_c post(|x_c * dy/dx_c|) + sum_l up( sum_c post(|b_lc * dy/dz_lc|) ) )

`post` is a min-max scaling, `up` a bilinear upsampling to the input size, `scale` the final
min-max scaling to [0, 1]. Option `normalization` picks where `post` scales:

- "channel" (default; pytorch-grad-cam 1.5.7's FullGrad, the peer): every channel of every term
  on its own, (v - min) / (max(v - min) + 1e-7), upsampled with half-pixel centres (cv2.resize).
  Scaled channel by channel, b_lc only matters through the 1e-7 (and b_lc = 0 drops the channel);
  that is the peer's definition, kept.
- "layer" (the authors' reference code, idiap/fullgrad-saliency `_postProcess`): each term's
  whole [C, h, w] block scaled at once (eps 1e-6), then summed over channels, upsampled with the
  corners aligned.

Which layers have a bias: Conv nodes with a constant bias input, and BatchNormalization nodes
with constant parameters, whose bias is the effective one, B - mean * scale / sqrt(var + eps)
(as the peer's `get_bias_data` and the reference code take it). The TorchScript exports fold
BatchNorm into the preceding Conv: its bias is then w_bn / s * b_conv + B - mean * w_bn / s, and
dy/dz at the folded conv's output is dy/dz at the BatchNorm's output. For a Conv *without* bias
followed by BatchNorm (EfficientNet, ResNet, MobileNet) the folded term is exactly the peer's
BatchNorm term, so the maps agree on the unfolded torch model. A Conv *with* a bias followed by
BatchNorm (VGG16-BN) gives the peer two terms (the conv's bias at the conv's output, the
BatchNorm's at its output) and the folded export one (the folded bias): ours is FullGrad of the
folded network, which computes the same function, and equals the peer on the torch model folded
the same way (fuse_conv_bn_eval). Under "channel" scaling the two unfolded terms are one picture
(dy/dz differs per channel by the constant w_bn / s), so the peer on the unfolded model only
weighs the input term half as much (measured on VGG16-BN: Pearson 1.0000 both ways).
Gemm/MatMul biases are not used: their gradient has no spatial extent (the peer and the reference
code take 2-D layers only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError

PEER_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (v - min) / (max(v - min) + 1e-7)
REFERENCE_EPS = 1e-6  # idiap/fullgrad-saliency's _postProcess eps


def bias_layers(model: onnx.ModelProto, batch: int = 1) -> list[tuple[str, np.ndarray]]:
    """(output tensor z, bias b [C] float32) of every layer with a bias and a [N, C, h, w]
    output, in graph order (the names are those of the model after `autodiff.prepare`)."""
    from ..autodiff.prepare import constant_values, prepare, static_shapes

    prepared = prepare(model, batch)
    graph = prepared.graph
    consts, shapes = constant_values(graph), static_shapes(graph)
    found = []
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if len(shapes.get(out, ())) != 4:
            continue
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in consts:
            found.append((out, np.asarray(consts[node.input[2]], np.float32).reshape(-1)))
        elif node.op_type == "BatchNormalization" and all(i in consts for i in node.input[1:5]):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0):
                continue
            scale, shift, mean, var = (np.asarray(consts[i], np.float64) for i in node.input[1:5])
            eps = float(attrs.get("epsilon", 1e-5))
            found.append((out, (shift - mean * scale / np.sqrt(var + eps)).astype(np.float32)))
    return found


def scale_maps(b: Any, maps: str, axes: list[int], eps: float) -> str:
    """(v - min) / (max(v - min) + eps) over `axes` (pytorch-grad-cam's scale_cam_image and the
    FullGrad reference code: an eps added, not a floor, so a near-flat map stays near 0)."""
    low = b.reduce("ReduceMin", maps, axes, keepdims=True)
    shifted = b.op("Sub", [maps, low])
    top = b.reduce("ReduceMax", shifted, axes, keepdims=True)
    return b.op("Div", [shifted, b.op("Add", [top, b.f(eps)])])


def fullgrad_graph(
    model: onnx.ModelProto,
    images: int,
    normalization: str,
    fallback: str = "error",
):  # noqa: ANN201 - MethodGraph
    """In: images [B, 3, H, W], targets [B]. Out: `map` [B, H, W] in [0, 1].

    One vjp (wrt the input and every biased layer's output; `bias_layers`), inlined once; the
    per-layer terms are summed over channels before upsampling (upsampling is linear, so this is
    the peer's per-channel upsample-then-sum), and layers of one resolution share one upsampling.
    """
    from ..autodiff import vjp
    from ..methodgraph import GraphBuilder, MethodGraph, one_hot, resize, seed_input, static_dims
    from .backprop import _image_inputs, model_input_name
    from .cam import GRAD_PREFIX

    if normalization not in ("channel", "layer"):
        raise ConfigError(f"fullgrad normalization {normalization!r} is not channel or layer")
    per_channel = normalization == "channel"
    eps = PEER_EPS if per_channel else REFERENCE_EPS
    axes = [2, 3] if per_channel else [1, 2, 3]
    # No layer with a bias (an exporter drops all-zero biases, as dynamo does for a freshly
    # initialised BatchNorm): FullGrad is then its input-gradient term alone (run_fullgrad
    # says so in each map's notes).
    layers = bias_layers(model, images)
    x_name = model_input_name(model)
    core = vjp(model, wrt=[x_name, *(z for z, _ in layers)], policy="gradient", batch=images,
               fallback=fallback)
    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    seed = seed_input(core)
    seed_dims = static_dims(seed)[1:]
    seeds = one_hot(b, t, int(np.prod(seed_dims)), seed_dims)
    weights = {init.name for init in model.graph.initializer}
    shapes = {o.name: static_dims(o) for o in core.graph.output}
    names = b.inline(core, {x_name: x, seed.name: seeds}, "fullgrad", shared=weights)
    del core  # copied into the builder: freed before the graph is built and opened
    size = dims[-2:]

    gx = b.op("Abs", [b.op("Mul", [x, names[GRAD_PREFIX + x_name]])])
    total = b.reduce("ReduceSum", scale_maps(b, gx, axes, eps), [1])  # [B, H, W]
    by_size: dict[tuple[int, int], list[str]] = {}
    for z, bias in layers:
        g = names[GRAD_PREFIX + z]
        term = b.op("Abs", [b.op("Mul", [g, b.float_const(bias.reshape(1, -1, 1, 1), "bias")])])
        summed = b.reduce("ReduceSum", scale_maps(b, term, axes, eps), [1])  # [B, h, w]
        by_size.setdefault(tuple(shapes[GRAD_PREFIX + z][2:]), []).append(summed)
    for low, terms in by_size.items():
        low_sum = terms[0] if len(terms) == 1 else b.op("Sum", terms)
        total = b.op("Add", [total, resize(b, low_sum, low, size, align_corners=not per_channel)])
    b.output("map", scale_maps(b, total, [1, 2], PEER_EPS))
    graph = MethodGraph(b.build("fullgrad"), images)
    graph.metadata["layers"] = str(len(layers))
    return graph


def run_fullgrad(job: Any) -> Iterator[tuple[int, np.ndarray, None, dict[str, Any]]]:
    """FullGrad maps for the job's rows (`job`: cnnviz.methods.explain.Job)."""
    from .explain import _images_per_call, _row_feeds, _runner

    normalization = str(job.options["normalization"])
    images, _ = _images_per_call(job)
    graph = fullgrad_graph(job.model, images, normalization, job.fallback)
    out = _runner(job, graph).run(_row_feeds(job))
    info: dict[str, Any] = {"bias_layers": int(graph.metadata["layers"]),
                            "normalization": normalization}
    if not info["bias_layers"]:
        info["notes"] = ["no layer of this model has a bias: the map is FullGrad's "
                         "input-gradient term alone (|x * dy/dx|)"]
    for r, (i, _) in enumerate(job.rows):
        yield i, out["map"][r], None, info
