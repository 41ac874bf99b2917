"""Backward rules of the resampling ops: Gather, GatherElements, GatherND (registered in `RULES`).

A gather reads data at computed positions; its adjoint scatter-adds each output's gradient back
to the position it was read from: ScatterElements with reduction='add' (opset 16+, CUDA kernels
from 16). Never ScatterND(add): ONNX Runtime's CPU kernel splits the updates over its intra-op
threads with no guard against two of them adding to one position (onnxruntime#18048), so with
repeated indices (two taps reading one pixel, overlapping pooling windows) it loses updates,
differently on every run; ScatterElements' CPU kernel adds in one pass. `scatter_add` is the one
place that writes it. Indices are integers and never get an adjoint. Feature visualization
builds its bilinear resampling (rotation, scale, jitter) from one Gather of four taps.
"""

from __future__ import annotations

import numpy as np

from .rules import _axis, refuse, register

SCATTER_ADD_OPSET = 16  # ScatterElements gained reduction='add' in opset 16


def scatter_add(ctx, shape: list[int], like: str, indices: str, updates: str, n: int) -> str:
    """zeros(shape) with updates[i, ...] added at row indices[i] (int64 [n]) along axis 0, for
    updates of shape [n] + shape[1:]; repeated indices add up (deterministically, see above)."""
    rows = ctx.reshape(indices, [n] + [1] * (len(shape) - 1))
    if len(shape) > 1:
        rows = ctx.op("Expand", [rows, ctx.ints([n, *shape[1:]])])
    return ctx.op(
        "ScatterElements", [ctx.zeros(shape, like), rows, updates], axis=0, reduction="add"
    )


def _nonnegative(ctx, indices: str, dim: int) -> str:
    """`indices` with negative entries wrapped (i + dim where i < 0), as Gather reads them."""
    value = ctx.value(indices)
    if value is not None:
        fixed = np.where(value < 0, value + dim, value).astype(np.int64)
        return ctx.const(fixed, "idx")
    if ctx.np_dtype(indices) != np.int64:
        indices = ctx.op("Cast", [indices], to=7)  # one index type for every caller
    negative = ctx.op("Cast", [ctx.op("Less", [indices, ctx.ints([0])])], to=7)  # int64
    return ctx.op("Add", [indices, ctx.op("Mul", [negative, ctx.ints([dim])])])


def _check_opset(ctx, node) -> None:
    if ctx.opset < SCATTER_ADD_OPSET:
        raise refuse(node, f"its adjoint needs a scatter-add (opset >= {SCATTER_ADD_OPSET})")


@register("Gather")
def gather(ctx, node, gys):
    """out[pre, i..., post] = data[pre, idx[i...], post]; the adjoint adds out's gradient back.

    The gathered axis is moved to the front so one scatter along axis 0 serves any axis.
    """
    _check_opset(ctx, node)
    data, indices = node.input[:2]
    ds = ctx.shape(data)
    rank = len(ds)
    axis = _axis(int(dict((a.name, a.i) for a in node.attribute).get("axis", 0)), rank)
    is_ = ctx.shape(indices)
    q = len(is_)
    n = int(np.prod(is_)) if q else 1
    pre, post = list(ds[:axis]), list(ds[axis + 1 :])
    # gy: pre + is_ + post -> is_ + pre + post -> [n] + pre + post
    perm = [*range(axis, axis + q), *range(axis), *range(axis + q, axis + q + len(post))]
    g = gys[0]
    if perm != list(range(len(perm))):
        g = ctx.op("Transpose", [g], perm=perm)
    g = ctx.reshape(g, [n, *pre, *post])
    idx = ctx.reshape(_nonnegative(ctx, indices, ds[axis]), [n])
    scattered = scatter_add(ctx, [ds[axis], *pre, *post], data, idx, g, n)
    if axis:  # [D_a] + pre + post -> pre + [D_a] + post
        back = list(range(1, axis + 1)) + [0] + list(range(axis + 1, rank))
        scattered = ctx.op("Transpose", [scattered], perm=back)
    return [scattered, None]


@register("GatherElements")
def gather_elements(ctx, node, gys):
    """out[..., i, ...] = data[..., idx[..., i, ...], ...] along `axis`: ScatterElements(add)."""
    _check_opset(ctx, node)
    data, indices = node.input[:2]
    ds = ctx.shape(data)
    axis = _axis(int(dict((a.name, a.i) for a in node.attribute).get("axis", 0)), len(ds))
    idx = _nonnegative(ctx, indices, ds[axis])
    gx = ctx.op(
        "ScatterElements", [ctx.zeros(ds, data), idx, gys[0]], axis=axis, reduction="add"
    )
    return [gx, None]


@register("GatherND")
def gather_nd(ctx, node, gys):
    """out[i...] = data[idx[i..., 0], ..., idx[i..., k-1], rest]: the first k axes of data are
    flattened into one, each index tuple becomes a row number on it, and the adjoint is one
    scatter-add of rows. (The dynamo exporter writes adaptive average pooling to a larger
    output as a Transpose + GatherND of constant positions, as in torchvision's VGG and AlexNet
    below 224 px.)"""
    _check_opset(ctx, node)
    if int(dict((a.name, a.i) for a in node.attribute).get("batch_dims", 0)):
        raise refuse(node, "batch_dims > 0 has no rule (only batch_dims=0)")
    data, indices = node.input[:2]
    ds, is_ = list(ctx.shape(data)), list(ctx.shape(indices))
    k = is_[-1]
    n = int(np.prod(is_[:-1])) if len(is_) > 1 else 1
    rest = ds[k:]
    strides = [int(np.prod(ds[j + 1 : k])) for j in range(k)]
    value = ctx.value(indices)
    if value is not None:
        tuples = value.reshape(n, k).astype(np.int64)
        tuples = np.where(tuples < 0, tuples + np.array(ds[:k]), tuples)
        rows = ctx.const(tuples @ np.array(strides, dtype=np.int64), "idx")
    else:
        tuples = ctx.reshape(indices, [n, k])
        if ctx.np_dtype(indices) != np.int64:
            tuples = ctx.op("Cast", [tuples], to=7)
        negative = ctx.op("Cast", [ctx.op("Less", [tuples, ctx.ints([0])])], to=7)
        tuples = ctx.op("Add", [tuples, ctx.op("Mul", [negative, ctx.ints(ds[:k])])])
        weighted = ctx.op("Mul", [tuples, ctx.ints(strides)])
        rows = ctx.reduce_sum(weighted, [1], keepdims=False)
    g = ctx.reshape(gys[0], [n, *rest])
    scattered = scatter_add(ctx, [int(np.prod(ds[:k])), *rest], data, rows, g, n)
    return [ctx.reshape(scattered, ds), None]
