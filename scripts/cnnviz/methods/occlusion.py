"""Occlusion (Zeiler & Fergus 2014): how much the target's probability drops under a grey patch.

A `window` x `window` patch of the baseline (0 in the model's input space: the mean pixel, since
inputs are normalised with the dataset mean) slides over the image with `stride`; the map at a
pixel is the drop p_t(x) - p_t(occluded) averaged over the patches that cover it. This is captum's
Occlusion with sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
baselines=0 on the softmax of the logits: captum places ceil((H - window) / stride) + 1 windows
per axis, so the last one may stick out of the image and is cut at the border, and every pixel is
covered. The occluded copies are made and scored in one graph (`occlusion_graph`, run by the one
runner, cnnviz.runner), a call's worth of patches at a time; the step-by-step definition it is
tested against lives in the tests (tests/reference_methods.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..methodgraph import FLOAT, INT64


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top-left offsets along one axis, as captum counts them."""
    if window > size:
        raise ConfigError(f"occlusion window {window} is larger than the image side {size}")
    if stride < 1 or (stride > window and window < size):
        raise ConfigError(
            f"occlusion stride {stride} must be between 1 and the window {window}, "
            "or pixels would never be occluded"
        )
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


# ---- occlusion as one graph (cnnviz.methodgraph; run by cnnviz.runner.Runner) -----------------
OUTSIDE = 1 << 30  # a padded point's patch origin: a patch that covers nothing


def patch_origins(size: tuple[int, int], window: int, stride: int) -> np.ndarray:
    """[P, 2] int64 (top, left) of every patch, row by row (captum's order)."""
    height, width = size
    return np.array(
        [
            (top, left)
            for top in window_starts(height, window, stride)
            for left in window_starts(width, window, stride)
        ],
        dtype=np.int64,
    )


def patch_counts(size: tuple[int, int], window: int, stride: int) -> np.ndarray:
    """[H, W]: how many patches cover each pixel."""
    count = np.zeros(size)
    for top, left in patch_origins(size, window, stride):
        count[top : top + window, left : left + window] += 1
    return count


def occlusion_graph(
    model: onnx.ModelProto,
    card: dict[str, Any],
    images: int,
    points: int,
    window: int,
    baseline: float = 0.0,
):  # noqa: ANN201 - MethodGraph
    """Occlusion as one graph. Per image x: the call's `points` patches (per-point input
    `origins` [P, 2]) give the rows x with patch p set to `baseline`, plus x itself; the model
    scores every row; out `total` [B, H, W] = sum_p (p_t(x) - p_t(x with patch p)) * patch_p,
    summed by the runner over calls (the map is total / patch_counts)."""
    from ..autodiff.prepare import prepare
    from ..methodgraph import GraphBuilder, MethodGraph, one_hot, repeat_rows
    from .backprop import _image_inputs, model_input_name

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    channels, height, width = dims
    origins = b.input("origins", INT64, [points, 2])

    def inside(start: str, size: int) -> str:  # [P, size]: start <= i < start + window
        i = b.const(np.arange(size, dtype=np.int64)[None], "index")
        after = b.op("Not", [b.op("Less", [i, start])])
        before = b.op("Less", [i, b.op("Add", [start, b.const(np.array(window, np.int64))])])
        return b.op("Cast", [b.op("And", [after, before])], to=FLOAT)

    tops = b.op("Slice", [origins, b.ints([0]), b.ints([1]), b.ints([1])])
    lefts = b.op("Slice", [origins, b.ints([1]), b.ints([2]), b.ints([1])])
    patch = b.op(
        "Mul",
        [
            b.reshape(inside(tops, height), [points, height, 1]),
            b.reshape(inside(lefts, width), [points, 1, width]),
        ],
    )  # [P, H, W]
    keep = b.reshape(b.op("Sub", [b.f(1.0), patch]), [1, points, 1, height, width])
    hidden = b.op("Mul", [b.reshape(x, [images, 1, *dims]), keep])
    if baseline:
        fill = b.op("Mul", [b.reshape(patch, [1, points, 1, height, width]), b.f(baseline)])
        hidden = b.op("Add", [hidden, fill])
    both = b.op("Concat", [b.reshape(x, [images, 1, *dims]), hidden], axis=1)
    rows = images * (points + 1)
    forward = prepare(model, rows)
    out_name = card.get("output", {}).get("name")
    outputs = [o.name for o in forward.graph.output]
    names = b.inline(forward, {model_input_name(model): b.reshape(both, [rows, *dims])}, "model")
    scores = b.reshape(names[out_name if out_name in outputs else outputs[0]], [rows, -1])
    classes = int(card["output"]["num_classes"])
    if card.get("output", {}).get("kind", "logits") != "probabilities":
        scores = b.op("Softmax", [scores], axis=1)
    target_rows = one_hot(b, repeat_rows(b, t, [images], points + 1), classes, [classes])
    p = b.reshape(
        b.reduce("ReduceSum", b.op("Mul", [scores, target_rows]), [1]), [images, points + 1]
    )
    reference = b.op("Slice", [p, b.ints([0]), b.ints([1]), b.ints([1])])
    hidden_p = b.op("Slice", [p, b.ints([1]), b.ints([points + 1]), b.ints([1])])
    drops = b.op("Sub", [reference, hidden_p])  # [B, P]
    total = b.op("MatMul", [drops, b.reshape(patch, [points, height * width])])
    b.output("total", b.reshape(total, [images, height, width]))
    return MethodGraph(
        b.build("occlusion"),
        images,
        points,
        point_inputs=("origins",),
        summed=("total",),
        point_padding={"origins": OUTSIDE},
    )
