"""Hand-built ONNX models for the tests: one place that finishes and checks a graph.

opset 17 and IR version 8: onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 cannot read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


def finish_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Mapping[str, np.ndarray] | Sequence[onnx.TensorProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    name: str = "tiny",
) -> onnx.ModelProto:
    """The graph as a checked model that ONNX Runtime loads."""
    if isinstance(initializers, Mapping):
        initializers = [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
