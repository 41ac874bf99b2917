"""Deconvnet projections of hidden features to pixel space (Zeiler & Fergus 2014; seed part 2).

For one image and one layer, each chosen channel is projected *alone*, from its single strongest
activation: the seed is zero everywhere except that channel's maximum value at its argmax
position. The backward of the graph under the "deconvnet" policy (cnnviz.autodiff) is exactly
Zeiler & Fergus's deconvnet: max pooling backward = unpooling with the forward pass's switches,
ReLU backward = ReLU of the reconstruction, convolution backward = the transposed kernels.

The model is cut at the layer first (its output becomes the layer tensor), so the backward graph
holds only the layers below it. Every layer's top-k projections of a batch of images are one
graph (`projection_graph`, run by `ProjectionRunner` through the one runner, cnnviz.runner):
the channels, their seeds and the backward runs are all in it. The step-by-step definition it
is tested against (a forward session, seeds chosen on the host, a deconvnet session per layer)
lives in the tests (tests/reference_methods.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph import cut_at
from . import backprop

SUPPORT_EPS = 1e-6  # |projection| above this times its max marks the support (for the crop)


def support_bbox(projection: np.ndarray, eps: float = SUPPORT_EPS) -> list[int]:
    """[y0, y1, x0, x1] (half-open) of where |projection| exceeds eps * its max; all if empty."""
    mag = np.abs(projection).max(axis=0)
    peak = float(mag.max())
    h, w = mag.shape
    if peak <= 0:
        return [0, h, 0, w]
    ys, xs = np.nonzero(mag > eps * peak)
    return [int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1]


# ---- pictures and artifacts ----------------------------------------------------------------------
def _tile(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(shape, Image.Resampling.LANCZOS))
    out = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def projection_grid(display: np.ndarray, items: Sequence[dict], tile: int = 112) -> np.ndarray:
    """uint8 picture: one row per channel, [projection (signed RGB, grey = 0) | image patch].

    Both are cropped to the projection's support (its receptive field in practice) and scaled to
    `tile` pixels; a short text strip names the channel, its max activation and position.
    """
    from PIL import Image, ImageDraw

    display = np.asarray(display, np.uint8)
    label_h, gap = 14, 4
    width = 2 * tile + gap
    rows = []
    for item in items:
        y0, y1, x0, x1 = item["bbox"]
        proj = backprop.signed_rgb(item["projection"][:, y0:y1, x0:x1])
        patch = _resize_like(display, item["projection"].shape[1:])[y0:y1, x0:x1]
        row = np.full((label_h + tile + gap, width, 3), 255, np.uint8)
        row[label_h : label_h + tile, :tile] = _tile(proj, tile)
        row[label_h : label_h + tile, tile + gap :] = _tile(patch, tile)
        picture = Image.fromarray(row)
        text = f"ch {item['channel']}  max {item['value']:.3g}  at {tuple(item['position'])}"
        ImageDraw.Draw(picture).text((2, 1), text, fill=(0, 0, 0))
        rows.append(np.asarray(picture))
    if not rows:
        return np.full((tile, width, 3), 255, np.uint8)
    return np.concatenate(rows, axis=0)


def _resize_like(display: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if display.shape[:2] == tuple(shape):
        return display
    from PIL import Image

    size = (shape[1], shape[0])
    return np.asarray(Image.fromarray(display).resize(size, Image.Resampling.BILINEAR))


# ---- projections as one graph (cnnviz.methodgraph; run by cnnviz.runner.Runner) ---------------
def projection_graph(
    model: onnx.ModelProto,
    card: dict[str, Any],
    layers: Sequence[str],
    k: int,
    images: int,
    fallback: str = "error",
    policies: Sequence[str] | None = None,
):  # noqa: ANN201
    """Every layer's top-k projections of a batch of images as one graph.

    Per layer, the model cut at the layer is differentiated under its engine policy
    (`policies`, one per layer; deconvnet by default, see projection_policy) at
    batch images * k (row (b, j): image b, its j-th strongest channel). The seeds are made in
    the graph from the rows' own forward pass: the channels ranked by their peak (the
    pre-activation's when the layer is an activation of it, which breaks ties at a ReLU6
    ceiling; ties left go to the lower index), each seeded with its maximum value at
    its argmax. Out per layer i: `projections/i` [B, k, 3, H, W], `channels/i`, `positions/i`
    (flat index in the layer's map) [B, k] int64 and `values/i` [B, k].
    """
    from ..methodgraph import (
        FLOAT,
        INT64,
        GraphBuilder,
        MethodGraph,
        repeat_rows,
        seed_input,
        static_dims,
    )
    from ..modelcard import find_layer

    b = GraphBuilder.for_model(model)
    x, _, dims = backprop._image_inputs(b, model, images)
    b.inputs = [i for i in b.inputs if i.name != "targets"]
    rows = images * k
    x_rows = repeat_rows(b, x, [images, *dims], k)
    x_name = backprop.model_input_name(model)
    weights = {t.name for t in model.graph.initializer}  # one copy for every layer's graph
    shapes = {}
    policies = list(policies or ["deconvnet"] * len(layers))
    for index, name in enumerate(layers):
        row = find_layer(card, name)
        tensor = row["tensor"]
        # Seeded at the pre-activation when the layer is an activation of it: the same
        # projection wherever the activation's slope is 1, but a saturated unit (ReLU6 at 6,
        # most top units of EfficientNet-Lite0) would otherwise project through its own zero
        # slope to a flat picture under guided backprop or the gradient (as the atlas does).
        pre = _ranking_tensor(model, tensor)
        core = backprop.gradient_model(
            cut_at(model, [tensor]), policies[index], rows, seed_output=pre or tensor,
            fallback=fallback,
        )
        seed = seed_input(core)
        channels, h, w = static_dims(seed)[1:]
        if k > channels:
            raise ConfigError(
                f"projections.top_k {k} is more than layer {name!r}'s {channels} channels"
            )
        prefix = f"layer{index}"
        seeds_name = f"{prefix}/seeds"
        names = b.inline(core, {x_name: x_rows, seed.name: seeds_name}, prefix, shared=weights)
        acts = names[tensor]
        ranked_by = _ranking_tensor(core, tensor)
        rank = f"{prefix}/{ranked_by}" if ranked_by else acts
        peaks = b.reduce("ReduceMax", rank, [2, 3])  # [rows, C]
        if b.opset >= 10:
            _, order = b.op_multi("TopK", [peaks, b.ints([k])], 2, axis=1)
        else:
            _, order = b.op_multi("TopK", [peaks], 2, axis=1, k=k)
        which = b.const(np.tile(np.arange(k, dtype=np.int64), images)[:, None], "rank")
        channel = b.op("GatherElements", [order, which], axis=1)  # [rows, 1]
        in_channel = b.op(
            "Cast",
            [
                b.op(
                    "Equal",
                    [b.const(np.arange(channels, dtype=np.int64)[None], "channels"), channel],
                )
            ],
            to=FLOAT,
        )
        in_channel = b.reshape(in_channel, [rows, channels, 1, 1])
        rank_map = b.reshape(
            b.reduce("ReduceSum", b.op("Mul", [rank, in_channel]), [1]), [rows, h * w]
        )
        position = b.op("ArgMax", [rank_map], axis=1, keepdims=1)  # [rows, 1]
        at = b.op(
            "Cast",
            [
                b.op(
                    "Equal",
                    [b.const(np.arange(h * w, dtype=np.int64)[None], "positions"), position],
                )
            ],
            to=FLOAT,
        )
        act_map = b.reshape(
            b.reduce("ReduceSum", b.op("Mul", [acts, in_channel]), [1]), [rows, h * w]
        )
        value = b.reduce("ReduceSum", b.op("Mul", [act_map, at]), [1], keepdims=True)
        seeds = b.op(
            "Mul",
            [
                b.op("Mul", [in_channel, b.reshape(at, [rows, 1, h, w])]),
                b.reshape(value, [rows, 1, 1, 1]),
            ],
        )
        b.nodes.append(onnx.helper.make_node("Identity", [seeds], [seeds_name]))
        b.output(f"projections/{index}", b.reshape(names["grad:" + x_name], [images, k, *dims]))
        b.output(f"channels/{index}", b.reshape(channel, [images, k]), INT64)
        b.output(f"positions/{index}", b.reshape(position, [images, k]), INT64)
        b.output(f"values/{index}", b.reshape(value, [images, k]))
        shapes[f"shape/{index}"] = f"{h},{w}"
    graph = MethodGraph(b.build("projections"), images, image_inputs=("images",))
    graph.metadata.update(shapes)
    return graph


def _ranking_tensor(model: onnx.ModelProto, tensor: str) -> str | None:
    """The pre-activation when `tensor` is a Relu/Clip/LeakyRelu of it (ranking channels by it
    is ranking by the activation's peak with ties at the ReLU6 ceiling broken; projections are
    seeded there), else None."""
    producer = next((n for n in model.graph.node if tensor in n.output), None)
    if producer is not None and producer.op_type in ("Relu", "Clip", "LeakyRelu"):
        return producer.input[0]
    return None


class ProjectionRunner:
    """`projection_graph` in one runner, built once per job."""

    def __init__(
        self,
        model: onnx.ModelProto,
        card: dict[str, Any],
        layers: Sequence[str],
        k: int,
        images: int,
        device: str = "auto",
        threads: int | None = None,
        fallback: str = "error",
        policy: str = "auto",
    ) -> None:
        from ..modelcard import find_layer
        from ..runner import Runner
        from .projection_policy import resolve

        self.layers = list(dict.fromkeys(layers))
        self.k = k
        # {layer: (engine policy, why)}: the rule each layer's pictures were made with
        self.policies = {
            layer: resolve(model, find_layer(card, layer)["tensor"], policy)
            for layer in self.layers
        }
        graph = projection_graph(model, card, self.layers, k, images, fallback,
                                 [self.policies[layer][0] for layer in self.layers])
        self.runner = Runner(graph, device, threads)

    def project_layers(self, images: np.ndarray, k: int | None = None) -> dict[str, list]:
        """{layer: per image, per channel: {channel, value, position [y, x], projection
        [3, H, W], bbox}} for a batch [N, 3, H, W], strongest channel first."""
        out = self.runner.run({"images": np.asarray(images, np.float32)})
        result = {}
        for index, layer in enumerate(self.layers):
            proj = out[f"projections/{index}"]
            shape = self._map_shape(index)
            result[layer] = [
                [
                    {
                        "channel": int(out[f"channels/{index}"][i, j]),
                        "value": float(out[f"values/{index}"][i, j]),
                        "position": [
                            int(v)
                            for v in np.unravel_index(int(out[f"positions/{index}"][i, j]), shape)
                        ],
                        "projection": proj[i, j],
                        "bbox": support_bbox(proj[i, j]),
                    }
                    for j in range(self.k)
                ]
                for i in range(len(proj))
            ]
        return result

    def _map_shape(self, index: int) -> tuple[int, int]:
        h, w = self.runner.graph.metadata[f"shape/{index}"].split(",")
        return int(h), int(w)


def unit_projection_graph(
    model: onnx.ModelProto,
    tensor: str,
    rows: int,
    policy: str = "deconvnet",
    fallback: str = "error",
):  # noqa: ANN201 - MethodGraph
    """Given units projected alone, as one graph (the feature atlas's projections).

    In, per row: `images` [R, 3, H, W], the unit's `channels` and `positions` (flat index in the
    layer's map) [R] int64 and `values` [R]; the seed is zero except the value at the unit. Out:
    `projections` [R, 3, H, W], the backward signal (deconvnet by default) of the model cut at
    `tensor`.
    """
    from ..methodgraph import FLOAT, INT64, GraphBuilder, MethodGraph, seed_input, static_dims

    core = backprop.gradient_model(
        cut_at(model, [tensor]), policy, rows, seed_output=tensor, fallback=fallback
    )
    seed = seed_input(core)
    channels, h, w = static_dims(seed)[1:]
    b = GraphBuilder.for_model(model)
    x, _, _ = backprop._image_inputs(b, model, rows)
    b.inputs = [i for i in b.inputs if i.name != "targets"]
    unit_channel = b.input("channels", INT64, [rows])
    unit_position = b.input("positions", INT64, [rows])
    value = b.input("values", FLOAT, [rows])

    def one_hot(index: str, size: int) -> str:
        column = b.reshape(index, [rows, 1])
        hits = b.op("Equal", [b.const(np.arange(size, dtype=np.int64)[None], "range"), column])
        return b.op("Cast", [hits], to=FLOAT)

    seeds = b.op(
        "Mul",
        [
            b.reshape(one_hot(unit_channel, channels), [rows, channels, 1, 1]),
            b.reshape(one_hot(unit_position, h * w), [rows, 1, h, w]),
        ],
    )
    seeds = b.op("Mul", [seeds, b.reshape(value, [rows, 1, 1, 1])])
    names = b.inline(core, {backprop.model_input_name(model): x, seed.name: seeds}, "model")
    b.output("projections", names["grad:" + backprop.model_input_name(model)])
    graph = MethodGraph(
        b.build("unit_projections"),
        rows,
        image_inputs=("images", "channels", "positions", "values"),
    )
    graph.metadata["map_width"] = str(w)
    return graph
