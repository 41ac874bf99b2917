"""Backward rules of elementwise ops (registered into `RULES`): smooth activations, Abs,
Reciprocal, Max/Min/Where, and QuantizeLinear/DequantizeLinear (straight-through).

Smooth activations (Erf, Gelu, Softplus, Elu, Selu, Celu, Mish) get their true derivative under
every policy; so do Abs (its sign, 0 at 0) and Reciprocal. Piecewise ones follow torch at the
kinks: Elu/Selu/Celu use the x <= 0 branch at x = 0. ReLU-like ops whose rule depends on the
policy (PRelu, ThresholdedRelu) live in policies.py. Softsign deliberately has no rule yet.

Max/Min route the gradient to the input that attains the result; on ties it goes to the *first*
input that attains it (inputs in node order), so the gradients of all inputs still sum to g
(torch.maximum splits ties in halves instead; one convention, stated, is what matters).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from .context import Context, attrs_of
from .rules import refuse, register

# Ops differentiated with the straight-through estimator: the adjoint passes the rounding as if
# it were the identity, so maps through them are estimates; builder.py lists these nodes in
# "cnnviz.approximate", like nodes done by the finite-difference fallback, and lets their integer
# outputs carry (float) adjoints. DequantizeLinear is linear in its integer input: exact.
STRAIGHT_THROUGH = frozenset({"QuantizeLinear"})


def _times(ctx: Context, g: str, factor: str) -> list:
    return [ctx.op("Mul", [g, factor])]


def _positive(ctx: Context, x: str) -> str:
    """Boolean x > 0."""
    return ctx.op("Greater", [x, ctx.scalar(0.0, x)])


# ---- smooth activations ------------------------------------------------------------------------
@register("Erf")
def erf(ctx, node, gys):
    # d erf(x)/dx = 2/sqrt(pi) * exp(-x^2)
    x = node.input[0]
    gauss = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Mul", [x, x])])])
    return _times(ctx, gys[0], ctx.op("Mul", [gauss, ctx.scalar(2 / math.sqrt(math.pi), x)]))


@register("Gelu")
def gelu(ctx, node, gys):
    x = node.input[0]
    mode = attrs_of(node).get("approximate", "none")
    if mode == "none":  # y = x * Phi(x); dy/dx = Phi(x) + x * phi(x)
        cdf = ctx.op("Mul", [
            ctx.op("Add", [ctx.scalar(1.0, x),
                           ctx.op("Erf", [ctx.op("Mul", [x, ctx.scalar(math.sqrt(0.5), x)])])]),
            ctx.scalar(0.5, x),
        ])  # fmt: skip
        half_sq = ctx.op("Mul", [ctx.op("Mul", [x, x]), ctx.scalar(-0.5, x)])
        pdf = ctx.op("Mul", [ctx.op("Exp", [half_sq]), ctx.scalar(1 / math.sqrt(2 * math.pi), x)])
        return _times(ctx, gys[0], ctx.op("Add", [cdf, ctx.op("Mul", [x, pdf])]))
    if mode == "tanh":
        # y = x/2 * (1 + t), t = tanh(u), u = c (x + k x^3)
        # dy/dx = (1 + t)/2 + x/2 * (1 - t^2) * c (1 + 3 k x^2)
        c, k = math.sqrt(2 / math.pi), 0.044715
        x2 = ctx.op("Mul", [x, x])
        inner = ctx.op("Add", [x, ctx.op("Mul", [ctx.op("Mul", [x2, x]), ctx.scalar(k, x)])])
        t = ctx.op("Tanh", [ctx.op("Mul", [inner, ctx.scalar(c, x)])])
        one = ctx.scalar(1.0, x)
        du = ctx.op("Mul", [ctx.op("Add", [one, ctx.op("Mul", [x2, ctx.scalar(3 * k, x)])]),
                            ctx.scalar(c, x)])  # fmt: skip
        sech2 = ctx.op("Sub", [one, ctx.op("Mul", [t, t])])
        slope = ctx.op("Add", [
            ctx.op("Add", [one, t]), ctx.op("Mul", [ctx.op("Mul", [x, sech2]), du])
        ])  # fmt: skip
        return _times(ctx, gys[0], ctx.op("Mul", [slope, ctx.scalar(0.5, x)]))
    raise refuse(node, f"approximate={mode!r}")


@register("Softplus")
def softplus(ctx, node, gys):
    return _times(ctx, gys[0], ctx.op("Sigmoid", [node.input[0]]))


def _exp_branch(ctx, node, gys, negative: str, gamma: float = 1.0) -> list:
    """gamma * (1 where x > 0, else `negative`), times g."""
    x = node.input[0]
    slope = ctx.op("Where", [_positive(ctx, x), ctx.scalar(1.0, x), negative])
    if gamma != 1.0:
        slope = ctx.op("Mul", [slope, ctx.scalar(gamma, x)])
    return _times(ctx, gys[0], slope)


@register("Elu")
def elu(ctx, node, gys):
    # x <= 0: y = alpha (e^x - 1), dy/dx = alpha e^x = y + alpha
    alpha = attrs_of(node).get("alpha", 1.0)
    y = node.output[0]
    return _exp_branch(ctx, node, gys, ctx.op("Add", [y, ctx.scalar(alpha, y)]))


@register("Selu")
def selu(ctx, node, gys):
    # y = gamma * (x where x > 0, else alpha (e^x - 1))
    a = attrs_of(node)
    alpha = a.get("alpha", 1.67326319217681884765625)
    gamma = a.get("gamma", 1.05070102214813232421875)
    x = node.input[0]
    negative = ctx.op("Mul", [ctx.op("Exp", [x]), ctx.scalar(alpha, x)])
    return _exp_branch(ctx, node, gys, negative, gamma)


@register("Celu")
def celu(ctx, node, gys):
    # x <= 0: y = alpha (e^(x/alpha) - 1), dy/dx = e^(x/alpha)
    alpha = attrs_of(node).get("alpha", 1.0)
    x = node.input[0]
    negative = ctx.op("Exp", [ctx.op("Mul", [x, ctx.scalar(1.0 / alpha, x)])])
    return _exp_branch(ctx, node, gys, negative)


@register("Mish")
def mish(ctx, node, gys):
    # y = x tanh(sp(x)), sp = softplus; dy/dx = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)
    x = node.input[0]
    t = ctx.op("Tanh", [ctx.op("Softplus", [x])])
    sech2 = ctx.op("Sub", [ctx.scalar(1.0, x), ctx.op("Mul", [t, t])])
    tail = ctx.op("Mul", [ctx.op("Mul", [x, ctx.op("Sigmoid", [x])]), sech2])
    return _times(ctx, gys[0], ctx.op("Add", [t, tail]))


# ---- Abs, Reciprocal ---------------------------------------------------------------------------
@register("Abs")
def abs_(ctx, node, gys):
    return _times(ctx, gys[0], ctx.op("Sign", [node.input[0]]))


@register("Reciprocal")
def reciprocal(ctx, node, gys):
    # d(1/x)/dx = -1/x^2 = -y^2
    y = node.output[0]
    return [ctx.op("Neg", [ctx.op("Mul", [gys[0], ctx.op("Mul", [y, y])])])]


# ---- selection: Max, Min, Where ----------------------------------------------------------------
@register("Max", "Min")
def max_min(ctx, node, gys):
    """g goes to the first input (in node order) equal to the result, broadcast operands summed."""
    y, g = node.output[0], gys[0]
    ys = ctx.shape(y)
    dtype = helper.np_dtype_to_tensor_dtype(ctx.np_dtype(y))
    out, taken = [], None
    for i, x in enumerate(node.input):
        hit = ctx.op("Equal", [x, y])
        first = hit if taken is None else ctx.op("And", [hit, ctx.op("Not", [taken])])
        if ctx.active(x):
            picked = ctx.op("Mul", [g, ctx.op("Cast", [first], to=dtype)])
            out.append(ctx.unbroadcast(picked, ys, ctx.shape(x)))
        else:
            out.append(None)
        if i < len(node.input) - 1:
            taken = hit if taken is None else ctx.op("Or", [taken, hit])
    return out


@register("Where")
def where(ctx, node, gys):
    cond, a, b = node.input
    y, g = node.output[0], gys[0]
    ys = ctx.shape(y)
    zero = ctx.scalar(0.0, y)
    out = [None, None, None]
    if ctx.active(a):
        out[1] = ctx.unbroadcast(ctx.op("Where", [cond, g, zero]), ys, ctx.shape(a))
    if ctx.active(b):
        out[2] = ctx.unbroadcast(ctx.op("Where", [cond, zero, g]), ys, ctx.shape(b))
    return out


# ---- quantization: straight-through -------------------------------------------------------------
def _scale_for(ctx, node, like: str) -> str:
    """The node's scale, reshaped to broadcast against tensor `like` (per-axis scales)."""
    scale = node.input[1]
    a = attrs_of(node)
    if a.get("block_size", 0):
        raise refuse(node, "blocked quantization (block_size)")
    if ctx.active(scale) or (len(node.input) > 2 and ctx.active(node.input[2])):
        raise refuse(node, "its scale/zero point depend on the differentiated tensor")
    shape = ctx.shape(like)
    if len(ctx.shape(scale)) == 0 or int(np.prod(ctx.shape(scale))) == 1:
        return ctx.reshape(scale, [])
    axis = a.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return ctx.reshape(scale, [shape[axis] if i == axis else 1 for i in range(len(shape))])


@register("QuantizeLinear")
def quantize_linear(ctx, node, gys):
    # q = saturate(round(x / scale) + zp): straight-through, dq/dx taken as 1/scale everywhere
    # (the rounding and the clipping to the integer range as the identity, so Q -> DQ passes g)
    x = node.input[0]
    scale = _scale_for(ctx, node, x)
    if ctx.np_dtype(node.input[1]) != ctx.np_dtype(x):
        scale = ctx.op("Cast", [scale], to=ctx.dtypes[x])
    return [ctx.op("Div", [gys[0], scale]), None, None][: len(node.input)]


@register("DequantizeLinear")
def dequantize_linear(ctx, node, gys):
    # y = (q - zp) * scale: dy/dq = scale; the adjoint of the integer q is a float tensor
    scale = _scale_for(ctx, node, node.input[0])
    return [ctx.op("Mul", [gys[0], scale]), None, None][: len(node.input)]
