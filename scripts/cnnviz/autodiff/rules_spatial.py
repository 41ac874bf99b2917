"""Backward rules of spatial, reduction and normalization ops (registered into `RULES`).

Pad (edge/reflect/wrap), Resize/Upsample, Tile and Einsum are linear maps whose matrices are
known when the backward graph is built (shapes are static there): their adjoints are written as
slices, sums and MatMuls with constant matrices computed here with numpy. Max-like reductions
route the gradient to the extremal entries; the normalizations recompute their statistics.
"""

from __future__ import annotations

import numpy as np

from .rules import _pad, refuse

# ---- Pad: edge / reflect / wrap ------------------------------------------------------------------


def _slice(ctx, g: str, axis: int, start: int, stop: int) -> str:
    if ctx.opset >= 10:
        return ctx.op("Slice", [g, ctx.ints([start]), ctx.ints([stop]), ctx.ints([axis])])
    return ctx.op("Slice", [g], starts=[start], ends=[stop], axes=[axis])


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split an index map into maximal runs (j0, j1, step) with step -1, 0 or +1 over j0..j1-1."""
    runs, j = [], 0
    while j < len(idx):
        step = int(idx[j + 1] - idx[j]) if j + 1 < len(idx) else 1
        if step not in (-1, 0, 1):
            step = 1
        k = j + 1
        while k < len(idx) and idx[k] - idx[k - 1] == step:
            k += 1
        runs.append((j, k, step))
        j = k
    return runs


def gather_adjoint_1d(ctx, g: str, shape: list[int], axis: int, idx: np.ndarray, n: int) -> str:
    """Adjoint of out = take(x, idx, axis) for a static index map `idx` into [0, n).

    `g` has shape `shape` (idx's length along `axis`). Each run of consecutive, contiguous reads
    becomes one Slice (reversed by a Gather where the run walks backwards, summed where it
    repeats one entry) placed into x's extent by a zero Pad; the pieces add up. Linear in the
    tensor size, unlike a MatMul with the 0/1 matrix; edge, reflect and wrap padding give 2-3 runs.
    """
    rank = len(shape)
    parts = []
    for j0, j1, step in _runs(idx):
        piece = _slice(ctx, g, axis, j0, j1) if (j0, j1) != (0, len(idx)) else g
        lo, hi = int(idx[j0]), int(idx[j1 - 1])
        if step == 0:
            piece = ctx.reduce_sum(piece, [axis], keepdims=True)
        elif step == -1:
            reverse = ctx.ints(range(j1 - j0 - 1, -1, -1))
            piece = ctx.op("Gather", [piece, reverse], axis=axis)
            lo, hi = hi, lo
        if (lo, hi) != (0, n - 1):
            begins, ends = [0] * rank, [0] * rank
            begins[axis], ends[axis] = lo, n - 1 - hi
            piece = _pad(ctx, piece, begins, ends)
        parts.append(piece)
    return parts[0] if len(parts) == 1 else ctx.op("Sum", parts)


def pad_adjoint(ctx, node, g: str, xs: list[int], pads: list[int], mode: str) -> str:
    """Pad with mode edge/reflect/wrap reads out[j] = x[idx[j]] per axis (numpy's np.pad index
    maps, which ONNX Runtime follows); padding is separable, so the adjoint goes axis by axis."""
    rank = len(xs)
    if any(p < 0 for p in pads):
        raise refuse(node, f"negative pads with mode={mode!r}")
    shape = [xs[i] + pads[i] + pads[rank + i] for i in range(rank)]
    for axis in range(rank):
        before, after = pads[axis], pads[rank + axis]
        if not before and not after:
            continue
        n = xs[axis]
        idx = np.pad(np.arange(n), (before, after), mode=mode)
        g = gather_adjoint_1d(ctx, g, shape, axis, idx, n)
        shape[axis] = n
    return g
