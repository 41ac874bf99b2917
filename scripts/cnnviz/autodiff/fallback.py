"""In-graph central differences for elementwise ops that have no backward rule.

For y = f(x) elementwise, dy/dx is diagonal, so one pair of extra forward evaluations gives the
whole VJP: g * (f(x+h) - f(x-h)) / ((x+h) - (x-h)), with h = 1e-3 * max(1, |x|) per element
(dividing by the rounded difference of the two points, not by 2h, cancels most of the rounding).
Error O(h^2) * f''' plus float rounding; the result is marked approximate in the model metadata.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .context import Context, UnsupportedOpError

RELATIVE_STEP = 1e-3

# Ops known to be elementwise in their first input (other inputs constant): the same output shape
# is not enough (CumSum, LpNormalization, Hardmax keep the shape but mix elements).
ELEMENTWISE = {
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cos", "Cosh", "Sin", "Sinh", "Tan",
    "Celu", "Elu", "Selu", "Erf", "Exp", "Log", "Gelu", "Mish", "Softplus", "Softsign", "Swish",
    "ThresholdedRelu", "PRelu", "Reciprocal", "Sqrt", "Shrink", "HardSigmoid", "HardSwish",
    "LeakyRelu", "Relu", "Sigmoid", "Tanh", "Neg", "Clip", "Pow", "Max", "Min", "Mod",
    "Add", "Sub", "Mul", "Div", "FastGelu", "QuickGelu", "BiasGelu",
}


def elementwise_input(ctx: Context, node: onnx.NodeProto) -> str | None:
    """The single differentiated input when `node` looks elementwise in it, else None."""
    if node.op_type not in ELEMENTWISE:
        return None
    active = [i for i in node.input if ctx.active(i)]
    outputs = [o for o in node.output if o]
    if len(active) != 1 or len(outputs) != 1:
        return None
    x = active[0]
    if node.input[0] != x or ctx.np_dtype(x).kind != "f":
        return None
    if ctx.shape(x) != ctx.shape(outputs[0]) or ctx.np_dtype(x) != ctx.np_dtype(outputs[0]):
        return None
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for a in node.attribute):
        return None
    return x


def finite_difference(ctx: Context, node: onnx.NodeProto, gys: list) -> list:
    x = elementwise_input(ctx, node)
    if x is None:
        raise UnsupportedOpError(
            f"no backward rule for op {node.op_type} (node {node.name!r}), and the "
            "finite-difference fallback only covers elementwise ops (a known elementwise op type "
            "with one float input and an output of the same shape); this node is not one. Cut "
            "the graph after it (differentiate w.r.t. a later tensor) or add a rule to "
            "cnnviz/autodiff/rules.py."
        )
    h = ctx.op("Mul", [
        ctx.op("Max", [ctx.op("Abs", [x]), ctx.scalar(1.0, x)]), ctx.scalar(RELATIVE_STEP, x)
    ])
    plus, minus = ctx.op("Add", [x, h]), ctx.op("Sub", [x, h])
    y_plus, y_minus = _clone(ctx, node, x, plus), _clone(ctx, node, x, minus)
    slope = ctx.op("Div", [
        ctx.op("Sub", [y_plus, y_minus]), ctx.op("Sub", [plus, minus])
    ])
    return [ctx.op("Mul", [gys[0], slope]) if i == x else None for i in node.input]


def _clone(ctx: Context, node: onnx.NodeProto, x: str, new_x: str) -> str:
    out = ctx.fresh("fd")
    inputs = [new_x if i == x else i for i in node.input]
    clone = helper.make_node(
        node.op_type, inputs, [out], name=ctx.fresh("fd_" + node.op_type), domain=node.domain
    )
    clone.attribute.extend(node.attribute)
    ctx.nodes.append(clone)
    return out
