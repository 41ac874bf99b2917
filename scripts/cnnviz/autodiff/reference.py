"""Backward rules that read reference activations: DeepLIFT's rescale rule.

DeepLIFT (Shrikumar et al. 2017) explains f(x) - f(x0) for a reference input x0. Under its
*rescale rule* a nonlinearity y = h(u) passes the multiplier Δy/Δu (Δu = u(x) - u(x0)) instead of
h'(u); linear ops (Conv, Gemm, BatchNormalization, pooling by averaging, Add, Concat, ...) keep
their gradient, which is their multiplier. Then sum_i (x - x0)_i * m_i = f(x) - f(x0) exactly
("summation-to-delta") for a network of linear ops and rescaled nonlinearities.

A graph differentiated with these rules (`deeplift_rules`, the vjp's node_rules) runs the model
on 2B rows: rows [0, B) are the inputs x, rows [B, 2B) their references x0, in the same order.
Every forward tensor u then holds u(x) and u(x0); a rule reads Δu off the batch axis, and
both halves get the same multiplier (the reference half's backward is not used for the
attributions). This is captum's construction (DeepLift runs the model on torch.cat([x, x0])), so
one forward and one backward of 2B rows give the attributions of B images. The rules assume
every tensor they read leads with that batch axis (a CNN's activations do) and refuse an odd
number of rows.

Where |Δu| < EPS the multiplier is the true derivative (captum's fallback, same EPS).

Definitions (captum 0.9.0's DeepLift where it has the op):

- Rescaled elementwise ops: Relu, LeakyRelu, Elu, Sigmoid, Tanh, Softplus (captum's list), and
  also Clip (ReLU6, hardtanh), PRelu, ThresholdedRelu, Selu, Celu, HardSigmoid, HardSwish, Gelu,
  Mish (captum leaves nn.ReLU6, nn.Hardswish, nn.GELU, ... at their gradient, which breaks
  summation-to-delta; here every single-input activation is rescaled).
- MaxPool: captum's rule. With o = pool(u(x)), o0 = pool(u(x0)) and top = max(o, o0), the output
  difference is split as (top - o0) + (o - top); the first part goes to the window's argmax under
  x, the second (<= 0) to its argmax under x0 (switch unpooling of each half), their sum over the
  two halves is divided by Δu.
- Mul of two computed tensors (SiLU written as x * Sigmoid(x), squeeze-excitation gates): each
  operand's multiplier is the other's mean over x and x0, so Δ(ab) = Δa mean(b) + Δb mean(a)
  holds exactly (the two-player Shapley split of a product). captum has no rule for products
  (autograd's b(x), which breaks summation-to-delta); on models without such products (VGG,
  ResNet, EfficientNet-Lite0) the two definitions agree.
- Everything else keeps its gradient (rules.py): Max/Min, GlobalMaxPool, ReduceMax, Div of two
  computed tensors and an inner Softmax (captum has a Softmax rule; a final Softmax is skipped by
  the seed) are then not exact, and summation-to-delta holds only approximately.
"""

from __future__ import annotations

import numpy as np
import onnx

from .context import Context, UnsupportedOpError
from .policies import POLICIES
from .rules import RULES, Rule, _binary, only_first_input

EPS = 1e-10  # captum DeepLift's default eps: below it, |Δu| counts as no change

RESCALED = (
    "Relu", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "Softplus",  # captum's
    "Clip", "PRelu", "ThresholdedRelu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Mish",
)  # fmt: skip


# The two halves are combined by a [1, 2] x [2, n * rest] MatMul on the tensor's [2, -1] view
# (a reshape, no copy): one pass over the tensor, where Slice + Slice + Sub make three (measured
# 4x faster on a [4, 32, 112, 112] tensor with ONNX Runtime on 2 threads). Products with 1 and
# -1 are exact, so Δu is the rounded u(x) - u(x0), as Sub gives it.
DIFFERENCE, FIRST, SECOND = [[1.0, -1.0]], [[1.0, 0.0]], [[0.0, 1.0]]


def _pair(ctx: Context, node, name: str, shape: tuple[int, ...] | None = None) -> str:
    """The tensor (2n rows) as [2, n * rest]: row 0 for the inputs x, row 1 for x0."""
    shape = tuple(shape or ctx.shape(name))
    if not shape or shape[0] % 2:
        raise UnsupportedOpError(
            f"{node.op_type} node {node.name!r}: DeepLIFT's rules need tensors whose leading "
            f"axis holds the inputs and then their references (an even number of rows); "
            f"{name!r} has shape {list(shape)}"
        )
    return ctx.reshape(name, [2, -1])


def _combine(ctx: Context, pair: str, weights: list, like: str) -> str:
    """weights [1, 2] times the pair [2, m]: [1, m] (a difference or one half)."""
    return ctx.op("MatMul", [ctx.const(np.array(weights, dtype=ctx.np_dtype(like)), "w"), pair])


def _half_shape(ctx: Context, name: str) -> tuple[int, ...]:
    shape = ctx.shape(name)
    return (shape[0] // 2, *shape[1:])


def _ratio(ctx: Context, num: str, den: str, like: str) -> tuple[str, str]:
    """(num / den, the mask |den| < EPS): where the mask holds the quotient is not used (it may
    be inf or nan there; Where does not propagate the branch it does not pick)."""
    small = ctx.op("Less", [ctx.op("Abs", [den]), ctx.scalar(EPS, like)])
    return ctx.op("Div", [num, den]), small


def _derivative(op_type: str) -> Rule:
    return POLICIES["gradient"].get(op_type) or RULES[op_type]


def _slope_at_inputs(ctx: Context, node, u_pair: str, v_pair: str) -> str:
    """h'(u(x)) as [1, n * rest]: the op's derivative rule applied to the x half (seeded with 1).
    Used where |Δu| < EPS, i.e. where u(x) and u(x0) agree, so it serves both halves."""
    u, v = node.input[0], node.output[0]
    half = onnx.NodeProto()
    half.CopyFrom(node)
    for k, (name, pair) in enumerate(((u, u_pair), (v, v_pair))):
        shape = _half_shape(ctx, name)
        first = ctx.reshape(_combine(ctx, pair, FIRST, u), shape)
        ctx.shapes[first], ctx.dtypes[first] = shape, ctx.dtypes[name]
        if k == 0:
            half.input[0] = first
        else:
            half.output[0] = first
    slope = _derivative(node.op_type)(ctx, half, [ctx.scalar(1.0, u)])[0]
    return ctx.reshape(slope, [1, -1])


def rescale(ctx: Context, node, gys: list) -> list:
    """g * Δy/Δu, or g * h'(u) where |Δu| < EPS; one multiplier [1, n * rest] for both halves
    (broadcast over the pair axis)."""
    only_first_input(ctx, node, "parameter")
    u, v = node.input[0], node.output[0]
    u_pair, v_pair = _pair(ctx, node, u), _pair(ctx, node, v)
    ratio, small = _ratio(
        ctx, _combine(ctx, v_pair, DIFFERENCE, u), _combine(ctx, u_pair, DIFFERENCE, u), u
    )
    multiplier = ctx.op("Where", [small, _slope_at_inputs(ctx, node, u_pair, v_pair), ratio])
    gx = ctx.op("Mul", [ctx.reshape(gys[0], [2, -1]), multiplier])
    return [ctx.reshape(gx, ctx.shape(u))] + [None] * (len(node.input) - 1)


def max_pool_rescale(ctx: Context, node, gys: list) -> list:
    """captum's MaxPool rule (module docstring); the derivative where |Δu| < EPS."""
    unpool = RULES["MaxPool"]
    u, o = node.input[0], node.output[0]
    o_pair = _pair(ctx, node, o)
    o_x, o_r = (_combine(ctx, o_pair, w, u) for w in (FIRST, SECOND))
    top = ctx.op("Max", [o_x, o_r])
    split = ctx.op("Concat", [ctx.op("Sub", [top, o_r]), ctx.op("Sub", [o_x, top])], axis=0)
    routed = unpool(ctx, node, [ctx.op("Mul", [gys[0], ctx.reshape(split, ctx.shape(o))]), None])
    both = _combine(ctx, _pair(ctx, node, routed[0], ctx.shape(u)), [[1.0, 1.0]], u)
    delta = _combine(ctx, _pair(ctx, node, u), DIFFERENCE, u)
    ratio, small = _ratio(ctx, both, delta, u)
    true = ctx.reshape(unpool(ctx, node, gys)[0], [2, -1])
    return [ctx.reshape(ctx.op("Where", [small, true, ratio]), ctx.shape(u))]


def product_rescale(ctx: Context, node, gys: list) -> list:
    """Mul of two computed tensors: a's multiplier is mean(b) = (b(x) + b(x0)) / 2 and b's is
    mean(a), since Δ(ab) = Δa mean(b) + Δb mean(a) exactly. With one computed operand the
    product is linear in it: its gradient."""
    a, b = node.input[:2]
    if not (ctx.active(a) and ctx.active(b)):
        return RULES["Mul"](ctx, node, gys)

    def mean(t: str) -> str:  # the halves' mean, repeated for both halves: t's shape
        half = _combine(ctx, _pair(ctx, node, t), [[0.5, 0.5]], t)
        half = ctx.reshape(half, _half_shape(ctx, t))
        return ctx.op("Concat", [half, half], axis=0)

    g = gys[0]
    return _binary(
        ctx, node, lambda: ctx.op("Mul", [g, mean(b)]), lambda: ctx.op("Mul", [g, mean(a)])
    )


def deeplift_rules(ctx: Context, graph) -> dict[str, Rule]:
    """The rescale rules of a graph's nodes, for `vjp(..., node_rules=deeplift_rules)`: the
    rescaled activations, MaxPool and products; every other node keeps its rule under the policy
    "gradient". The vjp's batch is [inputs; references] (module docstring)."""
    rules: dict[str, Rule] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        if node.op_type in RESCALED:
            rules[node.output[0]] = rescale
        elif node.op_type == "MaxPool":
            rules[node.output[0]] = max_pool_rescale
        elif node.op_type == "Mul":
            rules[node.output[0]] = product_rescale
    return rules
