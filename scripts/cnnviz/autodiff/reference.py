"""Backward rules that read reference activations: DeepLIFT's rescale rule.

DeepLIFT (Shrikumar et al. 2017) explains f(x) - f(x0) for a reference input x0. Under its
*rescale rule* a nonlinearity y = h(u) passes the multiplier Δy/Δu (Δu = u(x) - u(x0)) instead of
h'(u); linear ops (Conv, Gemm, BatchNormalization, pooling by averaging, Add, Concat, ...) keep
their gradient, which is their multiplier. Then sum_i (x - x0)_i * m_i = f(x) - f(x0) exactly
("summation-to-delta") for a network of linear ops and rescaled nonlinearities.

A graph differentiated with these rules (`deeplift_rules`, the vjp's node_rules) runs the model
on 2B rows: rows [0, B) are the inputs x, rows [B, 2B) their references x0, in the same order.
Every forward tensor u then holds u(x) and u(x0); a rule reads Δu by slicing the batch axis, and
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
- Everything else keeps its gradient (rules.py): products of two computed tensors (SiLU written
  as x * Sigmoid(x), squeeze-excitation), Max/Min, GlobalMaxPool, ReduceMax and an inner Softmax
  (captum has a Softmax rule; a final Softmax is skipped by the seed) are then not exact, and
  summation-to-delta holds only approximately.
"""

from __future__ import annotations

import onnx

from .context import Context, UnsupportedOpError
from .policies import POLICIES
from .rules import RULES, Rule, only_first_input

EPS = 1e-10  # captum DeepLift's default eps: below it, |Δu| counts as no change

RESCALED = (
    "Relu", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "Softplus",  # captum's
    "Clip", "PRelu", "ThresholdedRelu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Mish",
)  # fmt: skip


def _half(ctx: Context, name: str, shape: tuple[int, ...], which: int) -> str:
    """Rows [0, n) (which=0) or [n, 2n) (which=1) of a tensor with 2n rows."""
    n = shape[0] // 2
    start, end = which * n, (which + 1) * n
    if ctx.opset >= 10:
        return ctx.op("Slice", [name, ctx.ints([start]), ctx.ints([end]), ctx.ints([0])])
    return ctx.op("Slice", [name], starts=[start], ends=[end], axes=[0])


def _halves(ctx: Context, node, name: str, shape: tuple[int, ...] | None = None):
    shape = tuple(shape or ctx.shape(name))
    if not shape or shape[0] % 2:
        raise UnsupportedOpError(
            f"{node.op_type} node {node.name!r}: a reference policy (DeepLIFT) needs tensors "
            f"whose leading axis holds the inputs and then their references (an even number of "
            f"rows); {name!r} has shape {list(shape)}"
        )
    return _half(ctx, name, shape, 0), _half(ctx, name, shape, 1)


def _delta(ctx: Context, node, name: str) -> str:
    return ctx.op("Sub", list(_halves(ctx, node, name)))


def _pair(ctx: Context, name: str) -> str:
    """A tensor of 2n rows as [2, n * rest] (no copy): row 0 for x, row 1 for x0."""
    return ctx.reshape(name, [2, -1])


def _both(ctx: Context, g: str, half: str, shape) -> str:  # noqa: ANN001
    """g [2n, ...] times the multiplier of one half [n, ...], the same for both halves (a
    broadcast over the pair axis instead of a copy)."""
    scaled = ctx.op("Mul", [_pair(ctx, g), ctx.reshape(half, [1, -1])])
    return ctx.reshape(scaled, shape)


def _ratio(ctx: Context, num: str, den: str, like: str) -> tuple[str, str]:
    """(num / den where |den| >= EPS (1 elsewhere in the denominator), the mask |den| < EPS)."""
    small = ctx.op("Less", [ctx.op("Abs", [den]), ctx.scalar(EPS, like)])
    safe = ctx.op("Where", [small, ctx.scalar(1.0, like), den])
    return ctx.op("Div", [num, safe]), small


def _derivative(op_type: str) -> Rule:
    return POLICIES["gradient"].get(op_type) or RULES[op_type]


def _slope_at_inputs(ctx: Context, node, u_x: str, v_x: str) -> str:
    """h'(u(x)) [n, ...]: the op's derivative rule applied to the x half (seeded with 1).
    Used where |Δu| < EPS, i.e. where u(x) and u(x0) agree, so it serves both halves."""
    half = onnx.NodeProto()
    half.CopyFrom(node)
    half.input[0], half.output[0] = u_x, v_x
    shape = (ctx.shape(node.input[0])[0] // 2, *ctx.shape(node.input[0])[1:])
    for name, like in ((u_x, node.input[0]), (v_x, node.output[0])):
        ctx.shapes[name], ctx.dtypes[name] = shape, ctx.dtypes[like]
    return _derivative(node.op_type)(ctx, half, [ctx.scalar(1.0, node.input[0])])[0]


def rescale(ctx: Context, node, gys: list) -> list:
    """g * Δy/Δu, or g * h'(u) where |Δu| < EPS."""
    only_first_input(ctx, node, "parameter")
    u, v = node.input[0], node.output[0]
    (u_x, u_r), (v_x, v_r) = _halves(ctx, node, u), _halves(ctx, node, v)
    ratio, small = _ratio(ctx, ctx.op("Sub", [v_x, v_r]), ctx.op("Sub", [u_x, u_r]), u)
    multiplier = ctx.op("Where", [small, _slope_at_inputs(ctx, node, u_x, v_x), ratio])
    return [_both(ctx, gys[0], multiplier, ctx.shape(u))] + [None] * (len(node.input) - 1)


def max_pool_rescale(ctx: Context, node, gys: list) -> list:
    """captum's MaxPool rule (module docstring); the derivative where |Δu| < EPS."""
    unpool = RULES["MaxPool"]
    u, o = node.input[0], node.output[0]
    o_x, o_r = _halves(ctx, node, o)
    top = ctx.op("Max", [o_x, o_r])
    split = ctx.op("Concat", [ctx.op("Sub", [top, o_r]), ctx.op("Sub", [o_x, top])], axis=0)
    routed = _pair(ctx, unpool(ctx, node, [ctx.op("Mul", [gys[0], split]), None])[0])
    total = ctx.op("ReduceSum", [routed, ctx.ints([0])], keepdims=1) if ctx.opset >= 13 else (
        ctx.op("ReduceSum", [routed], axes=[0], keepdims=1))  # [1, n * rest]: both halves' parts
    ratio, small = _ratio(ctx, total, ctx.reshape(_delta(ctx, node, u), [1, -1]), u)
    true = _pair(ctx, unpool(ctx, node, gys)[0])
    return [ctx.reshape(ctx.op("Where", [small, true, ratio]), ctx.shape(u))]


def deeplift_rules(ctx: Context, graph) -> dict[str, Rule]:
    """The rescale rules of a graph's nodes, for `vjp(..., node_rules=deeplift_rules)`: the
    rescaled activations and MaxPool; every other node keeps its rule under the policy
    "gradient". The vjp's batch is [inputs; references] (module docstring)."""
    rules: dict[str, Rule] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        if node.op_type in RESCALED:
            rules[node.output[0]] = rescale
        elif node.op_type == "MaxPool":
            rules[node.output[0]] = max_pool_rescale
    return rules
