"""Backward rules of the resampling ops: Gather and GatherElements (registered into `RULES`).

A gather reads data at computed positions; its adjoint scatter-adds each output's gradient back
to the position it was read from (ScatterND / ScatterElements with reduction='add', opset 16+;
both have CUDA kernels). Indices are integers and never get an adjoint. Feature visualization
builds its bilinear resampling (rotation, scale, jitter) from one Gather of four taps.
"""

from __future__ import annotations

import numpy as np

from .rules import _axis, refuse, register

SCATTER_ADD_OPSET = 16  # ScatterND / ScatterElements gained reduction='add' in opset 16


def _nonnegative(ctx, indices: str, dim: int) -> str:
    """`indices` with negative entries wrapped (i + dim where i < 0), as Gather reads them."""
    value = ctx.value(indices)
    if value is not None:
        fixed = np.where(value < 0, value + dim, value).astype(np.int64)
        return ctx.const(fixed, "idx")
    if ctx.np_dtype(indices) != np.int64:
        indices = ctx.op("Cast", [indices], to=7)  # ScatterND takes int64 indices only
    negative = ctx.op("Cast", [ctx.op("Less", [indices, ctx.ints([0])])], to=7)  # int64
    return ctx.op("Add", [indices, ctx.op("Mul", [negative, ctx.ints([dim])])])


def _check_opset(ctx, node) -> None:
    if ctx.opset < SCATTER_ADD_OPSET:
        raise refuse(node, f"its adjoint needs a scatter-add (opset >= {SCATTER_ADD_OPSET})")


@register("Gather")
def gather(ctx, node, gys):
    """out[pre, i..., post] = data[pre, idx[i...], post]; the adjoint adds out's gradient back.

    The gathered axis is moved to the front so one ScatterND (indices [n, 1]) serves any axis.
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
    idx = ctx.reshape(_nonnegative(ctx, indices, ds[axis]), [n, 1])
    front = [ds[axis], *pre, *post]
    scattered = ctx.op("ScatterND", [ctx.zeros(front, data), idx, g], reduction="add")
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
