"""Make a model static before differentiating it.

Fix the batch dimension, infer shapes, fold constant shape arithmetic (TorchScript exports compute
Reshape/Pad targets at run time with Shape -> Gather -> Concat chains) and drop dead nodes, until
every tensor the backward needs has a static shape and a shape-computing node is a constant.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from ..errors import ModelError
from ..model_file import copy_without

# Never evaluated at build time: nondeterministic, control flow, or too heavy for the reference
# evaluator (ORT folds constant weights itself when it loads the session).
NO_FOLD = {
    "Conv", "ConvTranspose", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan", "Dropout",
}
MAX_FOLDED_ELEMENTS = 1 << 22
# Initializers above this size (weights) stay out of the working copy: shape inference serializes
# the whole model on every call (VGG16: 0.5 GB), and folding never needs their values.
BIG_INITIALIZER = 4096


def prepare(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` with batch `batch`, static shapes, constant shape arithmetic folded."""
    out, big = _skeleton(model)
    fix_batch(out, batch, skip=set(big))
    sort_topologically(out.graph)
    for _ in range(50):
        out = infer(out)
        if not fold_constants(out, skip=set(big)):
            break
    eliminate_dead_nodes(out.graph, {o.name for o in out.graph.output})
    out = infer(out)
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    stubs = [i for i in out.graph.input if i.name in big]
    for stub in stubs:
        out.graph.input.remove(stub)
    out.graph.initializer.extend(big[name] for name in big if name in used)
    return out


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy without the big initializers (declared as inputs instead) and those initializers."""
    inputs = {i.name for i in model.graph.input}
    big = {
        t.name: t
        for t in model.graph.initializer
        if t.name not in inputs and int(np.prod(t.dims)) > BIG_INITIALIZER
    }
    out = copy_without(model, "graph")
    out.graph.CopyFrom(copy_without(model.graph, "initializer"))
    graph = model.graph
    out.graph.initializer.extend(t for t in graph.initializer if t.name not in big)
    out.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big.values()
    )
    return out, big


def fix_batch(model: onnx.ModelProto, batch: int, skip: set[str] = frozenset()) -> None:
    """Set the leading dim of every graph input to `batch`; forget inferred shapes."""
    graph = model.graph
    inits = {i.name for i in graph.initializer} | set(skip)
    for inp in graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        for k, dim in enumerate(dims):
            if k == 0:
                if dim.HasField("dim_value") and dim.dim_value not in (0, batch):
                    raise ModelError(
                        f"input {inp.name!r} has a fixed batch size {dim.dim_value}, not {batch}; "
                        "export the model with a dynamic batch axis (named 'batch')"
                    )
                dim.Clear()
                dim.dim_value = batch
            elif not dim.HasField("dim_value"):
                raise ModelError(
                    f"input {inp.name!r} has a symbolic dimension {k} ({dim.dim_param!r}); "
                    "only the batch axis may be dynamic: export with a fixed image size"
                )
    graph.ClearField("value_info")
    for o in graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")


# Ops whose output has their first input's type and shape but which ONNX's shape inference leaves
# unshaped (GroupNormalization: a function op with a context-dependent body).
SHAPE_PRESERVING = {"GroupNormalization"}


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    for _ in range(50):
        model = shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
        if not _shape_preserving_outputs(model.graph):
            return model
    return model


def _shape_preserving_outputs(graph: onnx.GraphProto) -> bool:
    """Give SHAPE_PRESERVING nodes' unshaped outputs their input's type; True when any got one
    (inference must run again for what follows them)."""
    shaped = {
        vi.name: vi
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
        if vi.type.tensor_type.HasField("shape")
    }
    added = False
    for node in graph.node:
        if node.op_type in SHAPE_PRESERVING and node.input[0] in shaped:
            if node.output[0] not in shaped:
                vi = graph.value_info.add()
                vi.CopyFrom(shaped[node.input[0]])
                vi.name = node.output[0]
                shaped[vi.name] = vi
                added = True
    return added


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Name -> shape for every tensor whose inferred shape is fully static."""
    shapes = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    return shapes


def elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


class Constants(Mapping):
    """Initializers that are not overridable graph inputs, decoded to numpy on use.

    Small ones (shape arithmetic, read again and again) are decoded once and kept; weights are
    decoded each time a rule asks (once or twice per node), so that a graph's builder does not
    hold a second copy of all its weights (regnet_y_128gf: 2.6 GB)."""

    def __init__(self, graph: onnx.GraphProto, skip: set[str] = frozenset()) -> None:
        inputs = {i.name for i in graph.input}
        self._protos = {
            t.name: t for t in graph.initializer if t.name not in inputs and t.name not in skip
        }
        self._values: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._values:
            return self._values[name]
        value = numpy_helper.to_array(self._protos[name])
        if value.size <= BIG_INITIALIZER:
            self._values[name] = value
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        proto = self._protos[name]
        return tuple(proto.dims) if proto is not None else self._values[name].shape

    def refer(self, proto: onnx.TensorProto) -> None:
        """Know `proto` (a constant emitted for the backward) by its name, decoded on use."""
        self._protos[proto.name] = proto

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._protos[name] = None
        self._values[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


def constant_values(graph: onnx.GraphProto) -> Constants:
    return Constants(graph)


def fold_constants(model: onnx.ModelProto, skip: set[str] = frozenset()) -> bool:
    """Replace nodes computable now by initializers; True when something was folded."""
    graph = model.graph
    shapes = static_shapes(graph)
    consts = Constants(graph, skip)
    kept, folded = [], False
    for node in graph.node:
        values = _evaluate(node, consts, shapes, model.opset_import)
        if values is None:
            kept.append(node)
            continue
        folded = True
        for name, value in zip(node.output, values, strict=False):
            if name:
                consts[name] = value
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    if folded:
        graph.ClearField("node")
        graph.node.extend(kept)
        # Folded outputs are initializers now; their inferred value_info would be stale.
        graph.ClearField("value_info")
    return folded


def _evaluate(node, consts, shapes, opsets) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD:
        return None
    if node.op_type in ("Shape", "Size") and node.input[0] in shapes:
        shape = np.array(shapes[node.input[0]], dtype=np.int64)
        if node.op_type == "Size":
            return [np.array(shape.prod(), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        return [shape[attrs.get("start", 0) : attrs.get("end", len(shape))]]
    inputs = [i for i in node.input if i]
    if not all(i in consts for i in inputs) or (not inputs and node.op_type != "Constant"):
        return None
    for name in node.output:
        if name in shapes and int(np.prod(shapes[name])) > MAX_FOLDED_ELEMENTS:
            return None
    infos = [
        helper.make_tensor_value_info(
            i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape
        )
        for i in dict.fromkeys(inputs)
    ]
    outs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    graph = helper.make_graph([node], "fold", infos, outs)
    one = helper.make_model(graph, opset_imports=list(opsets))
    try:
        results = ReferenceEvaluator(one).run(None, {i: consts[i] for i in inputs})
    except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run stays a node
        return None
    values = iter(results)
    return [np.asarray(next(values)) if o else None for o in node.output]


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every node follows the producers of its inputs."""
    produced_by = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    order, state = [], {}

    def visit(k: int) -> None:
        stack = [(k, False)]
        while stack:
            idx, done = stack.pop()
            if done:
                state[idx] = 2
                order.append(idx)
                continue
            if state.get(idx):
                continue
            state[idx] = 1
            stack.append((idx, True))
            for i in graph.node[idx].input:
                j = produced_by.get(i)
                if j is not None and not state.get(j):
                    stack.append((j, False))

    for k in range(len(graph.node)):
        visit(k)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[k] for k in order]
        graph.ClearField("node")
        graph.node.extend(nodes)


def eliminate_dead_nodes(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Drop nodes none of whose outputs reach `keep`, and initializers nothing reads."""
    needed = set(keep)
    alive = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # names a subgraph reads from the outer scope
                for sub in [attr.g, *attr.graphs]:
                    needed.update(i for n in sub.node for i in n.input)
    graph.ClearField("node")
    graph.node.extend(reversed(alive))
    # delete in place: copying the kept initializers would copy every weight
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name not in needed:
            del graph.initializer[k]
    infos = [v for v in graph.value_info if v.name in needed]
    graph.ClearField("value_info")
    graph.value_info.extend(infos)
