"""A method's whole ONNX graph: its own pre- and post-processing around the model's graph.

DESIGN.md principle 2a: everything between the staged batch and the raw map (seeds, noise, path
points, occluded copies, CAM weighting, upsampling, normalisation) is part of the graph the
method runs, so it runs where the model runs. A `GraphBuilder` emits the method's own nodes and
inlines the model's (forward or vjp) graph under a prefix, wiring the model's inputs to tensors
the method computes; `MethodGraph` records the roles of the result's inputs and outputs for the
one runner (`cnnviz.runner.Runner`).

Shapes: a method graph runs `images` images per call, each with `points` points (noise samples,
path points, occluded copies, channels): the inlined model sees `images * points` rows. Inputs
are per image (leading axis `images`), per point (leading axis `points`) or fixed for the job.
Outputs are per image, per image and point (`per_point`: [images, points, ...]) or sums over the
points (`summed`), which the runner adds up when a job's points take several calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .autodiff.context import Emitter
from .autodiff.prepare import sort_topologically
from .graph import move_initializers

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
TINY = 1e-30  # guards a min-max span of 0 (whose numerator is then 0 too)


@dataclass
class MethodGraph:
    """An ONNX model plus the roles of its inputs and outputs (see the module docstring)."""

    model: onnx.ModelProto
    images: int
    points: int = 1
    image_inputs: tuple[str, ...] = ("images", "targets")
    point_inputs: tuple[str, ...] = ()
    fixed_inputs: tuple[str, ...] = ()
    summed: tuple[str, ...] = ()
    per_point: tuple[str, ...] = ()
    point_padding: dict[str, float] = field(default_factory=dict)  # pad value per point input
    metadata: dict[str, str] = field(default_factory=dict)  # the vjp's notes (seed, approximate)

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.model.graph.output]


class GraphBuilder(Emitter):
    """Emit a method's nodes, inline model graphs, and finish as a `MethodGraph`'s model."""

    def __init__(self, opset: int, scope: str = "m") -> None:
        super().__init__()
        self.scope = scope
        self.opset = opset
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.opsets: dict[str, int] = {"": opset}
        self.functions: list[onnx.FunctionProto] = []
        self.metadata: dict[str, str] = {}

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> GraphBuilder:
        """A builder at the model's opset (the method's nodes must keep the model's semantics)."""
        return cls(model_opset(model))

    # ---- inputs and outputs ------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, tensor: str, elem_type: int = FLOAT) -> str:
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"out/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, None))
        return name

    # ---- inlining a model's graph --------------------------------------------------------------
    def inline(self, model: onnx.ModelProto, feeds: dict[str, str], prefix: str,
               shared: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
        """Copy `model`'s nodes and initializers in, every name under `prefix/`, except its
        inputs named in `feeds`, which read the given tensors instead, and the initializers in
        `shared` (the source model's weights), which keep their names and are added once: two
        graphs of one model inlined side by side then share their weights, and ONNX Runtime
        computes their common forward once. Returns the new name of each of the model's outputs
        (and of any tensor: `rename(name)` is `prefix/name`)."""
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        missing = [i.name for i in graph.input if i.name not in inits and i.name not in feeds]
        if missing:
            raise ValueError(f"inlined graph {graph.name!r} needs inputs {missing}")

        inits_shared = {t.name for t in graph.initializer} & set(shared)

        def rename(name: str) -> str:
            if not name or name in inits_shared:
                return name
            return feeds.get(name, f"{prefix}/{name}")

        for k, node in enumerate(graph.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            # unnamed nodes (ONNX allows them) get their index: node names must be unique
            copy.name = f"{prefix}/{node.name or f'{node.op_type}_{k}'}"
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            self.nodes.append(copy)
        present = {t.name for t in self.initializers}
        for init in graph.initializer:
            if init.name in feeds or (init.name in inits_shared and init.name in present):
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = rename(init.name)
            self.initializers.append(copy)
        for op in model.opset_import:
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)
        self.functions.extend(model.functions)
        self.metadata.update({p.key: p.value for p in model.metadata_props})
        return {o.name: rename(o.name) for o in graph.output}

    # ---- opset-aware reductions --------------------------------------------------------------
    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: bool = False) -> str:
        """ReduceSum/Mean/Max/Min over `axes` (axes an input from opset 13 / 18 on)."""
        input_axes_from = 13 if op == "ReduceSum" else 18
        if self.opset >= input_axes_from:
            return self.op(op, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op, [x], axes=list(axes), keepdims=int(keepdims))

    def float_const(self, array: np.ndarray, hint: str = "c") -> str:
        return self.const(np.asarray(array, dtype=np.float32), hint)

    def f(self, value: float) -> str:
        """A float32 scalar constant."""
        return self.const(np.array(value, dtype=np.float32), "k")

    # ---- finishing -----------------------------------------------------------------------------
    def build(self, name: str) -> onnx.ModelProto:
        """The model; once only: the initializers move into it (`move_initializers`)."""
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs)
        move_initializers(self.initializers, graph)
        sort_topologically(graph)
        opsets = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        model.functions.extend({f.name: f for f in self.functions}.values())
        for key, value in self.metadata.items():
            model.metadata_props.add(key=key, value=value)
        return model


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


# ---- pieces several methods share ------------------------------------------------------------
def one_hot(b: GraphBuilder, targets: str, classes: int, seed_shape: Sequence[int]) -> str:
    """float [N, *seed_shape]: 1 at each row's target class (flat index over seed_shape)."""
    rows = b.op("Unsqueeze", [targets, b.ints([1])]) if b.opset >= 13 else b.op(
        "Unsqueeze", [targets], axes=[1]
    )
    hits = b.op("Equal", [rows, b.const(np.arange(classes, dtype=np.int64)[None], "classes")])
    return b.reshape(b.op("Cast", [hits], to=FLOAT), [-1, *seed_shape])


def repeat_rows(b: GraphBuilder, x: str, shape: Sequence[int], times: int) -> str:
    """[N, ...] -> [N * times, ...], each row repeated `times` times in place."""
    n, rest = shape[0], list(shape[1:])
    if times == 1:
        return x
    wide = b.op("Expand", [b.reshape(x, [n, 1, *rest]), b.ints([n, times, *rest])])
    return b.reshape(wide, [n * times, *rest])


def normalize(b: GraphBuilder, maps: str) -> str:
    """Min-max each map [N, h, w] to [0, 1]; a flat map becomes zeros."""
    low = b.reduce("ReduceMin", maps, [1, 2], keepdims=True)
    span = b.op("Sub", [b.reduce("ReduceMax", maps, [1, 2], keepdims=True), low])
    return b.op("Div", [b.op("Sub", [maps, low]), b.op("Max", [span, b.f(TINY)])])


def resize(b: GraphBuilder, maps: str, size_in: Sequence[int], size: Sequence[int],
           align_corners: bool = False) -> str:
    """Bilinear resize [N, h, w] -> [N, H, W] as two MatMuls with the interpolation matrices
    of `methods.cam.interpolation_matrix` (the same numbers the numpy path used)."""
    from .methods.cam import interpolation_matrix

    mh = interpolation_matrix(size[0], size_in[0], align_corners)
    mw = interpolation_matrix(size[1], size_in[1], align_corners)
    rows = b.op("MatMul", [b.float_const(mh, "rows"), maps])
    return b.op("MatMul", [rows, b.float_const(mw.T, "cols")])


def channel_max_abs(b: GraphBuilder, signed: str) -> str:
    """[N, C, H, W] -> [N, H, W]: max |value| over the channels (the saved map of input-space
    methods)."""
    return b.reduce("ReduceMax", b.op("Abs", [signed]), [1])


def seed_input(vjp_model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single `seed:` input of a vjp graph (a copy: a part of a protobuf message keeps the
    whole message, weights and all, in memory)."""
    seeds = [i for i in vjp_model.graph.input if i.name.startswith("seed:")]
    if len(seeds) != 1:
        raise ValueError(f"expected one seed input, got {[s.name for s in seeds]}")
    seed = onnx.ValueInfoProto()
    seed.CopyFrom(seeds[0])
    return seed


def static_dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)
