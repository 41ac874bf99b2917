"""Move Transposes down an onnx: graph until they cancel (values unchanged).

tf2onnx without its optimizer, and export's own input adapter in front of an NHWC model, leave
Transpose pairs around channel-last stretches: Conv -> Transpose(NCHW->NHWC) -> Mul/Add (an
unfolded BatchNormalization) -> Relu -> Pad -> Transpose(NHWC->NCHW) -> Conv. There the layer
table finds no activation after the conv (a Transpose is in the way) and the gradient engine runs
two copies for nothing. A Transpose read by one node moves below it when that node is
elementwise (its constant operand transposed), a Pad (its pads permuted) or a Reduce* (its axes
mapped, the Transpose gone when the kept axes stay in order); two Transposes in a row compose,
and vanish when they cancel. Export checks the result against the model as given.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
         "Softplus", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Erf", "Gelu", "Mish",
         "Celu"}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax"}
MAX_ROUNDS = 1000


def sink_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where Transposes have moved down and cancelled where they could."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for _ in range(MAX_ROUNDS):
        if not _one_step(graph):
            break
    used = {n for node in graph.node for n in node.input} | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name in _inputs(graph)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # shapes are recorded again after export
    return out


def _inputs(graph: onnx.GraphProto) -> set[str]:
    return {v.name for v in graph.input}


def _one_step(graph: onnx.GraphProto) -> bool:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    consts = {t.name: t for t in graph.initializer if t.name not in _inputs(graph)}
    for t in graph.node:
        if t.op_type != "Transpose" or t.output[0] in outputs:
            continue
        users = readers.get(t.output[0], [])
        if len(users) != 1 or list(users[0].input).count(t.output[0]) != 1:
            continue
        perm = [int(p) for p in _attr(t, "perm", [])]
        if perm and _move(graph, t, users[0], perm, consts):
            return True
    return False


def _move(graph, t, node, perm, consts) -> bool:
    op = node.op_type
    if op == "Transpose":
        if node.output[0] in {v.name for v in graph.output}:
            return False
        composed = [perm[p] for p in _attr(node, "perm", [])]
        if composed == list(range(len(perm))):  # cancel: node's readers read t's input
            _bypass(graph, t.input[0], node.output[0], [t, node])
            return True
        _set_perm(node, composed)
        node.input[0] = t.input[0]
        _remove(graph, [t])
        return True
    if op in UNARY or (op == "Clip" and all(n in consts or not n for n in node.input[1:])):
        if node.input[0] != t.output[0]:
            return False
        return _swap(graph, t, node, lambda: None)
    if op in BINARY:
        other = [n for n in node.input if n != t.output[0]]
        if len(other) != 1 or other[0] not in consts:
            return False
        value = numpy_helper.to_array(consts[other[0]])
        if value.ndim > len(perm):
            return False
        full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
        moved = np.ascontiguousarray(full.transpose(np.argsort(perm)))
        name = _fresh(graph, other[0] + "_t")
        index = list(node.input).index(other[0])
        return _swap(graph, t, node, lambda: _set_const(graph, node, index, moved, name))
    if op == "Pad":
        return _pad(graph, t, node, perm, consts)
    if op in REDUCE:
        return _reduce(graph, t, node, perm, consts)
    return False


def _swap(graph, t, node, edit) -> bool:
    """node reads t's input, t reads node's (renamed) output and writes node's old output."""
    edit()
    final = node.output[0]
    between = _fresh(graph, final + "_pre_t")
    node.input[list(node.input).index(t.output[0])] = t.input[0]
    node.output[0] = between
    t.input[0] = between
    t.output[0] = final
    _reorder(graph, node, t)
    return True


def _pad(graph, t, node, perm, consts) -> bool:
    if node.input[0] != t.output[0] or len(node.input) < 2 or node.input[1] not in consts:
        return False
    if len(node.input) > 3 and node.input[3]:
        return False
    pads = numpy_helper.to_array(consts[node.input[1]]).astype(np.int64)
    r = len(perm)
    if pads.size != 2 * r:
        return False
    begins, ends = np.zeros(r, np.int64), np.zeros(r, np.int64)
    for i, p in enumerate(perm):  # output axis i is input axis p
        begins[p], ends[p] = pads[i], pads[r + i]
    name = _fresh(graph, node.input[1] + "_t")
    pads = np.concatenate([begins, ends])
    return _swap(graph, t, node, lambda: _set_const(graph, node, 1, pads, name))


def _reduce(graph, t, node, perm, consts) -> bool:
    if node.input[0] != t.output[0]:
        return False
    r = len(perm)
    from_input = len(node.input) > 1 and node.input[1]
    if from_input:
        if node.input[1] not in consts:
            return False
        axes = numpy_helper.to_array(consts[node.input[1]]).astype(np.int64).tolist()
    else:
        axes = [int(a) for a in _attr(node, "axes", [])]
    if not axes:
        return False
    axes = [(a + r) % r for a in axes]
    moved = sorted(perm[a] for a in axes)
    keepdims = int(_attr(node, "keepdims", 1))
    kept = [perm[i] for i in range(r) if i not in axes]
    if not keepdims and kept != sorted(kept):
        return False

    def edit() -> None:
        if from_input:
            _set_const(graph, node, 1, np.asarray(moved, np.int64), _fresh(graph, "axes_t"))
        else:
            _set_ints(node, "axes", moved)

    if keepdims:
        return _swap(graph, t, node, edit)
    edit()  # the kept axes are in order: no Transpose after the reduction
    _bypass(graph, t.input[0], t.output[0], [t])
    return True


# --------------------------------------------------------------------------- graph edits


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_perm(node: onnx.NodeProto, perm: list[int]) -> None:
    _set_ints(node, "perm", perm)


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, [int(v) for v in values])])


def _set_const(graph, node, index: int, value: np.ndarray, name: str) -> None:
    graph.initializer.append(numpy_helper.from_array(value, name))
    node.input[index] = name


def _fresh(graph: onnx.GraphProto, base: str) -> str:
    used = {n for node in graph.node for n in [*node.input, *node.output]}
    used |= {t.name for t in graph.initializer} | _inputs(graph)
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    return name


def _bypass(graph: onnx.GraphProto, source: str, target: str, nodes: list) -> None:
    """Remove `nodes` (source -> ... -> target): the tensor keeps the model's name `target`
    when only they read `source`, else `target`'s readers read `source`."""
    _remove(graph, nodes)
    producer = next((n for n in graph.node if source in n.output), None)
    read = any(source in n.input for n in graph.node) or source in {v.name for v in graph.output}
    if producer is not None and not read:
        producer.output[list(producer.output).index(source)] = target
    else:
        _rename_reads(graph, target, source)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in graph.output:
        if value.name == old:  # pragma: no cover - a graph output is never cancelled
            value.name = new


def _remove(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    gone = {n.output[0] for n in nodes}  # output names are unique in a graph
    kept = [n for n in graph.node if n.output[0] not in gone]
    del graph.node[:]
    graph.node.extend(kept)


def _reorder(graph: onnx.GraphProto, first: onnx.NodeProto, then: onnx.NodeProto) -> None:
    """Put `then` right after `first` (topological order after a swap)."""
    nodes = [n for n in graph.node if n.output[0] != then.output[0]]
    at = next(i for i, n in enumerate(nodes) if n.output[0] == first.output[0])
    nodes.insert(at + 1, then)
    del graph.node[:]
    graph.node.extend(nodes)
