"""The class-score output of an onnx: model, as converters make it: one output among several
(config `output:`), a final Sigmoid (multi-label), scores shaped [N, C, 1, 1] (Caffe), a final
Softmax followed by a Cast to float32 (float16 models with float32 outputs)."""

from __future__ import annotations

import copy

import onnx
from onnx import helper

from ..errors import ModelError
from .onnx_io import FreshNames


def select_output(model: onnx.ModelProto, wanted: str | None, where: str) -> onnx.ModelProto:
    """The model with one graph output, the class scores: `wanted` (config `output:`), else the
    only one; the nodes only other outputs needed are dropped."""
    names = [o.name for o in model.graph.output]
    key = f"models.{_model_name(where)}.output"
    if wanted is not None and wanted not in names:
        raise ModelError(
            f"{where}: {key} {wanted!r} is not one of the model's outputs "
            f"({', '.join(map(repr, names))}); set it to the one that holds the class scores"
        )
    if wanted is None:
        if len(names) == 1:
            return model
        raise ModelError(
            f"{where}: the model has {len(names)} outputs ({', '.join(map(repr, names))}); "
            f"set {key} in the config to the one that holds the class scores"
        )
    if names == [wanted]:
        return model
    out = copy.deepcopy(model)
    graph = out.graph
    keep = [o for o in graph.output if o.name == wanted]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {wanted}
    live: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed |= set(node.input) | _subgraph_names(node)
    del graph.node[:]
    graph.node.extend(reversed(live))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return out


FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")


def cast_before_activation(model: onnx.ModelProto) -> onnx.ModelProto:
    """A final Softmax (LogSoftmax, Sigmoid) followed by a Cast to float32, as float16 models
    converted with float32 inputs and outputs end (onnxconverter-common's keep_io_types), with
    the Cast moved in front of it: strip_softmax and strip_sigmoid then find the logits, and the
    activation runs in float32 (the logits are the same; the scores change by rounding only).
    The model itself when its output is not made so."""
    graph = model.graph
    output = graph.output[0].name
    index = {o: i for i, node in enumerate(graph.node) for o in node.output}
    if output not in index:
        return model
    cast_at = index[output]
    cast = graph.node[cast_at]
    to = next((a.i for a in cast.attribute if a.name == "to"), None)
    if cast.op_type != "Cast" or to != onnx.TensorProto.FLOAT or cast.input[0] not in index:
        return model
    act_at = index[cast.input[0]]
    act = graph.node[act_at]
    readers = [n for n in graph.node if act.output[0] in n.input]
    if (
        act.op_type not in FINAL_ACTIVATIONS
        or len(readers) != 1
        or act.output[0] in {o.name for o in graph.output}
    ):
        return model
    out = copy.deepcopy(model)
    nodes = list(out.graph.node)
    cast, act = nodes[cast_at], nodes[act_at]
    used = {n for node in nodes for n in [*node.input, *node.output]}
    scores = act.output[0]
    cast.input[0] = act.input[0]
    cast.output[0] = FreshNames(used | {t.name for t in out.graph.initializer})(
        f"{act.input[0]}_float"
    )
    act.input[0], act.output[0] = cast.output[0], output
    nodes.remove(cast)
    nodes.insert(nodes.index(act), cast)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [v for v in out.graph.value_info if v.name != scores]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the outer graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in sub.node:
                names |= set(inner.input) | _subgraph_names(inner)
    return names


def _model_name(where: str) -> str:
    return where.split("'")[1] if where.count("'") >= 2 else "<name>"


def strip_sigmoid(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Make the logits the output when it is a final Sigmoid (a multi-label classifier's
    independent probabilities); (model, stripped?). The seed then picks a class's logit, as
    for a final Softmax."""
    output = model.graph.output[0]
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    if producer is None or producer.op_type != "Sigmoid":
        return model, False
    logits = producer.input[0]
    if any(logits in n.input for n in model.graph.node if n is not producer):
        return model, False  # the logits feed something else too: keep the graph as it is
    out = copy.deepcopy(model)
    kept = [n for n in out.graph.node if output.name not in n.output]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.output[0].name = logits  # elementwise: same type and shape
    return out, True


def flatten_scores(model: onnx.ModelProto) -> onnx.ModelProto:
    """The class scores [N, C, 1, 1] of a model whose classifier is a 1x1 conv or a global pool
    (Caffe conversions: SqueezeNet, NiN) as [N, C]: a Flatten after the output."""
    out = copy.deepcopy(model)
    graph = out.graph
    old = graph.output[0]
    used = {n for node in graph.node for n in [*node.input, *node.output]}
    name = FreshNames(used | {t.name for t in graph.initializer})(f"{old.name}_flat")
    graph.node.append(helper.make_node("Flatten", [old.name], [name], axis=1, name=name))
    dims = old.type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value or None for d in dims[:2]] if len(dims) >= 2 else None
    flat = helper.make_tensor_value_info(name, old.type.tensor_type.elem_type, shape)
    graph.value_info.append(old)
    graph.output.pop()
    graph.output.append(flat)
    return out
