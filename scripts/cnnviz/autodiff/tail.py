"""Cut an ONNX model at an intermediate tensor: the "tail" from that tensor to the outputs.

The tail takes the tensor as a new graph input with a symbolic batch axis, so finite differences
can push many perturbed copies of one activation through it in a single run. Exporters bake the
batch size into shape arithmetic (`Shape(input) -> Gather -> Concat -> Reshape`, or a literal
`Reshape [1, -1]`); the tail is therefore cut from the batch-1 model with its shape arithmetic
folded to constants (`prepare`), and every constant `Reshape` whose leading 1 is the batch axis
is rewritten to 0 ("copy the batch from the data").
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from .prepare import elem_types, prepare, static_shapes


def tail_model(
    model: onnx.ModelProto, from_tensor: str, outputs: list[str] | None = None
) -> onnx.ModelProto:
    """The subgraph computing `outputs` (default: the model's outputs) from `from_tensor`.

    `from_tensor` becomes the first graph input, `[batch, ...]`. Any other model input the tail
    still needs (a skip path around the cut) stays an input and must be fed alongside.
    """
    static = prepare(model, 1)
    graph = static.graph
    outputs = outputs or [o.name for o in graph.output]
    shapes, types = static_shapes(graph), elem_types(graph)
    if from_tensor not in shapes:
        raise ModelError(
            f"tensor {from_tensor!r} is not in the model's graph (or has no static shape); "
            "name a tensor from the layer table"
        )
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - set(initializers)

    kept: set[int] = set()
    needed_inputs: set[str] = set()
    index = {id(node): i for i, node in enumerate(graph.node)}
    stack, seen, reached = list(outputs), set(), False
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name == from_tensor:
            reached = True
        elif name in graph_inputs:
            needed_inputs.add(name)
        elif name in producers:
            kept.add(index[id(producers[name])])
            stack.extend(producers[name].input)
    if not reached:
        raise ModelError(f"tensor {from_tensor!r} does not feed the outputs {outputs}")

    nodes = [node for i, node in enumerate(graph.node) if i in kept]
    extra = batch_reshapes(nodes, initializers, shapes)
    used = {name for node in nodes for name in node.input}
    inits = [init for init in list(graph.initializer) + extra if init.name in used]
    names = [from_tensor] + [i.name for i in graph.input if i.name in needed_inputs]
    tail_inputs = [_batch_info(n, types.get(n, TensorProto.FLOAT), shapes.get(n)) for n in names]
    tail_outputs = [_batch_info(o, types.get(o, TensorProto.FLOAT), shapes.get(o)) for o in outputs]
    tail = helper.make_graph(nodes, f"{graph.name}_tail", tail_inputs, tail_outputs, inits)
    out = helper.make_model(tail, opset_imports=list(static.opset_import))
    out.ir_version = static.ir_version if 0 < static.ir_version <= 13 else 8
    return out


def batch_reshapes(nodes, inits: dict[str, TensorProto], shapes: dict) -> list[TensorProto]:
    """`Reshape(x, [1, ...])` with x's leading axis the batch (1 here): make it `[0, ...]`.

    Rewrites `nodes` in place and returns the new shape initializers.
    """
    extra = []
    for node in nodes:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        target = numpy_helper.to_array(inits[node.input[1]])
        data = shapes.get(node.input[0])
        if allowzero or target.size == 0 or target[0] != 1 or not data or data[0] != 1:
            continue
        new = target.copy()
        new[0] = 0
        name = f"{node.input[1]}__batch0_{node.output[0]}"
        extra.append(numpy_helper.from_array(new, name))
        node.input[1] = name
    return extra


def _batch_info(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    if shape is None:
        return helper.make_tensor_value_info(name, elem, None)
    dims = ["batch", *shape[1:]] if len(shape) else []
    return helper.make_tensor_value_info(name, elem, dims)
