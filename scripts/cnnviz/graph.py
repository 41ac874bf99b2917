"""Read-only questions about an ONNX classifier, and small edits that keep its values.

The layer table (`conv_layers`) names every convolution and the tensor to show for it: the
post-activation output where the conv (and an optional BatchNormalization) feeds one activation.
No torch here: this runs at run time.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .errors import ConfigError, ModelError

CONV_OPS = ("Conv", "ConvTranspose")
# Quantized convolutions (onnxruntime's QOperator format): the weight is input 3 (QLinearConv) or
# 1 (ConvInteger); the layer's picture is the output dequantized (`dequantized_views`).
QUANTIZED_CONV_OPS = {"QLinearConv": 3, "ConvInteger": 1}
# Ops of a quantized graph (integer tensors): no gradient through them.
QUANTIZED_OPS = (
    "QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "DynamicQuantizeLinear",
)  # fmt: skip
# Elementwise activations whose output is the layer's picture when a conv feeds only it.
ACTIVATIONS = (
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid",
    "Sigmoid", "Tanh", "Softplus", "Mish", "Gelu",
)  # fmt: skip
SWISH = "Swish"  # x * sigmoid(x), exported as a Sigmoid and a Mul
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_SMALL_INITIALIZER = 4096  # elements; larger weights are left out of shape inference
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def input_name(model: onnx.ModelProto) -> str:
    """The image input: the first graph input that is not an initializer."""
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in inits:
            return value.name
    raise ModelError(f"ONNX graph {model.graph.name!r} has no input (only initializers)")


def find_logits(model: onnx.ModelProto) -> str:
    """The logits tensor: the first graph output, or the input of a final (Log)Softmax."""
    out = model.graph.output[0].name
    producer = _producers(model).get(out)
    if producer is not None and producer.op_type in SOFTMAX_OPS:
        return producer.input[0]
    return out


def strip_softmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Make the logits the first graph output when it is a final Softmax; (model, stripped?)."""
    logits = find_logits(model)
    first = model.graph.output[0].name
    if logits == first:
        return model, False
    out = copy.deepcopy(model)
    graph = out.graph
    keep = [n for n in graph.node if first not in n.output]
    del graph.node[:]
    graph.node.extend(keep)
    typed = _value_infos(infer_shapes(weightless(out)))
    graph.output[0].CopyFrom(_typed_or_float(typed, logits))
    return out, True


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy with the leading dim of inputs and outputs fixed to `batch`, shapes inferred."""
    out = copy.deepcopy(model)
    _fix_dims(out, batch)
    inferred = infer_shapes(weightless(out))
    declared = {v.name for v in out.graph.input} | {v.name for v in out.graph.output}
    declared |= {t.name for t in out.graph.initializer}
    del out.graph.value_info[:]
    out.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in declared)
    return out


def _fix_dims(model: onnx.ModelProto, batch: int) -> None:
    """In place: leading dim of inputs and outputs := batch; stale inferred shapes dropped."""
    inits = {t.name for t in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in inits or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if len(shape.dim) >= 1:
            shape.dim[0].Clear()
            shape.dim[0].dim_value = batch
    del model.graph.value_info[:]


def move_initializers(tensors: list[onnx.TensorProto], graph: onnx.GraphProto) -> None:
    """Append `tensors` to the graph's initializers, emptying the list as it goes.

    protobuf copies each tensor in; dropping each one once copied keeps a graph builder from
    holding its weights twice (a model of a few GB: regnet_y_128gf's flipped and rule-modified
    weights)."""
    for i, tensor in enumerate(tensors):
        graph.initializer.append(tensor)
        tensors[i] = None
    tensors.clear()


def weightless(model: onnx.ModelProto, batch: int | None = None) -> onnx.ModelProto:
    """The model without its large weights (typed graph inputs instead): cheap to shape-infer.

    With `batch`, the leading dim of the real inputs and outputs is fixed to it.
    """
    graph = model.graph
    names = {v.name for v in graph.input}
    small = [t for t in graph.initializer if int(np.prod(t.dims)) <= _SMALL_INITIALIZER]
    big = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if int(np.prod(t.dims)) > _SMALL_INITIALIZER and t.name not in names
    ]
    skeleton = helper.make_graph(
        list(graph.node),
        graph.name,
        [*graph.input, *big],
        list(graph.output),
        initializer=small,
        value_info=list(graph.value_info),
    )
    out = helper.make_model(skeleton, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    if batch is not None:
        weights = {t.name for t in graph.initializer}
        for value in list(out.graph.input) + list(out.graph.output):
            dims = value.type.tensor_type.shape.dim
            if value.name not in weights and len(dims) >= 1:
                dims[0].Clear()
                dims[0].dim_value = batch
        del out.graph.value_info[:]
    return out


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation (Shape -> Gather -> Reshape chains)."""
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; shapes then stay unknown
        try:
            return shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001
            raise ModelError(
                f"ONNX shape inference failed on graph {model.graph.name!r}: {exc}"
            ) from exc


def expose(model: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    """A copy that also returns `tensor_names` (typed by shape inference) as graph outputs."""
    out = copy.deepcopy(model)
    typed = _value_infos(infer_shapes(weightless(out)))
    known = set(_producers(out)) | {v.name for v in out.graph.input}
    outputs = {v.name for v in out.graph.output}
    for name in tensor_names:
        if name in outputs:
            continue
        if name not in known:
            raise ConfigError(
                f"tensor {name!r} is not in ONNX graph {out.graph.name!r}; "
                "use a layer's tensor from model.json's layer table"
            )
        out.graph.output.append(_typed_or_float(typed, name))
        outputs.add(name)
    return out


def cut_at(model: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose only outputs are `tensor_names`: everything after them is dead
    (the gradient engine and ONNX Runtime drop it)."""
    out = expose(model, list(tensor_names))
    keep = [o for o in out.graph.output if o.name in set(tensor_names)]
    out.graph.ClearField("output")
    out.graph.output.extend(keep)
    return out


def conv_layers(model: onnx.ModelProto) -> list[dict]:
    """One row per Conv/ConvTranspose (or quantized conv) in topological order: the layer
    table of model.json."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
    graph_outputs = {v.name for v in graph.output}
    inits = {t.name: t for t in graph.initializer}
    rows: list[dict] = []
    for node in graph.node:
        if node.op_type not in CONV_OPS and node.op_type not in QUANTIZED_CONV_OPS:
            continue
        weight_at = QUANTIZED_CONV_OPS.get(node.op_type, 1)
        tensor, activation = _layer_output(node.output[0], consumers, graph_outputs)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", []))
        if not kernel and len(node.input) > weight_at and node.input[weight_at] in inits:
            kernel = list(inits[node.input[weight_at]].dims[2:])
        rows.append(
            {
                "name": _friendly_name(node, inits, weight_at),
                "tensor": tensor,
                "conv_node": node.name,
                "conv_output": node.output[0],
                "activation": activation,
                "shape": None,
                "kernel": [int(k) for k in kernel],
                "stride": [int(s) for s in attrs.get("strides", [1] * max(len(kernel), 1))],
                "groups": int(attrs.get("group", 1)),
                "depth": len(rows),
            }
        )
    _unique_names(rows)
    _fill_shapes(model, rows)
    return rows


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The integer (quantized) ops of the graph, by name, once each in order of appearance."""
    return list(dict.fromkeys(n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS))


def dequantized_views(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each QLinearConv's uint8/int8 output also feeds a DequantizeLinear (with the
    conv's own output scale and zero point): the float tensor the layer table shows. The
    graph's outputs are unchanged."""
    graph = model.graph
    if not any(n.op_type == "QLinearConv" for n in graph.node):
        return model
    out = copy.deepcopy(model)
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        if node.op_type == "QLinearConv" and len(node.input) >= 8:
            y = node.output[0]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [y, node.input[6], node.input[7]],
                    [f"{y}_float"],
                    name=f"{node.name or y}/cnnviz_dequantize",
                )
            )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def record_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose value_info gives every tensor's shape (batch dim symbolic): from shape
    inference, and for what inference cannot type (e.g. com.microsoft quantized ops) from one
    ONNX Runtime run at batch 1. Later steps then see static shapes everywhere."""
    typed = _value_infos(infer_shapes(weightless(model, batch=1)))
    produced = [name for node in model.graph.node for name in node.output if name]
    unknown = [n for n in produced if _static_shape(typed.get(n)) is None]
    if not unknown:
        return model
    arrays = dict(zip(unknown, _run_untyped(model, unknown), strict=True))
    out = copy.deepcopy(model)
    declared = {v.name for v in out.graph.output}
    for name, array in arrays.items():
        if name in declared:
            continue
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        shape = ["batch", *array.shape[1:]] if array.ndim else []
        info = helper.make_tensor_value_info(name, elem, shape)
        existing = [v for v in out.graph.value_info if v.name == name]
        for value in existing:
            out.graph.value_info.remove(value)
        out.graph.value_info.append(info)
    return out


# --------------------------------------------------------------------------- layer table parts


def _layer_output(
    conv_out: str, consumers: dict[str, list[onnx.NodeProto]], graph_outputs: set[str]
) -> tuple[str, str | None]:
    """(tensor to show, activation op) for a conv output, looking through one BatchNorm."""
    tensor = conv_out
    users = consumers.get(tensor, [])
    dequantize = [u for u in users if u.op_type == "DequantizeLinear" and u.input[0] == tensor]
    if dequantize:  # a quantized conv's output, as float (dequantized_views)
        tensor = dequantize[0].output[0]
        users = consumers.get(tensor, [])
    if tensor not in graph_outputs and len(users) == 1 and users[0].op_type == "BatchNormalization":
        tensor = users[0].output[0]
        users = consumers.get(tensor, [])
    if tensor in graph_outputs:
        return tensor, None
    if len(users) == 1 and users[0].op_type in ACTIVATIONS and users[0].input[0] == tensor:
        return users[0].output[0], users[0].op_type
    if len(users) == 2:
        ops = {u.op_type: u for u in users}
        sigmoid, mul = ops.get("Sigmoid"), ops.get("Mul")
        if (
            sigmoid is not None
            and mul is not None
            and set(mul.input) == {tensor, sigmoid.output[0]}
        ):
            if len(consumers.get(sigmoid.output[0], [])) == 1:
                return mul.output[0], SWISH
    return tensor, None


def _friendly_name(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], weight_at: int = 1
) -> str:
    """Module path from a TorchScript scope name or the weight's name; '' when neither helps."""
    path = ""
    if node.name.startswith("/"):
        path = _scope_path(node.name)
    if not path and len(node.input) > weight_at and node.input[weight_at] in inits:
        weight = node.input[weight_at]
        if not weight.startswith("onnx::"):
            path = re.sub(r"(_quantized)?$", "", re.sub(r"\.weight(_quantized)?$", "", weight))
    parts = [p.lstrip("_") for p in path.split(".")]
    return _UNSAFE.sub("_", ".".join(p for p in parts if p)).strip("._-")


def _scope_path(node_name: str) -> str:
    """'/features/features.1/conv/conv.0/conv.0.0/Conv' -> 'features.1.conv.0.0'.

    TorchScript writes each scope either relative to its parent ('conv') or with the parent's
    name as a prefix ('conv.0'); a prefixed component replaces its parent.
    """
    parts: list[str] = []
    for comp in node_name.strip("/").split("/")[:-1]:
        if parts and comp.startswith(parts[-1] + "."):
            parts[-1] = comp
        elif comp:
            parts.append(comp)
    return ".".join(parts)


def _unique_names(rows: list[dict]) -> None:
    used: set[str] = set()
    for i, row in enumerate(rows):
        base = row["name"] or f"conv{i}"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        row["name"] = name


def _fill_shapes(model: onnx.ModelProto, rows: list[dict]) -> None:
    """[C, H, W] of each row's tensor from shape inference at batch 1, else from one ORT run."""
    if not rows:
        return
    typed = _value_infos(infer_shapes(weightless(model, batch=1)))
    missing = []
    for row in rows:
        shape = _static_shape(typed.get(row["tensor"]))
        if shape is None:
            missing.append(row)
        else:
            row["shape"] = shape[1:]
    if missing:
        for row, array in zip(
            missing, _run_once(model, [r["tensor"] for r in missing]), strict=True
        ):
            row["shape"] = list(array.shape[1:])


def _run_once(model: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    from .runtime import make_session

    value = next(v for v in model.graph.input if v.name == input_name(model))
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
    if any(d <= 0 for d in dims):
        raise ModelError(
            f"cannot size the layers of graph {model.graph.name!r}: input shape {dims}"
        )
    session = make_session(fix_batch(expose(model, names), 1), device="cpu")
    return session.run(names, {value.name: np.zeros([1, *dims[1:]], dtype=np.float32)})


def _run_untyped(model: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    """`names` from one ONNX Runtime run at batch 1, declared as outputs without a type (ONNX
    Runtime finds it: an integer tensor must not be declared float)."""
    from .runtime import make_session

    trial = copy.deepcopy(model)
    declared = {v.name for v in trial.graph.output}
    trial.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in declared)
    del trial.graph.value_info[:]
    value = next(v for v in trial.graph.input if v.name == input_name(trial))
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
    session = make_session(trial, device="cpu")
    return session.run(names, {value.name: np.zeros([1, *dims[1:]], dtype=np.float32)})


def _static_shape(value: onnx.ValueInfoProto | None) -> list[int] | None:
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return [int(d.dim_value) for d in dims]


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    values = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for init in graph.initializer:
        if init.name not in values:
            values[init.name] = helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)
            )
    return values


def _typed_or_float(typed: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    """The inferred type of `name`, or float32 of unknown shape (ORT needs a type for outputs)."""
    if name in typed and typed[name].type.HasField("tensor_type"):
        return typed[name]
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output if name}


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer's values (e.g. a conv weight) as a numpy array."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise ModelError(f"ONNX graph {model.graph.name!r} has no initializer {name!r}")
