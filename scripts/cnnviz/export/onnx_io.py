"""The image input of an onnx: model, as converters make it (the output: outputs.py).

Every step after export feeds a model one kind of input: float32 [N, 3, H, W], channels in RGB
order, normalized on the host by `images.preprocess` -- so every map, gradient and projection is
in image coordinates. Converters write other inputs: tf2onnx and Keras exports take NHWC
(`[N, H, W, 3]`), Caffe conversions BGR, some graphs take raw uint8 pixels and Cast them to float
inside, some take float16, float64 or one grey channel (a float16 model is widened to float32
before the adapter is made: export/precision.py). Export reads the input (`read_input`: layout
detected from the shape, or `preprocess.layout`) and prepends a small adapter
(`adapt_input`) that turns cnnviz's input into the one the model was made for:

    x [N, 3, H, W] float32 RGB -> channel order (Split/Concat: BGR; Mul + ReduceSum: grey)
      -> Transpose to NHWC -> Cast to float64 -> the model's own input tensor

The adapter is made of ops the gradient engine has rules for, so gradients, occlusion and
projections all reach the image through it (its Transpose then cancels against the model's own
Transpose back to NCHW: export/transposes.py). A uint8 input has no gradient: its Cast to float is
cut off and the Cast's float output is fed (from the adapter) instead; the host's pixels are
then the raw 0..255 values (scale 1, mean 0, std 1), which are exact integers in float32, so the
model computes what it computes on uint8 pixels. The card records both inputs and the adapter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ..graph import input_name

LAYOUTS = ("NCHW", "NHWC")
CHANNELS = (1, 3)
# float input types fed through a Cast at the adapter's end (float16 only where the graph was
# not widened first: export and gradcheck widen it, export/precision.py); uint8 is cut at its Cast.
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.DOUBLE: "float64"}  # fmt: skip
PIXEL_TYPES = {TensorProto.UINT8: "uint8"}
# ITU-R 601-2 luma, Pillow's convert("L"): a grey model sees the weighted sum of R, G, B.
LUMA = (0.299, 0.587, 0.114)
ADAPTED_INPUT = "cnnviz_image"
RAW_PIXELS = {"scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


@dataclass
class InputSpec:
    """The model's own image input."""

    name: str
    dims: list[int | str]
    dtype: str  # float32 | float16 | float64 | uint8
    layout: str  # NCHW | NHWC
    channels: int  # 1 | 3
    elem_type: int = TensorProto.FLOAT
    casts: list[onnx.NodeProto] = field(default_factory=list)  # uint8: the Casts to cut

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return (2, 3) if self.layout == "NCHW" else (1, 2)

    @property
    def size(self) -> list[int | str]:
        """[H, W] as declared (ints, or symbols when dynamic)."""
        return [self.dims[a] for a in self.spatial_axes]

    def entry(self, channel_order: str) -> dict:
        """The card's record of the model's own input."""
        return {
            "name": self.name,
            "shape": list(self.dims),
            "dtype": self.dtype,
            "layout": self.layout,
            "channel_order": _order(self.channels, channel_order),
        }


def read_input(model: onnx.ModelProto, path: Path | str, layout: str | None = None) -> InputSpec:
    """The model's single image input: shape, layout (detected, or `layout` from
    preprocess.layout), channels and type; ModelError naming the way out otherwise."""
    name = input_name(model)
    inits = {t.name for t in model.graph.initializer}
    others = [v.name for v in model.graph.input if v.name not in inits and v.name != name]
    if others:
        raise ModelError(
            f"ONNX model {path}: it has {len(others) + 1} inputs ({name!r} and "
            f"{', '.join(map(repr, others))}); cnnviz feeds one image input. Export the model "
            "with the other inputs fixed (constants or initializers), or wrap it in one that is"
        )
    value = next(v for v in model.graph.input if v.name == name)
    tensor = value.type.tensor_type
    dims: list[int | str] = [
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
        for d in tensor.shape.dim
    ]
    head = f"ONNX model {path}: input {name!r} has shape {dims}"
    need = (
        "cnnviz needs one image input shaped [batch, 3, height, width] (NCHW) or "
        "[batch, height, width, 3] (NHWC), float or uint8, with 3 (or 1) channels"
    )
    elem = tensor.elem_type
    if elem not in FLOAT_TYPES and elem not in PIXEL_TYPES:
        type_name = TensorProto.DataType.Name(elem)
        raise ModelError(f"{head} and type {type_name}; {need}")
    if len(dims) != 4:
        raise ModelError(f"{head}, a rank other than 4; {need}")
    chosen = _layout(dims, layout, head, need)
    axis = 1 if chosen == "NCHW" else 3
    channels = dims[axis] if isinstance(dims[axis], int) else 3
    dims[axis] = channels
    spec = InputSpec(name, dims, FLOAT_TYPES.get(elem) or PIXEL_TYPES[elem], chosen, channels,
                     elem)  # fmt: skip
    if elem in PIXEL_TYPES:
        spec.casts = _pixel_casts(model, name, head)
    return spec


def _layout(dims: list[int | str], layout: str | None, head: str, need: str) -> str:
    first, last = dims[1] in CHANNELS, dims[3] in CHANNELS
    if layout is not None:
        layout = str(layout).upper()
        if layout not in LAYOUTS:
            raise ModelError(f"{head}: preprocess.layout {layout!r} is not NCHW or NHWC")
        axis = 1 if layout == "NCHW" else 3
        if isinstance(dims[axis], int) and dims[axis] not in CHANNELS:
            raise ModelError(
                f"{head}: preprocess.layout {layout} puts the channels in dim {axis}, which "
                f"has {dims[axis]}; {need}"
            )
        return layout
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    if first and last:
        why = "both dim 1 and dim 3 could be the channels"
    elif not any(isinstance(d, int) for d in dims[1:]):
        why = "its dims are symbolic, so the channel axis cannot be told"
    else:
        why = "neither dim 1 nor dim 3 has 1 or 3 channels"
        if isinstance(dims[1], int) and isinstance(dims[3], int):
            raise ModelError(f"{head}: {why}; {need}")
    raise ModelError(
        f"{head}: {why}; set models.<name>.preprocess.layout to NCHW or NHWC in the config"
    )


def _pixel_casts(model: onnx.ModelProto, name: str, head: str) -> list[onnx.NodeProto]:
    """The Casts to a float type that read a uint8 input: the adapter feeds their outputs."""
    readers = [n for n in model.graph.node if name in n.input]
    casts = [n for n in readers if n.op_type == "Cast" and _cast_to(n) in FLOAT_TYPES]
    others = [n for n in readers if n not in casts]
    if others or not casts:
        what = ", ".join(f"{n.op_type} {n.name!r}" for n in others) or "nothing"
        raise ModelError(
            f"{head} of type uint8, read by {what}: cnnviz feeds the float tensor after the "
            "graph's Cast from uint8 (there is no gradient through integer pixels), so every "
            "reader of the input must be a Cast to float. Export the model with a float input, "
            "or with the Cast as the input's only reader"
        )
    if len({_cast_to(n) for n in casts}) > 1:
        raise ModelError(f"{head}: its Casts go to different float types; export one Cast")
    return casts


def _cast_to(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "to"), 0)


def _order(channels: int, channel_order: str) -> str:
    return "grey" if channels == 1 else str(channel_order).upper()


def is_canonical(spec: InputSpec, channel_order: str) -> bool:
    """True when the model already takes cnnviz's input (no adapter)."""
    return (spec.layout, spec.channels, spec.dtype, _order(spec.channels, channel_order)) == (
        "NCHW",
        3,
        "float32",
        "RGB",
    )


def fix_image_size(model: onnx.ModelProto, spec: InputSpec, size: list[int]) -> onnx.ModelProto:
    """Pin a dynamic height/width of the model's input to `size` (preprocess.size)."""
    if all(isinstance(v, int) for v in spec.size):
        return model
    out = copy.deepcopy(model)
    value = next(v for v in out.graph.input if v.name == spec.name)
    for axis, length in zip(spec.spatial_axes, size, strict=True):
        dim = value.type.tensor_type.shape.dim[axis]
        if not dim.HasField("dim_value"):
            dim.Clear()
            dim.dim_value = int(length)
        spec.dims[axis] = int(length)
    del out.graph.value_info[:]  # intermediate shapes recorded with the symbols are stale
    return out


def adapt_input(
    model: onnx.ModelProto, spec: InputSpec, channel_order: str
) -> tuple[onnx.ModelProto, list[str]]:
    """(model taking float32 [N, 3, H, W] RGB, the adapter's steps in words); the model itself
    when it already takes that input."""
    if is_canonical(spec, channel_order):
        return model, []
    out = copy.deepcopy(model)
    graph = out.graph
    opset = next((int(o.version) for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    used = {n for node in graph.node for n in [*node.input, *node.output]}
    used |= {v.name for v in [*graph.input, *graph.output]} | {t.name for t in graph.initializer}
    fresh = FreshNames(used)
    steps: list[str] = []
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    if spec.casts:
        cast_outputs = {n.output[0] for n in spec.casts}
        kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in cast_outputs)]
        del graph.node[:]
        graph.node.extend(kept)
        targets = [n.output[0] for n in spec.casts]
        target_type = _cast_to(spec.casts[0])
        steps.append(
            f"uint8 input: its Cast to {FLOAT_TYPES[target_type]} is cut off, the float "
            f"tensor {targets[0]!r} is fed (raw 0..255 pixels)"
        )
    else:
        targets, target_type = [spec.name], spec.elem_type
    order = _order(spec.channels, channel_order)
    as_is = (spec.layout, spec.channels, order, target_type) == (
        "NCHW",
        3,
        "RGB",
        TensorProto.FLOAT,
    )
    # With no op to prepend, the float tensor after a uint8 input's Cast is the input itself.
    new_input = targets[0] if as_is and len(targets) == 1 else fresh(ADAPTED_INPUT)
    cur = new_input
    if spec.channels == 1:
        w = numpy_helper.from_array(np.asarray(LUMA, np.float32).reshape(1, 3, 1, 1), fresh("luma"))
        inits.append(w)
        weighted = fresh("cnnviz_luma_weighted")
        nodes.append(helper.make_node("Mul", [cur, w.name], [weighted], name=weighted))
        grey = fresh("cnnviz_grey")
        if opset >= 13:
            axes = numpy_helper.from_array(np.asarray([1], np.int64), fresh("grey_axes"))
            inits.append(axes)
            nodes.append(
                helper.make_node("ReduceSum", [weighted, axes.name], [grey], keepdims=1, name=grey)
            )
        else:
            nodes.append(
                helper.make_node("ReduceSum", [weighted], [grey], axes=[1], keepdims=1, name=grey)
            )
        cur = grey
        steps.append("RGB to grey ({} R + {} G + {} B, Pillow's luma)".format(*LUMA))
    elif order == "BGR":
        parts = [fresh(f"cnnviz_{c}") for c in "RGB"]
        split_args: dict = {"axis": 1}
        split_inputs = [cur]
        if opset >= 13:
            sizes = numpy_helper.from_array(np.ones(3, np.int64), fresh("split_sizes"))
            inits.append(sizes)
            split_inputs.append(sizes.name)
        else:
            split_args["split"] = [1, 1, 1]
        nodes.append(helper.make_node("Split", split_inputs, parts, name=fresh("cnnviz_split"),
                                      **split_args))  # fmt: skip
        bgr = fresh("cnnviz_bgr")
        nodes.append(helper.make_node("Concat", parts[::-1], [bgr], axis=1, name=bgr))
        cur = bgr
        steps.append("RGB to BGR (channels reversed)")
    if spec.layout == "NHWC":
        nhwc = fresh("cnnviz_nhwc")
        nodes.append(helper.make_node("Transpose", [cur], [nhwc], perm=[0, 2, 3, 1], name=nhwc))
        cur = nhwc
        steps.append("NCHW to NHWC (Transpose)")
    if target_type != TensorProto.FLOAT:
        cast = fresh("cnnviz_cast")
        nodes.append(helper.make_node("Cast", [cur], [cast], to=target_type, name=cast))
        cur = cast
        steps.append(f"float32 to {FLOAT_TYPES[target_type]} (Cast)")
    if nodes and len(targets) == 1:
        nodes[-1].output[0] = targets[0]  # the adapter's last node writes the model's tensor
    elif targets != [cur]:
        feeds = [
            helper.make_node("Identity", [cur], [t], name=fresh("cnnviz_feed")) for t in targets
        ]
        nodes += feeds
    batch = next(v for v in graph.input if v.name == spec.name).type.tensor_type.shape.dim[0]
    x = helper.make_tensor_value_info(new_input, TensorProto.FLOAT, [None, 3, *spec.size])
    x.type.tensor_type.shape.dim[0].CopyFrom(batch)
    kept_inputs = [v for v in graph.input if v.name != spec.name]
    del graph.input[:]
    graph.input.extend([x, *kept_inputs])
    nodes_after = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *nodes_after])
    graph.initializer.extend(inits)
    del graph.value_info[:]  # shapes are recorded again after export
    return out, steps


class FreshNames:
    """Names not yet used in the graph."""

    def __init__(self, used: set[str]) -> None:
        self.used = used

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def to_model_input(batch: np.ndarray, spec: InputSpec, channel_order: str) -> np.ndarray:
    """numpy's statement of the adapter: cnnviz's [N, 3, H, W] RGB batch as the model's own
    input (to check the adapted graph against the model as given)."""
    x = batch.astype(np.float64)
    if spec.channels == 1:
        x = np.tensordot(np.asarray(LUMA), x, axes=([0], [1]))[:, None]
    elif _order(3, channel_order) == "BGR":
        x = x[:, ::-1]
    if spec.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    if spec.dtype == "uint8":
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.astype(spec.dtype))


def unpin_reshapes(model: onnx.ModelProto, batch: int) -> onnx.ModelProto | None:
    """A copy where each Reshape to a constant shape that starts with `batch` copies its
    input's leading dim instead (0), or None when there is none. The caller checks that the
    graph still computes the same per image."""
    out = copy.deepcopy(model)
    graph = out.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    fresh = FreshNames(
        {n for node in graph.node for n in [*node.input, *node.output]} | set(consts)
    )
    changed = False
    for node in graph.node:
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        if node.op_type != "Reshape" or len(node.input) < 2 or allowzero or node.input[0] in consts:
            continue
        shape = consts.get(node.input[1])
        if shape is None or shape.ndim != 1 or len(shape) < 2 or int(shape[0]) != batch:
            continue
        unpinned = shape.astype(np.int64).copy()
        unpinned[0] = 0
        name = fresh(f"{node.input[1]}_batch_free")
        graph.initializer.append(numpy_helper.from_array(unpinned, name))
        node.input[1] = name
        changed = True
    return out if changed else None
