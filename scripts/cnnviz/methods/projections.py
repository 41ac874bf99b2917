"""Deconvnet projections of hidden features to pixel space (Zeiler & Fergus 2014; seed part 2).

For one image and one layer, each chosen channel is projected *alone*, from its single strongest
activation: the seed is zero everywhere except that channel's maximum value at its argmax
position. The backward of the graph under the "deconvnet" policy (cnnviz.autodiff) is exactly
Zeiler & Fergus's deconvnet: max pooling backward = unpooling with the forward pass's switches,
ReLU backward = ReLU of the reconstruction, convolution backward = the transposed kernels.

The model is cut at the layer first (its output becomes the layer tensor), so the backward graph
holds only the layers below it. One forward session (all layers' tensors) and one deconvnet
session per layer serve every image of a job; all (image, channel) seeds of a layer go through
the deconvnet session in runs of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError
from ..graph import cut_at
from . import backprop

SUPPORT_EPS = 1e-6  # |projection| above this times its max marks the support (for the crop)


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
    """Sessions for projecting channels of `layers`, built once per job."""

    def __init__(
        self,
        model: onnx.ModelProto,
        card: dict[str, Any],
        layers: Sequence[str],
        batch: int = 8,
        device: str = "auto",
        threads: int | None = None,
        fallback: str = "error",
    ) -> None:
        from ..modelcard import find_layer
        from ..runtime import make_session

        self.rows = {name: find_layer(card, name) for name in layers}
        self.input = backprop.model_input_name(model)
        self.forward = make_session(cut_at(model, self._forward_tensors()), device, threads)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, row in self.rows.items():
            graph = backprop.gradient_model(
                cut_at(model, [row["tensor"]]), "deconvnet", batch, seed_output=row["tensor"],
                fallback=fallback,
            )
            self.sessions[name] = make_session(graph, device, threads)

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
            result[name] = (values[row["tensor"]], values[pre] if pre in values and
                            pre != row["tensor"] else None)
        return result

    def project_layers(
        self, images: np.ndarray, channels: Sequence[int] | int
    ) -> dict[str, list[list[dict]]]:
        """{layer: project(...)} for every layer of this projector, from one forward run."""
        forward = self.activations(images)
        return {layer: self.project(images, layer, channels, forward) for layer in self.rows}

    def project(
        self,
        images: np.ndarray,
        layer: str,
        channels: Sequence[int] | int,
        forward: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> list[list[dict]]:
        """Per image, per channel: {channel, value, position [y, x], projection [3, H, W], bbox}.

        `channels`: an int k (the k strongest channels of each image, by max activation) or the
        channel indices to project. `forward`: `activations(images)` when already computed.
        """
        images = np.asarray(images, np.float32)
        if layer not in self.rows:
            built = ", ".join(self.rows)
            raise ConfigError(f"layer {layer!r} has no projection session (built: {built})")
        acts, pres = (forward or self.activations(images))[layer]
        xs, seeds, infos = [], [], []
        for i, act in enumerate(acts):
            pre = None if pres is None else pres[i]
            chosen = (top_channels(act, channels, pre) if isinstance(channels, int)
                      else list(channels))
            s, info = unit_seeds(act, chosen, pre)
            xs.append(np.repeat(images[i : i + 1], len(chosen), axis=0))
            seeds.append(s)
            infos.append(info)
        if not any(len(s) for s in seeds):
            return infos
        grads, _ = backprop.gradients(
            self.sessions[layer], np.concatenate(xs), np.concatenate(seeds)
        )
        start = 0
        for info in infos:
            for item in info:
                item["projection"] = grads[start]
                item["bbox"] = support_bbox(grads[start])
                start += 1
        return infos


def project_channels(
    model: onnx.ModelProto,
    card: dict[str, Any],
    image: np.ndarray,
    layer: str,
    channels: Sequence[int] | int = 9,
    device: str = "auto",
    threads: int | None = None,
) -> list[dict]:
    """One image, one layer: each channel's deconvnet projection from its max activation alone.

    Returns one dict per channel: channel, value (the max activation), position ([y, x] in the
    layer's map), projection (float32 [3, H, W] at input size), bbox (its support, [y0, y1, x0,
    x1], half-open). Builds its own sessions: for many images use a Projector.
    """
    k = channels if isinstance(channels, int) else len(channels)
    projector = Projector(model, card, [layer], max(1, k), device, threads)
    return projector.project(np.asarray(image, np.float32)[None], layer, channels)[0]


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
def projection_graph(model: onnx.ModelProto, card: dict[str, Any], layers: Sequence[str],
                     k: int, images: int, fallback: str = "error"):  # noqa: ANN201
    """Every layer's top-k deconvnet projections of a batch of images as one graph.

    Per layer, the model cut at the layer is differentiated under the deconvnet policy at
    batch images * k (row (b, j): image b, its j-th strongest channel). The seeds are made in
    the graph from the rows' own forward pass: the channels ranked by their peak (the
    pre-activation's when the layer is an activation of it, which breaks ReLU6 ties as
    `top_channels` does; ties go to the lower index), each seeded with its maximum value at
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
    for index, name in enumerate(layers):
        row = find_layer(card, name)
        tensor = row["tensor"]
        core = backprop.gradient_model(cut_at(model, [tensor]), "deconvnet", rows,
                                       seed_output=tensor, fallback=fallback)
        seed = seed_input(core)
        channels, h, w = static_dims(seed)[1:]
        if k > channels:
            raise ConfigError(f"projections.top_k {k} is more than layer {name!r}'s "
                              f"{channels} channels")
        prefix = f"layer{index}"
        seeds_name = f"{prefix}/seeds"
        names = b.inline(core, {x_name: x_rows, seed.name: seeds_name}, prefix, shared=weights)
        acts = names[tensor]
        pre = _ranking_tensor(core, tensor)
        rank = f"{prefix}/{pre}" if pre else acts
        peaks = b.reduce("ReduceMax", rank, [2, 3])  # [rows, C]
        if b.opset >= 10:
            _, order = b.op_multi("TopK", [peaks, b.ints([k])], 2, axis=1)
        else:
            _, order = b.op_multi("TopK", [peaks], 2, axis=1, k=k)
        which = b.const(np.tile(np.arange(k, dtype=np.int64), images)[:, None], "rank")
        channel = b.op("GatherElements", [order, which], axis=1)  # [rows, 1]
        in_channel = b.op("Cast", [b.op("Equal", [
            b.const(np.arange(channels, dtype=np.int64)[None], "channels"), channel])], to=FLOAT)
        in_channel = b.reshape(in_channel, [rows, channels, 1, 1])
        rank_map = b.reshape(b.reduce("ReduceSum", b.op("Mul", [rank, in_channel]), [1]),
                             [rows, h * w])
        position = b.op("ArgMax", [rank_map], axis=1, keepdims=1)  # [rows, 1]
        at = b.op("Cast", [b.op("Equal", [
            b.const(np.arange(h * w, dtype=np.int64)[None], "positions"), position])], to=FLOAT)
        act_map = b.reshape(b.reduce("ReduceSum", b.op("Mul", [acts, in_channel]), [1]),
                            [rows, h * w])
        value = b.reduce("ReduceSum", b.op("Mul", [act_map, at]), [1], keepdims=True)
        seeds = b.op("Mul", [b.op("Mul", [in_channel, b.reshape(at, [rows, 1, h, w])]),
                             b.reshape(value, [rows, 1, 1, 1])])
        b.nodes.append(onnx.helper.make_node("Identity", [seeds], [seeds_name]))
        b.output(f"projections/{index}", b.reshape(names["grad:" + x_name],
                                                  [images, k, *dims]))
        b.output(f"channels/{index}", b.reshape(channel, [images, k]), INT64)
        b.output(f"positions/{index}", b.reshape(position, [images, k]), INT64)
        b.output(f"values/{index}", b.reshape(value, [images, k]))
        shapes[f"shape/{index}"] = f"{h},{w}"
    graph = MethodGraph(b.build("projections"), images, image_inputs=("images",))
    graph.metadata.update(shapes)
    return graph


def _ranking_tensor(core: onnx.ModelProto, tensor: str) -> str | None:
    """The pre-activation when `tensor` is a Relu/Clip/LeakyRelu of it (ranking channels by it
    is ranking by the activation's peak with ties at the ReLU6 ceiling broken), else None."""
    producer = next((n for n in core.graph.node if tensor in n.output), None)
    if producer is not None and producer.op_type in ("Relu", "Clip", "LeakyRelu"):
        return producer.input[0]
    return None


class ProjectionRunner:
    """`projection_graph` in one runner, built once per job; `project_layers` as Projector's."""

    def __init__(self, model: onnx.ModelProto, card: dict[str, Any], layers: Sequence[str],
                 k: int, images: int, device: str = "auto", threads: int | None = None,
                 fallback: str = "error") -> None:
        from ..runner import Runner

        self.layers = list(dict.fromkeys(layers))
        self.k = k
        self.runner = Runner(projection_graph(model, card, self.layers, k, images, fallback),
                             device, threads)

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
                        "position": [int(v) for v in np.unravel_index(
                            int(out[f"positions/{index}"][i, j]), shape)],
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


def unit_projection_graph(model: onnx.ModelProto, tensor: str, rows: int,
                          policy: str = "deconvnet",
                          fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """Given units projected alone, as one graph (the feature atlas's projections).

    In, per row: `images` [R, 3, H, W], the unit's `channels` and `positions` (flat index in the
    layer's map) [R] int64 and `values` [R]; the seed is zero except the value at the unit. Out:
    `projections` [R, 3, H, W], the backward signal (deconvnet by default) of the model cut at
    `tensor`.
    """
    from ..methodgraph import FLOAT, INT64, GraphBuilder, MethodGraph, seed_input, static_dims

    core = backprop.gradient_model(cut_at(model, [tensor]), policy, rows,
                                   seed_output=tensor, fallback=fallback)
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

    seeds = b.op("Mul", [b.reshape(one_hot(unit_channel, channels), [rows, channels, 1, 1]),
                         b.reshape(one_hot(unit_position, h * w), [rows, 1, h, w])])
    seeds = b.op("Mul", [seeds, b.reshape(value, [rows, 1, 1, 1])])
    names = b.inline(core, {backprop.model_input_name(model): x, seed.name: seeds}, "model")
    b.output("projections", names["grad:" + backprop.model_input_name(model)])
    graph = MethodGraph(b.build("unit_projections"), rows,
                        image_inputs=("images", "channels", "positions", "values"))
    graph.metadata["map_width"] = str(w)
    return graph
