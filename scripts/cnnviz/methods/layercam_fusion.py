"""Multi-layer LayerCAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation
Maps for Localization"): LayerCAM at several layers, shallow to deep, fused into one map.

All layers' activations A_l and gradients G_l come from ONE vjp graph (wrt = every layer's
tensor; the backward stops at the shallowest one), one run per chunk. Per layer,
M_l = ReLU(sum_k ReLU(G_lk) * A_lk), min-max scaled at the layer's resolution
((v - min) / (max(v - min) + 1e-7)). Option `fusion` picks how they are fused:

- "mean" (default; pytorch-grad-cam 1.5.7's LayerCAM with target_layers = the same list, its
  BaseCAM.aggregate_multi_layers): each M_l upsampled to the input size (bilinear, half-pixel
  centres, as cv2.resize), averaged over the layers, min-max scaled.
- "max" (the paper's fusion, eq. 9, as TorchCAM 0.5's LayerCAM.fuse_cams writes it): each scaled
  M_l mapped through tanh(2 M_l) (lifting the shallow layers' weak responses), upsampled to the
  largest layer's resolution, fused by the element-wise maximum, then upsampled to the input
  size and min-max scaled. The paper scales the shallow layers only; TorchCAM, and this, scale
  every layer (tanh is monotone, so on a layer whose maximum is 1 it only reshapes the values).

`layers: auto` takes the last layer of each resolution stage (the paper fuses the ends of
VGG16's stages), the deepest `stages` of them; else a comma-separated list of layer names (or
tensors) from the model card, or of any tensors of the model (a residual block's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError

PEER_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image
TANH_GAMMA = 2.0  # the paper's eq. 9 (and TorchCAM's default)


def stage_layers(card: dict[str, Any], stages: int) -> list[dict[str, Any]]:
    """The card's layer rows that end a resolution stage (the next spatial layer has another
    [h, w], or none follows), the deepest `stages` of them, shallow to deep."""
    spatial = [row for row in card["layers"] if row["shape"][-1] > 1 and row["shape"][-2] > 1]
    if not spatial:
        raise ConfigError(f"model {card.get('name')!r} has no conv layer with a spatial output")
    ends = [row for row, after in zip(spatial, [*spatial[1:], None], strict=True)
            if after is None or after["shape"][-2:] != row["shape"][-2:]]
    return ends[-stages:]


def fusion_layers(
    card: dict[str, Any], layers: str, stages: int, model: onnx.ModelProto | None = None
) -> list[str]:
    """The tensors of the `layers` option (see the module docstring), shallow to deep. A name
    that is no layer of the card may be any tensor a node of `model` writes (a residual block's
    output, e.g. ResNet's /layer4/layer4.2/relu_2/Relu_output_0)."""
    from ..modelcard import find_layer

    if str(layers).strip() in ("", "auto"):
        tensors = [row["tensor"] for row in stage_layers(card, stages)]
    else:
        written = {o for n in model.graph.node for o in n.output} if model is not None else set()
        tensors = []
        for name in (n.strip() for n in str(layers).split(",")):
            if not name:
                continue
            try:
                tensors.append(find_layer(card, name)["tensor"])
            except ConfigError:
                if name not in written:
                    raise
                tensors.append(name)
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        raise ConfigError(f"layercam_fusion got no layers from {layers!r}")
    return tensors


def layercam_fusion_graph(
    model: onnx.ModelProto,
    tensors: list[str],
    images: int,
    fusion: str,
    fallback: str = "error",
):  # noqa: ANN201 - MethodGraph
    """In: images [B, 3, H, W], targets [B]. Out: `map` [B, H, W] in [0, 1] (module docstring).
    With "mean", layers of one resolution are summed before one upsampling (it is linear)."""
    from ..autodiff import vjp
    from ..methodgraph import GraphBuilder, MethodGraph, one_hot, resize, seed_input, static_dims
    from .backprop import _image_inputs, model_input_name
    from .cam import GRAD_PREFIX, _raw_cam_in_graph
    from .fullgrad import scale_maps

    if fusion not in ("mean", "max"):
        raise ConfigError(f"layercam_fusion fusion {fusion!r} is not mean or max")
    core = vjp(model, wrt=list(tensors), policy="gradient", batch=images, fallback=fallback)
    shapes = {o.name: static_dims(o) for o in core.graph.output}
    for t in tensors:
        if len(shapes[t]) != 4:
            raise ConfigError(f"layercam_fusion needs [N, C, h, w] layers; {t!r} is {shapes[t]}")
    b = GraphBuilder.for_model(model)
    x, targets, dims = _image_inputs(b, model, images)
    seed = seed_input(core)
    seed_dims = static_dims(seed)[1:]
    seeds = one_hot(b, targets, int(np.prod(seed_dims)), seed_dims)
    weights = {init.name for init in model.graph.initializer}
    names = b.inline(core, {model_input_name(model): x, seed.name: seeds}, "layercam",
                     shared=weights)
    del core  # copied into the builder: freed before the graph is built and opened
    size = list(dims[-2:])
    maps = []  # (low-res size, scaled map [B, h, w])
    for t in tensors:
        raw = _raw_cam_in_graph(b, "layercam", names[t], names[GRAD_PREFIX + t])
        maps.append((list(shapes[t][2:]), scale_maps(b, b.op("Relu", [raw]), [1, 2], PEER_EPS)))
    if fusion == "mean":
        by_size: dict[tuple[int, ...], list[str]] = {}
        for low, m in maps:
            by_size.setdefault(tuple(low), []).append(m)
        ups = [resize(b, ms[0] if len(ms) == 1 else b.op("Sum", ms), list(low), size)
               for low, ms in by_size.items()]
        fused = b.op("Mul", [ups[0] if len(ups) == 1 else b.op("Sum", ups),
                             b.f(1.0 / len(maps))])
    else:
        big = [max(low[0] for low, _ in maps), max(low[1] for low, _ in maps)]
        lifted = []
        for low, m in maps:
            m = b.op("Tanh", [b.op("Mul", [m, b.f(TANH_GAMMA)])])
            lifted.append(m if low == big else resize(b, m, low, big))
        fused = lifted[0] if len(lifted) == 1 else b.op("Max", lifted)
        fused = fused if big == size else resize(b, fused, big, size)
    b.output("map", scale_maps(b, fused, [1, 2], PEER_EPS))
    graph = MethodGraph(b.build("layercam_fusion"), images)
    graph.metadata["layers"] = ",".join(tensors)
    return graph


def run_layercam_fusion(job: Any) -> Iterator[tuple[int, np.ndarray, None, dict[str, Any]]]:
    """Fused multi-layer LayerCAM maps for the job's rows (`job`: explain.Job)."""
    from .explain import _images_per_call, _row_feeds, _runner

    fusion = str(job.options["fusion"])
    tensors = fusion_layers(job.card, job.options["layers"], int(job.options["stages"]),
                            job.model)
    images, _ = _images_per_call(job)
    graph = layercam_fusion_graph(job.model, tensors, images, fusion, job.fallback)
    out = _runner(job, graph).run(_row_feeds(job))
    info = {"layers": graph.metadata["layers"], "fusion": fusion}
    for r, (i, _) in enumerate(job.rows):
        yield i, out["map"][r], None, info
