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

__all__ = ["POLICIES", "RULES", "UnsupportedOpError", "ops_without_rules", "vjp"]


def ops_without_rules(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    """Nodes no backward rule covers ("op_type node_name"): where a gradient would fail, or,
    with the finite-difference fallback, be approximate. Constants never need one."""
    ruled = set(RULES) | {op for rules in POLICIES.values() for op in rules} | {"Constant"}
    return [
        f"{node.op_type} {node.name}".strip()
        for node in model.graph.node
        if node.op_type not in ruled or node.domain not in ("", "ai.onnx")
    ]
