"""A float16 (or bfloat16) model is computed in float32 (issue 16, item 1).

Why: the gradient engine (autodiff/) differentiates a graph in the types it is written in. In
float16 a backward pass loses what the maps are made of: gradients below 6e-8 are zero, below
6e-5 they lose bits, every product keeps 11 significant bits, and a finite-difference check
(gradcheck) is useless, since a step small enough to measure a derivative is below float16's
resolution. So export widens such a model: every float16 initializer, Constant and tensor
attribute (ConstantOfShape's value) becomes float32, Casts to float16 cast to float32 (other
Casts are kept), and the graph's inputs, outputs and recorded types follow; the Casts between
float16 and float32 that are then float32 to float32 are dropped. The input adapter then needs
no Cast to float16: model.onnx takes float32 as every export does.

Every float16 and bfloat16 number is exactly a float32 number, so the weights are unchanged; the
forward differs from the model as given only in rounding each intermediate to float32 instead
of float16, about 1e-3 of the largest score. Export checks the widened graph against the model
as given, fed its own float16 input, on the verification photo (`RELATIVE_TOLERANCE`).

bfloat16 is widened the same way, but only a graph ONNX Runtime loads as given gets this far
(its CPU has few bfloat16 kernels; ONNX's Conv takes bfloat16 from opset 22 only), and an image
input of bfloat16 is refused by `onnx_io.read_input`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

__all__ = ["LOW_PRECISION", "RELATIVE_TOLERANCE", "drop_float_casts", "widen_to_float32"]

LOW_PRECISION = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
# Of the largest |score|: float16 rounds to 4.9e-4 relative per value, and a deep graph's
# scores move by about 1e-3 of the largest; a wrong layout or channel order moves them by ~1.
RELATIVE_TOLERANCE = 1e-2
# Integer attributes that name a tensor type (Cast's `to`; RandomNormal's, EyeLike's `dtype`).
TYPE_ATTRIBUTES = ("to", "dtype")


def widen_to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(a copy computing in float32, the low-precision types it had, e.g. ["float16"]); the
    model itself and [] when it has no float16 or bfloat16 tensor, Cast or type."""
    out = copy.deepcopy(model)
    seen: set[int] = set()
    _graph(out.graph, seen)
    for function in out.functions:
        _nodes(function.node, seen)
        for value in getattr(function, "value_info", []):
            _type(value.type, seen)
    if not seen:
        return model, []
    drop_float_casts(out)
    return out, [LOW_PRECISION[t] for t in sorted(seen)]


def drop_float_casts(model: onnx.ModelProto) -> int:
    """In place: drop the Casts to float32 of a float32 tensor (a widened float16 graph's
    Casts between float16 and float32), their readers reading the tensor itself; the number
    dropped. Sorts the nodes topologically first (ONNX Runtime's float16 converter appends
    the Casts of its inputs and outputs at the end). A Cast that writes a graph output or that
    a subgraph reads is kept; so is every Cast when types cannot be inferred."""
    from ..autodiff.prepare import sort_topologically
    from ..graph import _value_infos, infer_shapes, weightless
    from .outputs import _subgraph_names

    graph = model.graph
    sort_topologically(graph)
    try:
        typed = _value_infos(infer_shapes(weightless(model)))
    except Exception:  # noqa: BLE001 - the Casts are harmless; dropping them is a nicety
        return 0
    keep = {o.name for o in graph.output}
    for node in graph.node:
        keep |= _subgraph_names(node)
    same: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        node.input[:] = [same.get(name, name) for name in node.input]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = typed.get(node.input[0]) if node.op_type == "Cast" else None
        if (
            source is not None
            and to == TensorProto.FLOAT
            and source.type.tensor_type.elem_type == TensorProto.FLOAT
            and node.output[0] not in keep
        ):
            same[node.output[0]] = node.input[0]
            continue
        nodes.append(node)
    if same:
        del graph.node[:]
        graph.node.extend(nodes)
        values = [v for v in graph.value_info if v.name not in same]
        del graph.value_info[:]
        graph.value_info.extend(values)
    return len(same)


def _graph(graph: onnx.GraphProto, seen: set[int]) -> None:
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in LOW_PRECISION:
            graph.initializer[i].CopyFrom(_tensor(tensor, seen))
    for sparse in graph.sparse_initializer:
        if sparse.values.data_type in LOW_PRECISION:
            sparse.values.CopyFrom(_tensor(sparse.values, seen))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _type(value.type, seen)
    _nodes(graph.node, seen)


def _nodes(nodes: Iterable[onnx.NodeProto], seen: set[int]) -> None:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type in LOW_PRECISION:
                attr.t.CopyFrom(_tensor(attr.t, seen))
            elif attr.type == AttributeProto.TENSORS:
                for i, tensor in enumerate(attr.tensors):
                    if tensor.data_type in LOW_PRECISION:
                        attr.tensors[i].CopyFrom(_tensor(tensor, seen))
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                if attr.sparse_tensor.values.data_type in LOW_PRECISION:
                    attr.sparse_tensor.values.CopyFrom(_tensor(attr.sparse_tensor.values, seen))
            elif attr.type == AttributeProto.GRAPH:  # If, Loop, Scan bodies
                _graph(attr.g, seen)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _graph(sub, seen)
            elif (
                attr.type == AttributeProto.INT
                and attr.name in TYPE_ATTRIBUTES
                and attr.i in LOW_PRECISION
            ):
                seen.add(int(attr.i))
                attr.i = TensorProto.FLOAT


def _tensor(tensor: onnx.TensorProto, seen: set[int]) -> onnx.TensorProto:
    """The same values as float32, exactly (float16 and bfloat16 are subsets of float32)."""
    seen.add(int(tensor.data_type))
    wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
    wide.doc_string = tensor.doc_string
    return wide


def _type(value_type: onnx.TypeProto, seen: set[int]) -> None:
    """A tensor type of low precision becomes float32, also inside sequences and optionals."""
    kind = value_type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tensor = getattr(value_type, kind)
        if tensor.elem_type in LOW_PRECISION:
            seen.add(int(tensor.elem_type))
            tensor.elem_type = TensorProto.FLOAT
    elif kind in ("sequence_type", "optional_type"):
        _type(getattr(value_type, kind).elem_type, seen)
    elif kind == "map_type":
        _type(value_type.map_type.value_type, seen)
