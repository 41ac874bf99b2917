"""Backward rules that read reference activations: DeepLIFT's rescale rule.

DeepLIFT (Shrikumar et al. 2017) explains f(x) - f(x0) for a reference input x0. Under its
*rescale rule* a nonlinearity y = h(u) passes the multiplier Δy/Δu (Δu = u(x) - u(x0)) instead of
h'(u); linear ops (Conv, Gemm, BatchNormalization, pooling by averaging, Add, Concat, ...) keep
their gradient, which is their multiplier. Then sum_i (x - x0)_i * m_i = f(x) - f(x0) exactly
("summation-to-delta") for a network of linear ops and rescaled nonlinearities.

The reference activations come from a copy of the forward graph in the same model: `vjp(model,
..., node_rules=deeplift_rules)` gives a backward whose rules read u(x0) as the tensor
``ref:<u>``, and `attach_reference` adds the forward of the model at ONE row on the new input
``ref:<input>`` (the baseline x0), every tensor renamed ``ref:<name>``. The baseline is the same
for every image, so its forward runs once per call, broadcast against the B rows of x; forward
and backward of x run at B rows, as for a plain gradient. (captum runs the model and its
backward on torch.cat([x, x0]), 2B rows; the two agree: captum's reference half of the backward
carries the same multipliers, and only its MaxPool rule reads it.)

Where |Δu| < EPS the multiplier is the true derivative (captum's fallback, same EPS).

Definitions (captum 0.9.0's DeepLift where it has the op):

- Rescaled elementwise ops: Relu, LeakyRelu, Elu, Sigmoid, Tanh, Softplus (captum's list), and
  also Clip (ReLU6, hardtanh), PRelu, ThresholdedRelu, Selu, Celu, HardSigmoid, HardSwish, Gelu,
  Mish (captum leaves nn.ReLU6, nn.Hardswish, nn.GELU, ... at their gradient, which breaks
  summation-to-delta; here every single-input activation is rescaled).
- MaxPool: captum's rule. With o = pool(u(x)), o0 = pool(u(x0)) and top = max(o, o0), the output
  difference is split as (top - o0) + (o - top); the first part goes to the window's argmax under
  x, the second (<= 0) to its argmax under x0 (switch unpooling with each input's switches),
  their sum is divided by Δu.
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

import onnx
from onnx import helper

from .context import Context
from .policies import POLICIES
from .prepare import (
    BIG_INITIALIZER,
    elem_types,
    eliminate_dead_nodes,
    prepare,
    sort_topologically,
    static_shapes,
)
from .rules import RULES, Rule, _binary, only_first_input

EPS = 1e-10  # captum DeepLift's default eps: below it, |Δu| counts as no change
REF = "ref:"  # the reference copy of a forward tensor u is "ref:u"

RESCALED = (
    "Relu", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "Softplus",  # captum's
    "Clip", "PRelu", "ThresholdedRelu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Mish",
)  # fmt: skip


def _ratio(ctx: Context, num: str, den: str, like: str) -> tuple[str, str]:
    """(num / den, the mask |den| < EPS): where the mask holds the quotient is not used (it may
    be inf or nan there; Where does not propagate the branch it does not pick)."""
    small = ctx.op("Less", [ctx.op("Abs", [den]), ctx.scalar(EPS, like)])
    return ctx.op("Div", [num, den]), small


def _delta(ctx: Context, name: str) -> str:
    """u(x) - u(x0): [B, ...] minus the reference's one row."""
    return ctx.op("Sub", [name, REF + name])


def _derivative(op_type: str) -> Rule:
    return POLICIES["gradient"].get(op_type) or RULES[op_type]


def rescale(ctx: Context, node, gys: list) -> list:
    """g * Δy/Δu, or the derivative's g * h'(u) where |Δu| < EPS."""
    only_first_input(ctx, node, "parameter")
    u, v = node.input[0], node.output[0]
    ratio, small = _ratio(ctx, _delta(ctx, v), _delta(ctx, u), u)
    grads = _derivative(node.op_type)(ctx, node, gys)
    scaled = ctx.op("Mul", [gys[0], ratio])
    return [ctx.op("Where", [small, grads[0], scaled]), *grads[1:]]


def max_pool_rescale(ctx: Context, node, gys: list) -> list:
    """captum's MaxPool rule (module docstring); the derivative where |Δu| < EPS."""
    unpool = RULES["MaxPool"]
    u, o = node.input[0], node.output[0]
    top = ctx.op("Max", [o, REF + o])
    at_x = unpool(ctx, node, [ctx.op("Mul", [gys[0], ctx.op("Sub", [top, REF + o])]), None])[0]
    # the reference's switches, one copy per row of x
    wide = ctx.op("Expand", [REF + u, ctx.ints(ctx.shape(u))])
    ctx.shapes[wide], ctx.dtypes[wide] = ctx.shape(u), ctx.dtypes[u]
    at_ref = onnx.NodeProto()
    at_ref.CopyFrom(node)
    at_ref.input[0] = wide
    at_r = unpool(ctx, at_ref, [ctx.op("Mul", [gys[0], ctx.op("Sub", [o, top])]), None])[0]
    ratio, small = _ratio(ctx, ctx.op("Add", [at_x, at_r]), _delta(ctx, u), u)
    return [ctx.op("Where", [small, unpool(ctx, node, gys)[0], ratio])]


def product_rescale(ctx: Context, node, gys: list) -> list:
    """Mul of two computed tensors: a's multiplier is mean(b) = (b(x) + b(x0)) / 2 and b's is
    mean(a), since Δ(ab) = Δa mean(b) + Δb mean(a) exactly. With one computed operand the
    product is linear in it: its gradient."""
    a, b = node.input[:2]
    if not (ctx.active(a) and ctx.active(b)):
        return RULES["Mul"](ctx, node, gys)

    def mean(t: str) -> str:
        return ctx.op("Mul", [ctx.op("Add", [t, REF + t]), ctx.scalar(0.5, t)])

    g = gys[0]
    return _binary(
        ctx, node, lambda: ctx.op("Mul", [g, mean(b)]), lambda: ctx.op("Mul", [g, mean(a)])
    )


def deeplift_rules(ctx: Context, graph) -> dict[str, Rule]:
    """The rules of a graph's nodes, for `vjp(..., node_rules=deeplift_rules)`: the rescaled
    activations, MaxPool and products; every other node keeps its rule under the policy
    "gradient". The result reads ``ref:`` tensors: finish it with `attach_reference`."""
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


def attach_reference(core: onnx.ModelProto, model: onnx.ModelProto, wrt: str,
                     outputs: list[str] = ()) -> onnx.ModelProto:
    """`core` (a vjp of `model` w.r.t. its input `wrt` under deeplift_rules) with the forward of
    `model` at one row added on the input ``ref:<wrt>``, its tensors renamed ``ref:<name>``
    (the model's big weights shared with core's); `outputs`: forward tensors whose reference
    copies become outputs too (``ref:<name>``, e.g. the seeded logits)."""
    ref = prepare(model, 1)
    out = onnx.ModelProto()
    out.CopyFrom(core)
    graph = out.graph
    present = {t.name for t in graph.initializer}
    shared = {t.name for t in ref.graph.initializer
              if t.name in present and _size(t) > BIG_INITIALIZER}

    def rename(name: str) -> str:
        return name if not name or name in shared else REF + name

    for node in ref.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = REF + (node.name or node.output[0])
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
        graph.node.append(copy)
    for init in ref.graph.initializer:
        if init.name not in shared:
            graph.initializer.append(init)
            graph.initializer[-1].name = REF + init.name
    shapes, types = static_shapes(ref.graph), elem_types(ref.graph)
    graph.input.append(helper.make_tensor_value_info(REF + wrt, types[wrt], shapes[wrt]))
    for name in outputs:
        graph.output.append(helper.make_tensor_value_info(REF + name, types[name], shapes[name]))
    sort_topologically(graph)
    eliminate_dead_nodes(graph, {o.name for o in graph.output})
    return out


def _size(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
