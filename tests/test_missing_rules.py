"""A model with several ops that have no backward rule: one error names them all (op type, how
many nodes, which), says which could use the finite-difference fallback, and the way out for the
rest; nothing is half-built. Softsign and CumSum stand for ops without rules (elementwise and
not); Hardmax twice shows the node count."""

from __future__ import annotations

import numpy as np
import pytest
from cnnviz.autodiff import UnsupportedOpError, ops_without_rules, vjp
from onnx import TensorProto, helper, numpy_helper
from test_autodiff_rules import build


def _model():
    nodes = [
        helper.make_node("Softsign", ["x"], ["a"], name="soft"),
        helper.make_node("CumSum", ["a", "axis"], ["b"], name="cum"),
        helper.make_node("Hardmax", ["b"], ["c"], name="hm1"),
        helper.make_node("Relu", ["c"], ["d"], name="relu"),
        helper.make_node("Hardmax", ["d"], ["y"], name="hm2"),
    ]
    return build(nodes, (1, 4), {"axis": np.array(1, np.int64)})


def test_every_missing_op_is_named_at_once():
    model = _model()
    with pytest.raises(UnsupportedOpError) as caught:
        vjp(model, ["x"])
    text = str(caught.value)
    assert text.startswith("no backward rule for 3 op types of this model")
    assert "Softsign (1 node: 'soft')" in text and "CumSum (1 node: 'cum')" in text
    assert "Hardmax (2 nodes: 'hm1', 'hm2')" in text
    assert "Softsign could use fallback: finite-differences" in text
    assert "CumSum, Hardmax: the finite-difference fallback only covers elementwise ops" in text
    assert [entry.split()[0] for entry in ops_without_rules(model)] == [
        "Softsign", "CumSum", "Hardmax", "Hardmax",
    ]  # fmt: skip


def test_ops_off_the_differentiated_path_are_not_named():
    """Differentiating w.r.t. a tensor after CumSum: only the Hardmax nodes stand in the way."""
    with pytest.raises(UnsupportedOpError, match=r"for 1 op type of this model: Hardmax \(2 nodes"):
        vjp(_model(), ["b"])


def test_ops_no_gradient_flows_through_are_not_listed():
    """A channel shuffle's Shape -> Gather -> Reshape chain (torchvision's ShuffleNet through
    TorchScript): Shape's output is integers, so it needs no rule and the model is covered."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0, name="n"),
        helper.make_node("Concat", ["n", "rest"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="flat"),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest")]  # fmt: skip
    graph = helper.make_graph(nodes, "shuffle", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert ops_without_rules(model) == []
    vjp(model, ["x"], batch=2)  # and the engine differentiates it
