"""Backward rules of ReLU-like ops under each policy.

- ``gradient``: the true derivative (torch semantics: the mask is strict, x > 0 and lo < x < hi).
- ``deconvnet`` (Zeiler & Fergus 2014): the backward signal goes through a ReLU of its own,
  ``relu(g)``, whatever the forward input was. For Clip (ReLU6) we also use ``relu(g)``: Z&F apply
  a ReLU to the reconstructed signal, and the upper bound of ReLU6 has no deconvnet analogue, so
  it is ignored rather than invented.
- ``guided`` (Springenberg et al. 2015): both, ``relu(g) * (x > 0)``; for Clip
  ``relu(g) * (lo < x < hi)``.

LeakyRelu, PRelu and ThresholdedRelu have their true derivative under ``gradient``; under
``deconvnet`` and ``guided`` they are treated exactly like Relu (the negative slope is ignored;
guided masks on the forward input x > 0, for ThresholdedRelu x > alpha), which is what "a ReLU
network" means for these methods. Smooth activations (Sigmoid, Tanh, Softplus, Elu, Selu, Celu,
Gelu, Mish...), HardSigmoid, HardSwish and every other op keep their true derivative under every
policy (rules.py, rules_elementwise.py): the policies change only the ReLU-like ops' rules.
MaxPool's backward is the switch unpooling under all three.
"""

from __future__ import annotations

from .context import Context, attrs_of
from .rules import Rule, only_first_input


def _clip_bounds(ctx: Context, node) -> tuple[str | float | None, str | float | None]:
    """Clip's (lo, hi) as constants or tensor names; None where unbounded."""
    if ctx.opset >= 11:
        only_first_input(ctx, node, "bound")
        names = list(node.input[1:3]) + [""] * 2
        return tuple(_bound(ctx, n) for n in names[:2])
    a = attrs_of(node)
    return a.get("min"), a.get("max")


def _bound(ctx: Context, name: str) -> str | float | None:
    if not name:
        return None
    value = ctx.value(name)
    return name if value is None else float(value)


def _pad(node, gx: str) -> list:
    return [gx] + [None] * (len(node.input) - 1)


# Masks are read off the activation's *output*: lo < clip(x) < hi exactly where lo < x < hi
# (and relu(x) > 0 where x > 0), and leaving the input with a single consumer lets ONNX Runtime
# fuse Conv + Relu/Clip in the forward part and skip layout conversions (10-20% faster).

# ---- gradient ----------------------------------------------------------------------------------
def relu_gradient(ctx, node, gys):
    return [ctx.op("Mul", [gys[0], ctx.between(node.output[0], 0.0, None)])]


def clip_gradient(ctx, node, gys):
    lo, hi = _clip_bounds(ctx, node)
    return _pad(node, ctx.op("Mul", [gys[0], ctx.between(node.output[0], lo, hi)]))


def leaky_relu_gradient(ctx, node, gys):
    # slope alpha where x <= 0, 1 where x > 0: alpha + (1 - alpha) * (x > 0)
    alpha = attrs_of(node).get("alpha", 0.01)
    x = node.input[0]
    slope = ctx.op("Add", [
        ctx.scalar(alpha, x),
        ctx.op("Mul", [ctx.between(x, 0.0, None), ctx.scalar(1.0 - alpha, x)]),
    ])
    return [ctx.op("Mul", [gys[0], slope])]


def prelu_gradient(ctx, node, gys):
    # slope[c] where x <= 0, 1 where x > 0; the slope broadcasts to x (ONNX unidirectional
    # broadcasting) and is a constant: a learned slope that depends on the wrt tensor is refused
    only_first_input(ctx, node, "slope")
    x, slope = node.input[:2]
    one = ctx.scalar(1.0, x)
    factor = ctx.op("Where", [ctx.op("Greater", [x, ctx.scalar(0.0, x)]), one, slope])
    return _pad(node, ctx.op("Mul", [gys[0], factor]))


def _threshold(node) -> float:
    return float(attrs_of(node).get("alpha", 1.0))


def thresholded_relu_gradient(ctx, node, gys):
    # y = x where x > alpha, else 0
    return [ctx.op("Mul", [gys[0], ctx.between(node.input[0], _threshold(node), None)])]


# ---- deconvnet ---------------------------------------------------------------------------------
def relu_deconvnet(ctx, node, gys):
    return _pad(node, ctx.op("Relu", [gys[0]]))


# ---- guided ------------------------------------------------------------------------------------
def relu_guided(ctx, node, gys):
    mask = ctx.between(node.output[0], 0.0, None)
    return [ctx.op("Mul", [ctx.op("Relu", [gys[0]]), mask])]


def clip_guided(ctx, node, gys):
    lo, hi = _clip_bounds(ctx, node)
    mask = ctx.between(node.output[0], lo, hi)
    return _pad(node, ctx.op("Mul", [ctx.op("Relu", [gys[0]]), mask]))


def input_guided(ctx, node, gys):
    """relu(g) * (x > 0) on the forward input: PRelu's output is positive also where x < 0 and
    the slope is negative, so its output cannot give the mask."""
    mask = ctx.between(node.input[0], 0.0, None)
    return _pad(node, ctx.op("Mul", [ctx.op("Relu", [gys[0]]), mask]))


def thresholded_relu_guided(ctx, node, gys):
    mask = ctx.between(node.input[0], _threshold(node), None)
    return [ctx.op("Mul", [ctx.op("Relu", [gys[0]]), mask])]


POLICIES: dict[str, dict[str, Rule]] = {
    "gradient": {
        "Relu": relu_gradient, "Clip": clip_gradient, "LeakyRelu": leaky_relu_gradient,
        "PRelu": prelu_gradient, "ThresholdedRelu": thresholded_relu_gradient,
    },
    "deconvnet": {
        "Relu": relu_deconvnet, "Clip": relu_deconvnet, "LeakyRelu": relu_deconvnet,
        "PRelu": relu_deconvnet, "ThresholdedRelu": relu_deconvnet,
    },
    "guided": {
        "Relu": relu_guided, "Clip": clip_guided, "LeakyRelu": relu_guided,
        "PRelu": input_guided, "ThresholdedRelu": thresholded_relu_guided,
    },
}  # fmt: skip
