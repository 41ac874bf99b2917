"""Receptive fields from the ONNX graph: which input pixels a unit of a layer can see.

Per spatial axis a field is (size, stride, offset): unit u of the tensor sees the input pixels
[offset + u * stride, offset + u * stride + size) (before clipping to the image). The graph is
walked from the image input to the tensor, composing each node:

- Conv, MaxPool, AveragePool, LpPool: k_eff = dilation * (kernel - 1) + 1;
  size += (k_eff - 1) * stride; offset -= pad_begin * stride; stride *= s
  (auto_pad SAME_UPPER / SAME_LOWER resolved from the node's input extent, as ONNX does);
- Pad (constant pads): offset -= pad_begin * stride;
- GlobalAveragePool / GlobalMaxPool / GlobalLpPool, InstanceNormalization and Reduce* over the
  spatial axes: every unit sees the whole image (size = image extent, stride 0, offset 0);
- elementwise ops pass the field through; ops with several tensor inputs (Add, Mul, Concat
  along channels, ...) take the union of their branches; a Split along channels passes it. A
  broadcast operand of spatial extent 1 next to a full map (a squeeze-and-excitation gate, a
  per-channel scale) is left out: it modulates the unit but is not where its local evidence
  comes from;
- Transpose: one that moves the channel axis (NCHW <-> NHWC: a converter's layout, export's
  input adapter) leaves a permuted tensor that elementwise ops keep until a Transpose back.

Anything else on the way (Resize, Reshape, Slice, ConvTranspose, ...) raises ModelError naming
the node: the field is then not known, and callers fall back to what the data shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError

WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "InstanceNormalization")
REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")  # fmt: skip
# Unary ops and ops whose extra inputs are parameters (Clip bounds, BN statistics, PRelu slope).
FIRST_INPUT_OPS = (
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid",
    "Sigmoid", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast",
    "BatchNormalization", "LRN", "ThresholdedRelu", "QuantizeLinear", "DequantizeLinear",
)  # fmt: skip
# Ops over several tensors, broadcasting, elementwise: the union of the branches.
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where")
NO_DATA_OPS = ("Shape", "Size", "Constant", "ConstantOfShape")  # outputs hold no pixels


class Field(NamedTuple):
    """One spatial axis: unit u sees input pixels [offset + u*stride, ... + size)."""

    size: int
    stride: int  # 0: every unit sees the same region (after a global pool)
    offset: int  # where unit 0's field starts; negative where padding comes first


class _Axis(NamedTuple):
    field: Field
    extent: int | None  # the tensor's length along this axis, where known


_Fields = tuple[_Axis, ...]


class _Unsupported(NamedTuple):
    reason: str


class _Moved(NamedTuple):
    """A tensor whose axes are permuted from [N, C, spatial...]: its axis i is that form's
    axis perm[i] (an NHWC tensor: perm (0, 2, 3, 1)). Elementwise ops keep it; a Transpose
    back gives the fields again (a converter's NHWC input, export's input adapter)."""

    fields: _Fields
    perm: tuple[int, ...]


def receptive_field(
    model: onnx.ModelProto, tensor: str, input_size: Sequence[int] | None = None
) -> tuple[Field, ...]:
    """The field of `tensor`'s units, one `Field` (size, stride, offset) per spatial axis.

    `input_size` ([H, W]) is needed only where the graph input's spatial dims are symbolic and
    a global pool or a SAME-padded window needs the image's extent.
    """
    return tuple(axis.field for axis in _walk(model, tensor, input_size))


def tensor_extent(
    model: onnx.ModelProto, tensor: str, input_size: Sequence[int] | None = None
) -> tuple[int | None, ...]:
    """The spatial extent of `tensor` as the walk computes it (None where unknown)."""
    return tuple(axis.extent for axis in _walk(model, tensor, input_size))


def unit_box(
    fields: Sequence[Field], position: Sequence[int], image_size: Sequence[int]
) -> list[int]:
    """[y0, y1, x0, x1] (half-open, input pixels) of the unit at `position`, clipped to the image.

    For any number of spatial axes the result is [start0, end0, start1, end1, ...].
    """
    if len(fields) != len(position) or len(fields) != len(image_size):
        raise ValueError(f"unit_box: {len(fields)} fields, position {list(position)}, "
                         f"image size {list(image_size)}")
    box: list[int] = []
    for field, u, extent in zip(fields, position, image_size, strict=True):
        start = field.offset + int(u) * field.stride
        box += [int(min(max(start, 0), extent)), int(min(max(start + field.size, 0), extent))]
    return box


# --------------------------------------------------------------------------- the walk


def _walk(model: onnx.ModelProto, tensor: str, input_size: Sequence[int] | None) -> _Fields:
    from .graph import input_name

    graph = model.graph
    source = input_name(model)
    start = _input_axes(model, source, input_size)
    image = tuple(axis.extent for axis in start)
    constants = _constants(model)
    fields: dict[str, _Fields | _Unsupported | None] = {source: start}
    if tensor != source and not any(tensor in node.output for node in graph.node):
        raise ModelError(f"tensor {tensor!r} is not in ONNX graph {graph.name!r}; use a layer's "
                         "tensor from model.json's layer table")
    for node in graph.node:
        if tensor in fields:
            break
        outputs = _node_fields(node, fields, constants, image)
        for name in node.output:
            if name:
                fields[name] = outputs
    result = fields.get(tensor)
    if result is None:
        raise ModelError(f"tensor {tensor!r} of graph {graph.name!r} does not depend on the "
                         f"image input {source!r}: it has no receptive field")
    if isinstance(result, _Unsupported):
        raise ModelError(f"no receptive field for tensor {tensor!r}: {result.reason}")
    if isinstance(result, _Moved):
        raise ModelError(f"no receptive field for tensor {tensor!r}: its axes are permuted "
                         "(not [N, C, spatial...]); ask for a tensor after the Transpose back")
    return result


def _input_axes(
    model: onnx.ModelProto, name: str, input_size: Sequence[int] | None
) -> _Fields:
    value = next(v for v in model.graph.input if v.name == name)
    dims = value.type.tensor_type.shape.dim
    if len(dims) < 3:
        raise ModelError(f"input {name!r} has {len(dims)} dims; expected [N, C, spatial...]")
    extents: list[int | None] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in dims[2:]]
    if input_size is not None:
        if len(input_size) != len(extents):
            raise ModelError(f"input_size {list(input_size)} does not match input {name!r} "
                             f"with {len(extents)} spatial dims")
        extents = [int(s) for s in input_size]
    return tuple(_Axis(Field(1, 1, 0), e) for e in extents)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if int(np.prod(t.dims)) <= 64}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_ints", "value_int"):
                    values[node.output[0]] = np.array(helper.get_attribute_value(attr))
    return values


def _node_fields(
    node: onnx.NodeProto,
    fields: dict[str, _Fields | _Unsupported | None],
    constants: dict[str, np.ndarray],
    image: tuple[int | None, ...],
) -> _Fields | _Unsupported | None:
    """The field of the node's outputs; None when no input depends on the image."""
    inputs = [fields.get(name) for name in node.input if name]
    if all(value is None for value in inputs) or node.op_type in NO_DATA_OPS:
        return None
    broken = next((v for v in inputs if isinstance(v, _Unsupported)), None)
    if broken is not None:
        return broken
    where = f"{node.op_type} node {node.name!r}"
    if any(isinstance(v, _Moved) for v in inputs):
        return _moved(node, inputs, where)
    try:
        data = fields.get(node.input[0]) if node.input else None
        op = node.op_type
        if op == "Transpose" and data is not None:
            return _transpose(node, data)
        if op == "Split" and data is not None:
            rank = 2 + len(data)
            if (int(_attrs(node).get("axis", 0)) + rank) % rank != 1:
                return _Unsupported(f"{where} splits along a spatial axis")
            return data  # channel groups: each sees what the input saw
        if op in WINDOW_OPS and data is not None:
            return _window(node, data, constants)
        if op in GLOBAL_OPS and data is not None:
            return _global(data, image, range(len(data)), where)
        if op in REDUCE_OPS and data is not None:
            return _reduce(node, data, constants, image, where)
        if op == "Pad" and data is not None:
            return _pad(node, data, constants, where)
        if op in FIRST_INPUT_OPS:
            if any(isinstance(v, tuple) for v in inputs[1:]):
                return _Unsupported(f"{where}: a parameter input depends on the image")
            return data
        if op in ELEMENTWISE_OPS:
            return _union([v for v in inputs if isinstance(v, tuple)], where)
        if op == "Concat":
            axis = int(_attrs(node).get("axis", 0))
            rank = 2 + len(next(v for v in inputs if isinstance(v, tuple)))
            if (axis + rank) % rank >= 2:
                return _Unsupported(f"{where} concatenates along a spatial axis")
            return _union([v for v in inputs if isinstance(v, tuple)], where)
        if op in ("Softmax", "LogSoftmax") and data is not None:
            rank = 2 + len(data)
            if (int(_attrs(node).get("axis", -1)) + rank) % rank == 1:
                return data  # over the channels only
            return _Unsupported(f"{where} mixes spatial positions")
    except ModelError as error:
        return _Unsupported(str(error))
    return _Unsupported(f"{where} is not supported (supported: windows {WINDOW_OPS}, global "
                        "pools, Pad, elementwise ops, Concat along channels)")


def _transpose(node: onnx.NodeProto, data: _Fields) -> _Fields | _Moved:
    rank = 2 + len(data)
    perm = tuple(int(p) for p in _attrs(node).get("perm", reversed(range(rank))))
    if perm[:2] == (0, 1):  # spatial axes reordered among themselves
        return tuple(data[p - 2] for p in perm[2:])
    return _Moved(data, perm)


def _moved(node: onnx.NodeProto, inputs: list, where: str) -> _Fields | _Moved | _Unsupported:
    """A node on a permuted tensor: a Transpose (back), or ops that keep every position's own
    value (first-input and elementwise ops, all their image inputs in the same layout)."""
    image_inputs = [v for v in inputs if v is not None]
    data = inputs[0] if isinstance(inputs[0], _Moved) else None
    op = node.op_type
    if op == "Transpose" and data is not None and len(image_inputs) == 1:
        rank = len(data.perm)
        perm = [int(p) for p in _attrs(node).get("perm", reversed(range(rank)))]
        composed = tuple(data.perm[p] for p in perm)
        if composed == tuple(range(rank)):
            return data.fields
        if composed[:2] == (0, 1):
            return tuple(data.fields[p - 2] for p in composed[2:])
        return _Moved(data.fields, composed)
    if op in FIRST_INPUT_OPS and data is not None and len(image_inputs) == 1:
        return data
    if op in ELEMENTWISE_OPS and all(isinstance(v, _Moved) for v in image_inputs):
        if len({v.perm for v in image_inputs}) == 1:
            try:
                union = _union([v.fields for v in image_inputs], where)
                return _Moved(union, image_inputs[0].perm)
            except ModelError as error:
                return _Unsupported(str(error))
    return _Unsupported(f"{where} on a tensor with permuted axes (after a Transpose) is not "
                        "supported")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _window(node: onnx.NodeProto, data: _Fields, constants: dict[str, np.ndarray]) -> _Fields:
    attrs = _attrs(node)
    n = len(data)
    where = f"{node.op_type} node {node.name!r}"
    kernel = list(attrs.get("kernel_shape", []))
    if not kernel and node.op_type == "Conv" and len(node.input) > 1:
        weight = constants.get(node.input[1])
        kernel = list(weight.shape[2:]) if weight is not None else []
    if len(kernel) != n:
        raise ModelError(f"{where}: kernel shape {kernel} unknown or not {n}-D")
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = list(attrs.get("pads", [0] * (2 * n)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    out = []
    for i, axis in enumerate(data):
        k, s, d = int(kernel[i]), int(strides[i]), int(dilations[i])
        k_eff = d * (k - 1) + 1
        extent = axis.extent
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if extent is None:
                raise ModelError(f"{where}: auto_pad {auto_pad} needs the input size")
            total = max((math.ceil(extent / s) - 1) * s + k_eff - extent, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            end = total - begin
        elif auto_pad == "VALID":
            begin = end = 0
        else:
            begin, end = int(pads[i]), int(pads[i + n])
        if extent is not None:
            span = extent + begin + end - k_eff
            extent = (-(-span // s) if ceil_mode else span // s) + 1
        f = axis.field
        field = Field(f.size + (k_eff - 1) * f.stride, f.stride * s, f.offset - begin * f.stride)
        out.append(_Axis(field, extent))
    return tuple(out)


def _global(
    data: _Fields, image: tuple[int | None, ...], axes: Sequence[int], where: str
) -> _Fields:
    out = list(data)
    for i in axes:
        if image[i] is None:
            raise ModelError(f"{where}: a global field needs the input size; pass input_size")
        out[i] = _Axis(Field(int(image[i]), 0, 0), 1)
    return tuple(out)


def _reduce(
    node: onnx.NodeProto,
    data: _Fields,
    constants: dict[str, np.ndarray],
    image: tuple[int | None, ...],
    where: str,
) -> _Fields | _Unsupported:
    attrs = _attrs(node)
    rank = 2 + len(data)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            return _Unsupported(f"{where}: its axes are not a constant")
        axes = constants[node.input[1]].reshape(-1).tolist()
    axes = list(range(rank)) if not axes else [(int(a) + rank) % rank for a in axes]
    spatial = [a - 2 for a in axes if a >= 2]
    if not spatial:
        return data
    if not int(attrs.get("keepdims", 1)):
        return _Unsupported(f"{where} drops spatial axes (keepdims=0)")
    return _global(data, image, spatial, where)


def _pad(
    node: onnx.NodeProto, data: _Fields, constants: dict[str, np.ndarray], where: str
) -> _Fields | _Unsupported:
    attrs = _attrs(node)
    if "pads" in attrs:
        pads = list(attrs["pads"])
    elif len(node.input) > 1 and node.input[1] in constants:
        pads = constants[node.input[1]].reshape(-1).tolist()
    else:
        return _Unsupported(f"{where}: its pads are not a constant")
    if len(node.input) > 3 and node.input[3]:
        return _Unsupported(f"{where}: padding selected axes is not supported")
    rank = len(pads) // 2
    if rank != 2 + len(data):
        return _Unsupported(f"{where}: {len(pads)} pads for a rank-{2 + len(data)} tensor")
    out = []
    for i, axis in enumerate(data):
        begin, end = int(pads[2 + i]), int(pads[rank + 2 + i])
        f = axis.field
        extent = None if axis.extent is None else axis.extent + begin + end
        out.append(_Axis(Field(f.size, f.stride, f.offset - begin * f.stride), extent))
    return tuple(out)


def _union(branches: list[_Fields], where: str) -> _Fields:
    """Per axis, the smallest field holding every branch's (broadcast operands left out)."""
    n = len(branches[0])
    if any(len(b) != n for b in branches):
        raise ModelError(f"{where}: inputs of different spatial rank")
    out = []
    for i in range(n):
        axes = [b[i] for b in branches]
        full = max((a.extent for a in axes if a.extent is not None), default=None)
        if full is not None and full > 1:  # a length-1 operand broadcasts: it is a gate
            axes = [a for a in axes if a.extent != 1] or axes
        strides = {a.field.stride for a in axes}
        if len(strides) > 1:
            raise ModelError(f"{where}: its inputs have different strides {sorted(strides)}")
        start = min(a.field.offset for a in axes)
        end = max(a.field.offset + a.field.size for a in axes)
        extents = [a.extent for a in axes]
        extent = None if None in extents else max(e for e in extents if e is not None)
        out.append(_Axis(Field(end - start, strides.pop(), start), extent))
    return tuple(out)
