"""Backward rules, one small function per ONNX op type, registered in `RULES`.

A rule gets the forward node and the adjoints of its outputs (`gys`, None where an output has
none) and returns one adjoint per input (None where the input needs none). Only inputs for which
`ctx.active(name)` holds get adjoints: constant operands (weights, bias, Clip bounds) never do.
ReLU-like ops live in `policies.py` because their rule depends on the backward policy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .context import Context, UnsupportedOpError, attrs_of

Rule = Callable[[Context, onnx.NodeProto, list], list]
RULES: dict[str, Rule] = {}
# Flipped kernels (`_flipped_conv`) are copies of the weights; past this many bytes of them in
# one graph the backward uses ConvTranspose on the weight itself. Every model up to
# EfficientNetV2-L (~0.5 GB of conv weights) stays under it; regnet_y_128gf (2.6 GB) needs it.
FLIP_BUDGET_BYTES = 2**30


def register(*op_types: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn

    return wrap


def refuse(node: onnx.NodeProto, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{node.op_type} node {node.name!r}: {why}. This configuration has no backward rule; "
        "re-export the model without it or report it as a missing rule."
    )


def only_first_input(ctx: Context, node: onnx.NodeProto, what: str) -> None:
    """Refuse when an operand other than the data input depends on the wrt tensor."""
    for name in node.input[1:]:
        if ctx.active(name):
            raise refuse(node, f"its {what} {name!r} depends on the differentiated tensor")


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- structure: identity-like, reshapes, transposes --------------------------------------------
@register("Identity", "Dropout")
def identity(ctx, node, gys):
    return [gys[0]] + [None] * (len(node.input) - 1)


@register("Cast")
def cast(ctx, node, gys):
    x = node.input[0]
    if ctx.np_dtype(x).kind != "f":
        return [None]
    return [ctx.op("Cast", [gys[0]], to=ctx.dtypes[x])]


@register("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(ctx, node, gys):
    x = node.input[0]
    return [ctx.reshape(gys[0], ctx.shape(x))] + [None] * (len(node.input) - 1)


@register("Transpose")
def transpose(ctx, node, gys):
    rank = len(ctx.shape(node.input[0]))
    perm = attrs_of(node).get("perm", list(reversed(range(rank))))
    return [ctx.op("Transpose", [gys[0]], perm=[int(p) for p in np.argsort(perm)])]


@register("Expand")
def expand(ctx, node, gys):
    x = node.input[0]
    return [ctx.unbroadcast(gys[0], ctx.shape(node.output[0]), ctx.shape(x)), None]


# ---- arithmetic ----------------------------------------------------------------------------------
def _binary(ctx, node, ga: Callable[[], str], gb: Callable[[], str]) -> list:
    a, b = node.input[:2]
    ys = ctx.shape(node.output[0])
    return [
        ctx.unbroadcast(ga(), ys, ctx.shape(a)) if ctx.active(a) else None,
        ctx.unbroadcast(gb(), ys, ctx.shape(b)) if ctx.active(b) else None,
    ]


@register("Add")
def add(ctx, node, gys):
    return _binary(ctx, node, lambda: gys[0], lambda: gys[0])


@register("Sub")
def sub(ctx, node, gys):
    return _binary(ctx, node, lambda: gys[0], lambda: ctx.op("Neg", [gys[0]]))


@register("Mul")
def mul(ctx, node, gys):
    a, b = node.input[:2]
    return _binary(
        ctx, node, lambda: ctx.op("Mul", [gys[0], b]), lambda: ctx.op("Mul", [gys[0], a])
    )


@register("Div")
def div(ctx, node, gys):
    # d(a/b)/da = 1/b; d(a/b)/db = -(a/b)/b
    b, y = node.input[1], node.output[0]
    g_over_b = ctx.op("Div", [gys[0], b])
    return _binary(
        ctx, node, lambda: g_over_b, lambda: ctx.op("Neg", [ctx.op("Mul", [g_over_b, y])])
    )


@register("Pow")
def pow_(ctx, node, gys):
    # d(a^b)/da = b * a^(b-1); d(a^b)/db = a^b * log(a)
    a, b = node.input
    y = node.output[0]

    def ga() -> str:
        b_minus_1 = ctx.op("Sub", [b, ctx.const(np.array(1, dtype=ctx.np_dtype(b)))])
        return ctx.op("Mul", [gys[0], ctx.op("Mul", [b, ctx.op("Pow", [a, b_minus_1])])])

    return _binary(
        ctx, node, ga, lambda: ctx.op("Mul", [gys[0], ctx.op("Mul", [y, ctx.op("Log", [a])])])
    )


@register("Sum")
def sum_(ctx, node, gys):
    ys = ctx.shape(node.output[0])
    return [
        ctx.unbroadcast(gys[0], ys, ctx.shape(x)) if ctx.active(x) else None for x in node.input
    ]


@register("Neg")
def neg(ctx, node, gys):
    return [ctx.op("Neg", [gys[0]])]


# ---- smooth elementwise functions (same rule under every policy) ---------------------------------
@register("Sigmoid")
def sigmoid(ctx, node, gys):
    y = node.output[0]
    one_minus = ctx.op("Sub", [ctx.scalar(1.0, y), y])
    return [ctx.op("Mul", [gys[0], ctx.op("Mul", [y, one_minus])])]


@register("Tanh")
def tanh(ctx, node, gys):
    y = node.output[0]
    one_minus = ctx.op("Sub", [ctx.scalar(1.0, y), ctx.op("Mul", [y, y])])
    return [ctx.op("Mul", [gys[0], one_minus])]


@register("Exp")
def exp(ctx, node, gys):
    return [ctx.op("Mul", [gys[0], node.output[0]])]


@register("Log")
def log(ctx, node, gys):
    return [ctx.op("Div", [gys[0], node.input[0]])]


@register("Sqrt")
def sqrt(ctx, node, gys):
    y = node.output[0]
    return [ctx.op("Div", [gys[0], ctx.op("Mul", [y, ctx.scalar(2.0, y)])])]


@register("HardSigmoid")
def hard_sigmoid(ctx, node, gys):
    a = attrs_of(node)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    x = node.input[0]
    # 0 < alpha*x + beta < 1, written as bounds on x (alpha > 0 in every export we know)
    if alpha <= 0:
        raise refuse(node, f"alpha={alpha} <= 0")
    inside = ctx.between(x, -beta / alpha, (1 - beta) / alpha)
    return [ctx.op("Mul", [gys[0], ctx.op("Mul", [inside, ctx.scalar(alpha, x)])])]


@register("HardSwish")
def hard_swish(ctx, node, gys):
    # y = x * hs(x), hs = HardSigmoid(alpha=1/6, beta=1/2); dy/dx = hs(x) + x/6 on (-3, 3)
    x = node.input[0]
    hs = ctx.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)
    slope = ctx.op("Mul", [ctx.op("Mul", [x, ctx.between(x, -3.0, 3.0)]), ctx.scalar(1 / 6, x)])
    return [ctx.op("Mul", [gys[0], ctx.op("Add", [hs, slope])])]


@register("Softmax", "LogSoftmax")
def softmax(ctx, node, gys):
    x, y, gy = node.input[0], node.output[0], gys[0]
    shape = ctx.shape(x)
    rank = len(shape)
    axis = _axis(attrs_of(node).get("axis", -1 if ctx.opset >= 13 else 1), rank)
    if ctx.opset < 13:  # the old Softmax normalizes over the flattened axes [axis, rank)
        flat = (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
        y, gy, axis = ctx.reshape(y, flat), ctx.reshape(gy, flat), 1
    if node.op_type == "Softmax":  # y * (g - sum(g * y))
        total = ctx.reduce_sum(ctx.op("Mul", [gy, y]), [axis], keepdims=True)
        gx = ctx.op("Mul", [y, ctx.op("Sub", [gy, total])])
    else:  # g - exp(y) * sum(g)
        total = ctx.reduce_sum(gy, [axis], keepdims=True)
        gx = ctx.op("Sub", [gy, ctx.op("Mul", [ctx.op("Exp", [y]), total])])
    return [ctx.reshape(gx, shape) if ctx.opset < 13 else gx]


# ---- linear algebra --------------------------------------------------------------------------
@register("Gemm")
def gemm(ctx, node, gys):
    a_attrs = attrs_of(node)
    alpha, beta = a_attrs.get("alpha", 1.0), a_attrs.get("beta", 1.0)
    ta, tb = a_attrs.get("transA", 0), a_attrs.get("transB", 0)
    a, b = node.input[:2]
    gy = gys[0]
    out = [None] * len(node.input)
    if ctx.active(a):  # dA' = alpha * g B'^T
        if ta:
            out[0] = ctx.op("Gemm", [b, gy], alpha=alpha, transA=tb, transB=1)
        else:
            out[0] = ctx.op("Gemm", [gy, b], alpha=alpha, transB=1 - tb)
    if ctx.active(b):  # dB' = alpha * A'^T g
        if tb:
            out[1] = ctx.op("Gemm", [gy, a], alpha=alpha, transA=1, transB=ta)
        else:
            out[1] = ctx.op("Gemm", [a, gy], alpha=alpha, transA=1 - ta)
    if len(node.input) > 2 and ctx.active(node.input[2]):
        c = node.input[2]
        scaled = ctx.op("Mul", [gy, ctx.scalar(beta, c)])
        out[2] = ctx.unbroadcast(scaled, ctx.shape(node.output[0]), ctx.shape(c))
    return out


@register("MatMul")
def matmul(ctx, node, gys):
    a, b = node.input
    sa, sb = ctx.shape(a), ctx.shape(b)
    a2 = (1, *sa) if len(sa) == 1 else sa  # numpy promotion of 1-D operands
    b2 = (*sb, 1) if len(sb) == 1 else sb
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    gy = ctx.reshape(gys[0], (*batch, a2[-2], b2[-1]))

    def swap(t: str, rank: int) -> str:
        perm = list(range(rank))
        perm[-2:] = perm[-1], perm[-2]
        return ctx.op("Transpose", [t], perm=perm)

    out = [None, None]
    if ctx.active(a):
        bt = swap(ctx.reshape(b, b2) if b2 != sb else b, len(b2))
        ga = ctx.op("MatMul", [gy, bt])
        ga_shape = (*batch, a2[-2], a2[-1])
        out[0] = ctx.reshape(ctx.unbroadcast(ga, ga_shape, a2), sa)
    if ctx.active(b):
        at = swap(ctx.reshape(a, a2) if a2 != sa else a, len(a2))
        gb = ctx.op("MatMul", [at, gy])
        gb_shape = (*batch, b2[-2], b2[-1])
        out[1] = ctx.reshape(ctx.unbroadcast(gb, gb_shape, b2), sb)
    return out


@register("BatchNormalization")
def batch_norm(ctx, node, gys):
    # Inference form: y = (x - mean) / sqrt(var + eps) * scale + bias
    a = attrs_of(node)
    if a.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise refuse(node, "training mode (batch statistics)")
    only_first_input(ctx, node, "scale/bias/mean/var")
    x, scale, _, _, var = node.input[:5]
    eps = a.get("epsilon", 1e-5)
    rank = len(ctx.shape(x))
    channels = ctx.shape(x)[1]
    factor_shape = (1, channels) + (1,) * (rank - 2)
    s, v = ctx.value(scale), ctx.value(var)
    if s is not None and v is not None:
        factor = ctx.const((s / np.sqrt(v + eps)).astype(ctx.np_dtype(x)).reshape(factor_shape))
    else:
        std = ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, var)])])
        factor = ctx.reshape(ctx.op("Div", [scale, std]), factor_shape)
    return [ctx.op("Mul", [gys[0], factor]), None, None, None, None]


# ---- convolution and pooling -------------------------------------------------------------------
def window_geometry(node, x_shape, kernel) -> tuple[list[int], list[int], list[int]]:
    """strides, dilations, explicit pads [begins..., ends...] (auto_pad resolved)."""
    a = attrs_of(node)
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return strides, dil, list(a.get("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return strides, dil, [0] * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dil, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return strides, dil, begins + ends


def transpose_padding(x_shape, y_shape, kernel, strides, dil, pads) -> list[int]:
    """ConvTranspose output_padding that makes its output exactly x's spatial shape."""
    nd = len(kernel)
    out = []
    for i in range(nd):
        eff = (kernel[i] - 1) * dil[i] + 1
        made = strides[i] * (y_shape[2 + i] - 1) + eff - pads[i] - pads[nd + i]
        out.append(x_shape[2 + i] - made)
    return out


@register("Conv")
def conv(ctx, node, gys):
    only_first_input(ctx, node, "weight/bias")
    x, w = node.input[:2]
    xs, ws, ys = ctx.shape(x), ctx.shape(w), ctx.shape(node.output[0])
    group = attrs_of(node).get("group", 1)
    kernel = list(attrs_of(node).get("kernel_shape", ws[2:]))
    strides, dil, pads = window_geometry(node, xs, kernel)
    out = [None] * len(node.input)
    extra = transpose_padding(xs, ys, kernel, strides, dil, pads)
    if any(e < 0 or e >= max(s, d) for e, s, d in zip(extra, strides, dil, strict=True)):
        raise refuse(node, f"cannot invert its geometry (output_padding {extra})")
    gy = gys[0]
    nd = len(kernel)
    strided = any(s > 1 for s in strides)
    asymmetric = list(pads[:nd]) != list(pads[nd:])
    if strided and (group > 1 or asymmetric) and ctx.value(w) is not None:
        # Zero-insert the gradient and run a stride-1 flipped Conv instead of a ConvTranspose:
        # cuDNN's grouped dgrad (depthwise stride 2) is a slow kernel choice (research/
        # ort-cuda.md §2), and ORT's CUDA provider sends a ConvTranspose with asymmetric pads
        # (TF "same", e.g. EfficientNet-Lite0's stem) to the CPU.
        gy, pads = _zero_insert(ctx, gy, ys, kernel, strides, dil, pads, extra)
        strides, extra = [1] * len(kernel), [0] * len(kernel)
    flipped = _flipped_conv(ctx, node, gy, group, kernel, strides, dil, pads)
    if flipped is not None:
        out[0] = flipped
        return out
    out[0] = ctx.op(
        "ConvTranspose", [gy, w], kernel_shape=kernel, strides=strides, dilations=dil,
        group=group, pads=pads, output_padding=extra,
    )
    return out


def _zero_insert(ctx, gy, ys, kernel, strides, dil, pads, extra):
    """The stride-s ConvTranspose input as a stride-1 one (Dumoulin & Visin, relationship 14):
    s - 1 zeros between the gradient's pixels, and the output padding moved into the end pads.
    Returns (new gradient, pads for the stride-1 transposed conv)."""
    nd = len(kernel)
    n, c, spatial = ys[0], ys[1], list(ys[2:])
    # [N, C, h, 1, w, 1] -> pad each unit axis to s -> [N, C, h*s, w*s] (s - 1 zeros after each)
    split = [n, c] + [v for size in spatial for v in (size, 1)]
    pad_end = [0, 0] + [v for s in strides for v in (0, s - 1)]
    wide = ctx.op("Pad", [ctx.reshape(gy, split), ctx.ints([0] * len(split) + pad_end)])
    spread = ctx.reshape(wide, [n, c] + [size * s for size, s in zip(spatial, strides,
                                                                         strict=True)])
    # the last s - 1 zeros are not part of the zero-inserted tensor: fold them into the end pads
    ends = [pads[nd + i] - extra[i] + strides[i] - 1 for i in range(nd)]
    if any(e > (k - 1) * d for e, k, d in zip(ends, kernel, dil, strict=True)):
        crop = [max(0, e - (k - 1) * d) for e, k, d in zip(ends, kernel, dil, strict=True)]
        full = [size * s for size, s in zip(spatial, strides, strict=True)]
        spread = ctx.op("Slice", [spread, ctx.ints([0] * nd),
                                  ctx.ints([f - k for f, k in zip(full, crop, strict=True)]),
                                  ctx.ints(range(2, 2 + nd))])
        ends = [e - k for e, k in zip(ends, crop, strict=True)]
    return spread, list(pads[:nd]) + ends


def _flipped_conv(ctx, node, gy, group, kernel, strides, dil, pads) -> str | None:
    """Stride-1 Conv backward as a Conv with the flipped, in/out-swapped kernel.

    ORT's depthwise ConvTranspose is 3-5x slower than the equivalent Conv, and dense stride-1
    ones (1x1 expansions) were ~10-30% slower too (EffNet-Lite0 backward 63 -> 43 ms, ResNet-50
    559 -> 506 ms, batch 1, 2 threads). Needs a constant weight (it is copied, transposed) and
    pads no larger than the dilated kernel.
    """
    weight = ctx.value(node.input[1])
    nd = len(kernel)
    if weight is None or any(s != 1 for s in strides):
        return None
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    new_pads = [eff[i % nd] - 1 - p for i, p in enumerate(pads)]
    if any(p < 0 for p in new_pads):
        return None
    if ctx.flipped_bytes + weight.nbytes > FLIP_BUDGET_BYTES:
        return None  # the ConvTranspose reads the weight itself: no copy
    ctx.flipped_bytes += weight.nbytes
    m, cin_g = weight.shape[:2]
    w = weight.reshape(group, m // group, cin_g, *kernel).swapaxes(1, 2)
    w = w.reshape(group * cin_g, m // group, *kernel)
    w = np.ascontiguousarray(np.flip(w, axis=tuple(range(2, 2 + nd))))
    if new_pads[:nd] != new_pads[nd:]:  # explicit, so that the Conv itself pads symmetrically
        gy = _pad(ctx, gy, [0, 0, *new_pads[:nd]], [0, 0, *new_pads[nd:]])
        new_pads = [0] * (2 * nd)
    return ctx.op(
        "Conv", [gy, ctx.const(w, "wflip")], kernel_shape=kernel, strides=[1] * nd,
        dilations=dil, group=group, pads=new_pads,
    )


@register("MaxPool")
def max_pool(ctx, node, gys):
    """Switch unpooling (Zeiler & Fergus): route each gradient to its window's argmax."""
    x = node.input[0]
    xs = ctx.shape(x)
    a = attrs_of(node)
    kernel = list(a["kernel_shape"])
    strides, dil, _ = window_geometry(node, xs, kernel)
    overlapping = any(k * d > s for k, s, d in zip(kernel, strides, dil, strict=True))
    if ctx.opset < 16 and overlapping:
        raise refuse(node, "overlapping windows need a scatter-add (opset >= 16)")
    keep = {k: v for k, v in a.items() if k != "storage_order"}
    _, indices = ctx.op_multi("MaxPool", [x], 2, **keep)
    flat, n = int(np.prod(xs)), int(np.prod(ctx.shape(node.output[0])))
    if overlapping:  # one input can win several windows: their gradients add up
        from .rules_sampling import scatter_add

        gx = scatter_add(ctx, [flat], x, ctx.reshape(indices, [-1]), ctx.reshape(gys[0], [-1]), n)
    else:  # every input wins at most one window: a plain scatter, any opset
        gx = ctx.op(
            "ScatterND",
            [ctx.zeros([flat], x), ctx.reshape(indices, [-1, 1]), ctx.reshape(gys[0], [-1])],
        )
    return [ctx.reshape(gx, xs)]


@register("AveragePool")
def average_pool(ctx, node, gys):
    x = node.input[0]
    xs, ys = ctx.shape(x), ctx.shape(node.output[0])
    a = attrs_of(node)
    kernel = list(a["kernel_shape"])
    strides, dil, pads = window_geometry(node, xs, kernel)
    nd = len(kernel)
    if any(d != 1 for d in dil):
        raise refuse(node, "dilations")
    floor_out = [
        (xs[2 + i] + pads[i] + pads[nd + i] - kernel[i]) // strides[i] + 1 for i in range(nd)
    ]
    if a.get("ceil_mode", 0) and list(ys[2:]) != floor_out:
        raise refuse(node, "ceil_mode=1 changes its output size")
    if a.get("count_include_pad", 0) or not any(pads):
        scaled = ctx.op("Mul", [gys[0], ctx.scalar(1.0 / np.prod(kernel), x)])
    else:
        counts = np.ones([1, 1], dtype=np.float64)
        for i in range(nd):
            starts = np.arange(ys[2 + i]) * strides[i] - pads[i]
            ends = np.minimum(starts + kernel[i], xs[2 + i])
            per_dim = ends - np.maximum(starts, 0)
            counts = np.multiply.outer(counts, per_dim)
        inv = (1.0 / counts).reshape((1, 1, *ys[2:])).astype(ctx.np_dtype(x))
        scaled = ctx.op("Mul", [gys[0], ctx.const(inv, "inv_count")])
    channels = xs[1]
    ones = ctx.const(np.ones((channels, 1, *kernel), dtype=ctx.np_dtype(x)), "ones")
    extra = transpose_padding(xs, ys, kernel, strides, [1] * nd, pads)
    gx = ctx.op(
        "ConvTranspose", [scaled, ones], kernel_shape=kernel, strides=strides, group=channels,
        pads=pads, output_padding=extra,
    )
    return [gx]


@register("GlobalAveragePool")
def global_average_pool(ctx, node, gys):
    x = node.input[0]
    xs = ctx.shape(x)
    scaled = ctx.op("Mul", [gys[0], ctx.scalar(1.0 / np.prod(xs[2:]), x)])
    return [ctx.op("Expand", [scaled, ctx.ints(xs)])]


def _reduce_axes(ctx, node, input_axes_from: int) -> list[int] | None:
    """Axes of a Reduce* node (attribute or, from `input_axes_from` on, input); None = all."""
    rank = len(ctx.shape(node.input[0]))
    a = attrs_of(node)
    if ctx.opset >= input_axes_from:
        if len(node.input) < 2 or not node.input[1]:
            axes = None
        else:
            value = ctx.value(node.input[1])
            if value is None:
                raise refuse(node, "axes computed at run time")
            axes = [int(v) for v in value.ravel()]
    else:
        axes = a.get("axes")
    if not axes:
        return [] if a.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(_axis(ax, rank) for ax in axes)


def _reduce_backward(ctx, node, gys, input_axes_from: int, mean: bool) -> list:
    x = node.input[0]
    xs = ctx.shape(x)
    axes = _reduce_axes(ctx, node, input_axes_from)
    if not axes:
        return [gys[0]] + [None] * (len(node.input) - 1)
    kept = tuple(1 if i in axes else d for i, d in enumerate(xs))
    g = ctx.reshape(gys[0], kept)
    if mean:
        g = ctx.op("Mul", [g, ctx.scalar(1.0 / np.prod([xs[i] for i in axes]), x)])
    return [ctx.op("Expand", [g, ctx.ints(xs)])] + [None] * (len(node.input) - 1)


@register("ReduceMean")
def reduce_mean(ctx, node, gys):
    return _reduce_backward(ctx, node, gys, 18, mean=True)


@register("ReduceSum")
def reduce_sum(ctx, node, gys):
    return _reduce_backward(ctx, node, gys, 13, mean=False)


@register("LRN")
def lrn(ctx, node, gys):
    """y = x * d^-beta, d = bias + alpha/size * (windowed channel sum of x^2)."""
    a = attrs_of(node)
    alpha, beta, bias = a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    size = a["size"]
    x, gy = node.input[0], gys[0]
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)  # window [c - lo, c + hi]
    d = ctx.op("Add", [
        ctx.scalar(bias, x),
        ctx.op("Mul", [_channel_window_sum(ctx, ctx.op("Mul", [x, x]), x, lo, hi),
                       ctx.scalar(alpha / size, x)]),
    ])
    d_neg_beta = ctx.op("Pow", [d, ctx.scalar(-beta, x)])
    # sum over the windows that contain c: the transposed window [c - hi, c + lo]
    t = ctx.op("Div", [ctx.op("Mul", [ctx.op("Mul", [gy, x]), d_neg_beta]), d])
    back = _channel_window_sum(ctx, t, x, hi, lo)
    cross = ctx.op("Mul", [ctx.op("Mul", [x, back]), ctx.scalar(2 * alpha * beta / size, x)])
    return [ctx.op("Sub", [ctx.op("Mul", [gy, d_neg_beta]), cross])]


def _channel_window_sum(ctx, t: str, like: str, before: int, after: int) -> str:
    """s[c] = sum of t[c - before .. c + after] over channels, as a Conv on [N, 1, C, rest].

    `t` has the shape and dtype of the forward tensor `like`.
    """
    shape = ctx.shape(like)
    n, c = shape[:2]
    rest = int(np.prod(shape[2:]))
    flat = ctx.reshape(t, (n, 1, c, rest))
    k = before + after + 1
    ones = ctx.const(np.ones((1, 1, k, 1), dtype=ctx.np_dtype(like)), "ones")
    summed = ctx.op("Conv", [flat, ones], kernel_shape=[k, 1], pads=[after, 0, before, 0])
    return ctx.reshape(summed, shape)


# ---- slicing and joining ---------------------------------------------------------------------
def _pad(ctx, g: str, begins, ends) -> str:
    pads = list(begins) + list(ends)
    if ctx.opset >= 11:
        return ctx.op("Pad", [g, ctx.ints(pads)])
    return ctx.op("Pad", [g], pads=pads)


@register("Pad")
def pad(ctx, node, gys):
    a = attrs_of(node)
    mode = a.get("mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise refuse(node, f"mode={mode!r}")
    only_first_input(ctx, node, "pads/value")
    x = node.input[0]
    xs = ctx.shape(x)
    rank = len(xs)
    if ctx.opset >= 11:
        pads = ctx.value(node.input[1])
        if pads is None:
            raise refuse(node, "pads computed at run time")
        pads = [int(p) for p in pads]
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [_axis(int(v), rank) for v in ctx.value(node.input[3])]
    else:
        pads, axes = list(a["pads"]), list(range(rank))
    full = [0] * (2 * rank)
    for k, ax in enumerate(axes):
        full[ax], full[rank + ax] = pads[k], pads[len(axes) + k]
    if mode != "constant":  # edge, reflect, wrap: a gather, see rules_spatial
        from .rules_spatial import pad_adjoint

        gx = pad_adjoint(ctx, node, gys[0], list(xs), full, mode)
        return [gx] + [None] * (len(node.input) - 1)
    ys = ctx.shape(node.output[0])
    starts = [max(p, 0) for p in full[:rank]]
    ends = [ys[i] - max(full[rank + i], 0) for i in range(rank)]
    g = ctx.op("Slice", [gys[0], ctx.ints(starts), ctx.ints(ends), ctx.ints(range(rank))])
    if any(p < 0 for p in full):  # negative pads cropped x: give the cropped part zeros
        g = _pad(ctx, g, [max(-p, 0) for p in full[:rank]], [max(-p, 0) for p in full[rank:]])
    return [g] + [None] * (len(node.input) - 1)


@register("Concat")
def concat(ctx, node, gys):
    rank = len(ctx.shape(node.output[0]))
    axis = _axis(attrs_of(node)["axis"], rank)
    out, offset = [], 0
    for x in node.input:
        size = ctx.shape(x)[axis]
        if ctx.active(x):
            ends = ctx.ints([offset + size])
            out.append(ctx.op("Slice", [gys[0], ctx.ints([offset]), ends, ctx.ints([axis])]))
        else:
            out.append(None)
        offset += size
    return out


@register("Split")
def split(ctx, node, gys):
    rank = len(ctx.shape(node.input[0]))
    axis = _axis(attrs_of(node).get("axis", 0), rank)
    parts = [
        g if g is not None else ctx.zeros(ctx.shape(o), node.input[0])
        for o, g in zip(node.output, gys, strict=True)
    ]
    return [ctx.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


@register("Slice")
def slice_(ctx, node, gys):
    x = node.input[0]
    xs = ctx.shape(x)
    rank = len(xs)
    if ctx.opset >= 10:
        values = [ctx.value(n) if n else None for n in list(node.input[1:]) + [""] * 4][:4]
        if any(v is None for v, n in zip(values, node.input[1:], strict=False) if n):
            raise refuse(node, "starts/ends/axes/steps computed at run time")
        starts, ends, axes, steps = (None if v is None else [int(t) for t in v] for v in values)
    else:
        a = attrs_of(node)
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    axes = [_axis(ax, rank) for ax in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * rank
    for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
        index[ax] = _python_slice(st, en, sp, xs[ax])
    if all(s == 1 for s in steps):
        begins = [index[i].indices(xs[i])[0] for i in range(rank)]
        ys = ctx.shape(node.output[0])
        tails = [xs[i] - begins[i] - ys[i] for i in range(rank)]
        return [_pad(ctx, gys[0], begins, tails)] + [None] * (len(node.input) - 1)
    picked = np.arange(int(np.prod(xs)), dtype=np.int64).reshape(xs)[tuple(index)]
    gx = ctx.op("ScatterND", [
        ctx.zeros([int(np.prod(xs))], x), ctx.const(picked.reshape(-1, 1), "idx"),
        ctx.reshape(gys[0], [-1]),
    ])
    return [ctx.reshape(gx, xs)] + [None] * (len(node.input) - 1)


def _python_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX Slice clamping semantics as a Python slice."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, end if end >= 0 else None, step)

from . import rules_elementwise  # noqa: E402, F401, I001  (activations, Max/Min/Where, Q/DQ)
from . import rules_sampling  # noqa: E402, F401  (Gather, GatherElements: scatter-add)
from . import rules_spatial  # noqa: E402, F401  (Pad modes, Resize, reductions, norms)
