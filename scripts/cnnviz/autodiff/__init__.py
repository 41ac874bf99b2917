"""Reverse-mode differentiation of ONNX models, emitted as an ONNX graph ONNX Runtime runs.

`vjp(model, wrt, seed_outputs, policy, batch, fallback)` returns a model whose extra inputs are
the seeds (``seed:<tensor>``) and whose extra outputs are the wrt tensors and ``grad:<wrt>``.
Modules: prepare (static shapes), rules (one backward rule per op), policies (ReLU-like rules
under gradient / deconvnet / guided), fallback (in-graph central differences), builder (driver).
"""

from .builder import vjp
from .context import UnsupportedOpError
from .policies import POLICIES
from .rules import RULES

__all__ = [
    "NO_GRADIENT", "POLICIES", "RULES", "UnsupportedOpError", "ops_without_rules",
    "straight_through_nodes", "vjp",
]  # fmt: skip


# Ops through which no gradient flows, so they never need a rule: constants, and ops whose
# outputs are integers or booleans, or do not depend on their inputs' values (a channel
# shuffle's Shape -> Gather -> Reshape chain in torchvision's ShuffleNet).
NO_GRADIENT = frozenset({
    "Constant", "Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero", "ArgMax",
    "ArgMin", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
    "Xor", "IsNaN", "IsInf",
})  # fmt: skip


def ops_without_rules(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    """Nodes no backward rule covers ("op_type node_name"): where a gradient would fail, or,
    with the finite-difference fallback, be approximate. Constants never need one."""
    ruled = set(RULES) | {op for rules in POLICIES.values() for op in rules} | NO_GRADIENT
    return [
        f"{node.op_type} {node.name}".strip()
        for node in model.graph.node
        if node.op_type not in ruled or node.domain not in ("", "ai.onnx")
    ]


def straight_through_nodes(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    """Nodes whose backward is the straight-through estimator ("op_type node_name"): QuantizeLinear
    of a computed tensor (not of a stored weight, which no gradient reaches), so gradients through
    the model are estimates (vjp lists the ones it used in "cnnviz.approximate")."""
    from .rules_elementwise import STRAIGHT_THROUGH

    graph = model.graph
    stored = {i.name for i in graph.initializer}
    stored |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [
        f"{node.op_type} {node.name}".strip()
        for node in graph.node
        if node.op_type in STRAIGHT_THROUGH and node.input[0] not in stored
    ]
