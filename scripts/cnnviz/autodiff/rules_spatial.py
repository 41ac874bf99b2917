"""Backward rules of spatial, reduction and normalization ops (registered into `RULES`).

Pad (edge/reflect/wrap), Resize/Upsample, Tile and Einsum are linear maps whose matrices are
known when the backward graph is built (shapes are static there): their adjoints are written as
slices, sums and MatMuls with constant matrices computed here with numpy. Max-like reductions
route the gradient to the extremal entries; the normalizations recompute their statistics.
"""

from __future__ import annotations

import numpy as np

from .context import attrs_of
from .rules import _axis, _pad, _reduce_axes, only_first_input, refuse, register

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


# ---- Resize and Upsample -------------------------------------------------------------------------


def _source_coordinates(n_in: int, n_out: int, scale: float, transform: str) -> np.ndarray:
    """Input coordinate of each output index, in float32 like ONNX Runtime's CPU kernel (ties in
    nearest rounding depend on it)."""
    f = np.float32
    y, s = np.arange(n_out, dtype=f), f(scale)
    if transform == "align_corners":
        if n_out == 1:
            return np.zeros(1)
        return (y * f(n_in - 1) / f(n_out - 1)).astype(np.float64)
    if transform == "asymmetric":
        return (y / s).astype(np.float64)
    if transform == "pytorch_half_pixel" and n_out == 1:
        return np.zeros(1)
    if transform == "tf_half_pixel_for_nn":  # opset 11-18 (tf2onnx's nearest resizes)
        return ((y + f(0.5)) / s).astype(np.float64)
    if transform in ("half_pixel", "pytorch_half_pixel"):
        return ((y + f(0.5)) / s - f(0.5)).astype(np.float64)
    if transform == "half_pixel_symmetric":  # offset in float32, the rest in double
        offset = f(n_in / 2) * (f(1) - f(n_out) / (s * f(n_in)))
        x = float(offset) + (np.arange(n_out) + 0.5) / float(s) - 0.5
        return x.astype(f).astype(np.float64)
    raise ValueError(transform)


def resize_matrix(
    n_in: int, n_out: int, scale: float, mode: str, transform: str, nearest: str
) -> np.ndarray:
    """A [n_out, n_in] with out = A @ x along one axis, by ONNX Resize's 1-D semantics: linear
    interpolates the two neighbours of the clamped coordinate, nearest rounds per `nearest`
    ("simple" is opset <= 10's: truncate when upsampling, ceil when downsampling)."""
    x = _source_coordinates(n_in, n_out, scale, transform)
    a = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if mode == "nearest":
        fl = np.floor(x)
        pick = {
            "round_prefer_floor": np.where(x == fl + 0.5, fl, np.floor(x + 0.5)),
            "round_prefer_ceil": np.floor(x + 0.5),
            "floor": fl,
            "ceil": np.ceil(x),
            "simple": np.ceil(x) if scale < 1 else np.trunc(x),
        }[nearest]
        a[rows, np.clip(pick, 0, n_in - 1).astype(np.int64)] = 1.0
        return a
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    np.add.at(a, (rows, lo), 1 - (x - lo))
    np.add.at(a, (rows, hi), x - lo)
    return a


def _resize_config(ctx, node) -> tuple[str, str, str, list[float] | None]:
    """(mode, coordinate transform, nearest mode, scales per axis or None when from sizes)."""
    a = attrs_of(node)
    mode = a.get("mode", "nearest")
    old = node.op_type == "Upsample" or ctx.opset < 11
    transform = "asymmetric" if old else a.get("coordinate_transformation_mode", "half_pixel")
    nearest = "simple" if old else a.get("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise refuse(node, f"mode={mode!r} (nearest and linear have rules)")
    if transform == "tf_crop_and_resize":
        raise refuse(node, "coordinate_transformation_mode='tf_crop_and_resize'")
    if transform == "half_pixel_symmetric" and mode == "nearest":
        # its nearest picks hinge on float rounding at .5 ties that ONNX Runtime's kernel does
        # not document (float/double mixed); linear weights are continuous and safe
        raise refuse(node, "nearest with coordinate_transformation_mode='half_pixel_symmetric'")
    if a.get("antialias", 0) and mode != "nearest":
        raise refuse(node, "antialias=1")
    if a.get("exclude_outside", 0) and mode != "nearest":
        raise refuse(node, "exclude_outside=1")
    if "scales" in a:  # Upsample-7
        return mode, transform, nearest, [float(s) for s in a["scales"]]
    pos = 2 if node.op_type == "Resize" and ctx.opset >= 11 else 1
    name = node.input[pos] if len(node.input) > pos else ""
    value = ctx.value(name) if name else None
    if name and value is None:
        raise refuse(node, "scales computed at run time")
    scales = None if value is None or value.size == 0 else [float(s) for s in value.ravel()]
    return mode, transform, nearest, scales


def _scales(ctx, node, xs, ys, given: list[float] | None) -> list[float]:
    """Per-axis scale factors as the kernel uses them (sizes: out/in in float32)."""
    rank = len(xs)
    a = attrs_of(node)
    axes = [_axis(int(v), rank) for v in a.get("axes", range(rank))]
    if given is not None:
        full = [1.0] * rank
        for ax, s in zip(axes, given, strict=True):
            full[ax] = s
        return full
    ratios = [float(np.float32(ys[i]) / np.float32(xs[i])) for i in range(rank)]
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        pick = min if policy == "not_larger" else max
        common = pick(ratios[ax] for ax in axes)
        ratios = [common if i in axes else 1.0 for i in range(rank)]
    return ratios


@register("Resize", "Upsample")
def resize(ctx, node, gys):
    """Resizing is separable, one 1-D map A_k per axis: the adjoint applies each A_k^T, as a
    MatMul with a constant on the last two axes (gx = A_h^T @ g @ A_w) and after a Transpose on
    any other resized axis. Exact for nearest and (bi)linear, whatever the scale."""
    only_first_input(ctx, node, "roi/scales/sizes")
    x = node.input[0]
    xs, ys = list(ctx.shape(x)), list(ctx.shape(node.output[0]))
    mode, transform, nearest, given = _resize_config(ctx, node)
    scales = _scales(ctx, node, xs, ys, given)
    if given is not None:  # ONNX Runtime sizes the output in float32: int(float(s) * n)
        made = [int(np.float32(s) * np.float32(n)) for s, n in zip(scales, xs, strict=True)]
        if made != ys:
            raise refuse(
                node,
                f"ONNX shape inference gives it shape {ys}, ONNX Runtime makes {made} "
                "(float32 scales); give it sizes instead of scales",
            )
    rank = len(xs)
    g = gys[0]
    dtype = ctx.np_dtype(x)
    for axis in range(rank):
        if xs[axis] == ys[axis] and scales[axis] == 1:  # untouched (tf_half_pixel_for_nn
            continue  # would otherwise shift it by half a pixel)
        m = resize_matrix(xs[axis], ys[axis], scales[axis], mode, transform, nearest)
        if m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0])):
            continue
        if axis == rank - 1:
            g = ctx.op("MatMul", [g, ctx.const(m.astype(dtype), "resize")])
        elif axis == rank - 2:
            g = ctx.op("MatMul", [ctx.const(np.ascontiguousarray(m.T).astype(dtype)), g])
        else:
            perm = [*range(axis), *range(axis + 1, rank), axis]
            moved = ctx.op("Transpose", [g], perm=perm)
            moved = ctx.op("MatMul", [moved, ctx.const(m.astype(dtype), "resize")])
            g = ctx.op("Transpose", [moved], perm=[int(p) for p in np.argsort(perm)])
    return [g] + [None] * (len(node.input) - 1)


# ---- max-like and norm reductions ----------------------------------------------------------------


def _kept(ctx, node, axes: list[int]) -> list[int]:
    """The reduced output's shape with the reduced axes kept as 1 (whatever keepdims says)."""
    return [1 if i in axes else d for i, d in enumerate(ctx.shape(node.input[0]))]


def _extremum_backward(ctx, node, g: str, axes: list[int]) -> str:
    """`g` (reduced axes kept as 1) to the entries equal to the max (min), split evenly among
    ties like torch's amax/amin backward: g * mask / count(mask)."""
    x = node.input[0]
    kept = _kept(ctx, node, axes)
    mask = ctx.op("Equal", [x, ctx.reshape(node.output[0], kept)])
    mask = ctx.op("Cast", [mask], to=ctx.dtypes[x])
    count = ctx.reduce_sum(mask, axes, keepdims=True)
    return ctx.op("Mul", [mask, ctx.op("Div", [g, count])])


@register("GlobalMaxPool")
def global_max_pool(ctx, node, gys):
    axes = list(range(2, len(ctx.shape(node.input[0]))))
    return [_extremum_backward(ctx, node, gys[0], axes)]


def _reduce_rule(fn):
    """A Reduce* rule from fn(ctx, node, g kept-shape, axes) -> gx; axes became an input in
    opset 18 (ReduceSum's in 13, handled in rules.py)."""

    def rule(ctx, node, gys):
        rest = [None] * (len(node.input) - 1)
        axes = _reduce_axes(ctx, node, 18)
        if not axes:
            return [gys[0], *rest]
        g = ctx.reshape(gys[0], _kept(ctx, node, axes))
        return [fn(ctx, node, g, axes), *rest]

    rule.__doc__ = fn.__doc__
    return rule


@register("ReduceMax", "ReduceMin")
@_reduce_rule
def reduce_extremum(ctx, node, g, axes):
    return _extremum_backward(ctx, node, g, axes)


@register("ReduceL2")
@_reduce_rule
def reduce_l2(ctx, node, g, axes):
    """g * x / ||x||, and 0 where the norm is 0 (torch's choice of subgradient)."""
    x = node.input[0]
    norm = ctx.reshape(node.output[0], _kept(ctx, node, axes))
    zero = ctx.op("Equal", [norm, ctx.scalar(0.0, x)])
    safe = ctx.op("Where", [zero, ctx.scalar(1.0, x), norm])
    gx = ctx.op("Mul", [x, ctx.op("Div", [g, safe])])
    return ctx.op("Where", [zero, ctx.scalar(0.0, x), gx])


@register("ReduceSumSquare")
@_reduce_rule
def reduce_sum_square(ctx, node, g, axes):
    x = node.input[0]
    return ctx.op("Mul", [ctx.op("Mul", [x, ctx.scalar(2.0, x)]), g])


@register("ReduceL1")
@_reduce_rule
def reduce_l1(ctx, node, g, axes):
    return ctx.op("Mul", [ctx.op("Sign", [node.input[0]]), g])


@register("ReduceLogSumExp")
@_reduce_rule
def reduce_log_sum_exp(ctx, node, g, axes):
    """g * softmax over the reduced axes: exp(x - y)."""
    y = ctx.reshape(node.output[0], _kept(ctx, node, axes))
    return ctx.op("Mul", [ctx.op("Exp", [ctx.op("Sub", [node.input[0], y])]), g])


# ---- Tile and Einsum -----------------------------------------------------------------------------


@register("Tile")
def tile(ctx, node, gys):
    """The sum of the tiles: g as [r0, s0, r1, s1, ...], summed over the repeat axes."""
    only_first_input(ctx, node, "repeats")
    xs = ctx.shape(node.input[0])
    repeats = ctx.value(node.input[1])
    if repeats is None:
        raise refuse(node, "repeats computed at run time")
    tiled = [i for i, r in enumerate(repeats.ravel()) if int(r) != 1]
    if not tiled:
        return [gys[0], None]
    split = [v for r, s in zip(repeats.ravel(), xs, strict=True) for v in (int(r), s)]
    summed = ctx.reduce_sum(ctx.reshape(gys[0], split), [2 * i for i in tiled], keepdims=False)
    return [ctx.reshape(summed, xs), None]


def _einsum_terms(node) -> tuple[list[str], str]:
    """Operand subscripts and output subscripts of an Einsum equation (implicit output: the
    letters that occur once, sorted, as numpy does). Ellipses and repeated letters within one
    term (traces, diagonals) are refused."""
    equation = attrs_of(node)["equation"].replace(" ", "")
    if "." in equation:
        raise refuse(node, f"equation {equation!r} has an ellipsis")
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    letters = "".join(terms)
    if "->" not in equation:
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if any(len(set(t)) != len(t) for t in [*terms, out]):
        raise refuse(node, f"equation {equation!r} repeats an index within one term")
    return terms, out


@register("Einsum")
def einsum(ctx, node, gys):
    """dA = einsum(g, other operands -> A's subscripts): each entry of A multiplies the product
    of the others summed over everything else. Letters only A has (summed away in the forward)
    are not in that contraction: its result is broadcast back over them."""
    terms, out = _einsum_terms(node)
    grads = []
    for k, name in enumerate(node.input):
        if not ctx.active(name):
            grads.append(None)
            continue
        others = [t for i, t in enumerate(terms) if i != k]
        seen = out + "".join(others)
        target = "".join(c for c in terms[k] if c in seen)
        equation = ",".join([out, *others]) + "->" + target
        inputs = [gys[0], *(n for i, n in enumerate(node.input) if i != k)]
        gx = ctx.op("Einsum", inputs, equation=equation)
        shape = ctx.shape(name)
        if target != terms[k]:
            kept = [d if c in seen else 1 for c, d in zip(terms[k], shape, strict=True)]
            gx = ctx.op("Expand", [ctx.reshape(gx, kept), ctx.ints(shape)])
        grads.append(gx)
    return grads


# ---- normalizations ------------------------------------------------------------------------------


def normalize_backward(
    ctx, x: str, gh: str, shape: list[int], axes: list[int], eps: float, like: str
) -> str:
    """Adjoint of x̂ = (x - mean) / σ (statistics over `axes`) for ĝ = `gh` (g times the scale):
    (1/σ)(ĝ - mean(ĝ) - x̂ mean(ĝ x̂)); `x` and `gh` have shape `shape`, the dtype of the forward
    tensor `like`. The statistics are recomputed here rather than read from the forward's
    optional outputs, which exports drop."""
    inv_n = ctx.scalar(1.0 / np.prod([shape[i] for i in axes]), like)

    def mean(t: str) -> str:
        return ctx.op("Mul", [ctx.reduce_sum(t, axes, keepdims=True), inv_n])

    centered = ctx.op("Sub", [x, mean(x)])
    var = mean(ctx.op("Mul", [centered, centered]))
    inv_std = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, like)])])])
    xh = ctx.op("Mul", [centered, inv_std])
    inner = ctx.op("Sub", [gh, mean(gh)])
    inner = ctx.op("Sub", [inner, ctx.op("Mul", [xh, mean(ctx.op("Mul", [gh, xh]))])])
    return ctx.op("Mul", [inner, inv_std])


def _only_y(ctx, node, gys) -> None:
    only_first_input(ctx, node, "scale/bias")
    if any(g is not None for g in gys[1:]):
        raise refuse(node, "its mean/inverse-std outputs are differentiated")


@register("LayerNormalization")
def layer_norm(ctx, node, gys):
    _only_y(ctx, node, gys)
    x, scale = node.input[:2]
    xs = list(ctx.shape(x))
    a = attrs_of(node)
    axis = _axis(a.get("axis", -1), len(xs))
    gh = ctx.op("Mul", [gys[0], scale])
    axes = list(range(axis, len(xs)))
    gx = normalize_backward(ctx, x, gh, xs, axes, a.get("epsilon", 1e-5), x)
    return [gx] + [None] * (len(node.input) - 1)


@register("InstanceNormalization")
def instance_norm(ctx, node, gys):
    _only_y(ctx, node, gys)
    x, scale = node.input[:2]
    xs = list(ctx.shape(x))
    gh = ctx.op("Mul", [gys[0], ctx.reshape(scale, [xs[1]] + [1] * (len(xs) - 2))])
    eps = attrs_of(node).get("epsilon", 1e-5)
    return [normalize_backward(ctx, x, gh, xs, list(range(2, len(xs))), eps, x), None, None]


@register("GroupNormalization")
def group_norm(ctx, node, gys):
    """Statistics per (sample, group) over [N, G, C/G * spatial]. The scale is per group in
    opset 18 (applied to that view) and per channel from opset 21."""
    _only_y(ctx, node, gys)
    x, scale = node.input[:2]
    xs = list(ctx.shape(x))
    a = attrs_of(node)
    groups = a["num_groups"]
    view = [xs[0], groups, int(np.prod(xs[1:])) // groups]
    if ctx.opset >= 21:
        gh = ctx.op("Mul", [gys[0], ctx.reshape(scale, [xs[1]] + [1] * (len(xs) - 2))])
        gh = ctx.reshape(gh, view)
    else:
        gh = ctx.op("Mul", [ctx.reshape(gys[0], view), ctx.reshape(scale, [groups, 1])])
    eps = a.get("epsilon", 1e-5)
    gx = normalize_backward(ctx, ctx.reshape(x, view), gh, view, [2], eps, x)
    return [ctx.reshape(gx, xs), None, None]
