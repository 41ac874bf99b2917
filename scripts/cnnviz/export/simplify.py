"""Tidy an exported graph without changing its values (torch-free).

The TorchScript exporter leaves constant subgraphs behind, e.g. EfficientNet's static "same"
padding becomes ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chains feeding a Pad in front
of each strided conv. Folding them and merging zero Pads into the following Conv gives the same
shape of graph the dynamo exporter writes, and fewer ops for the gradient engine to know.
Node names of the convs are kept: the layer table derives its names from them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Ops never folded: random ones, and ops with subgraphs.
_KEEP = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
         "Bernoulli", "If", "Loop", "Scan"}  # fmt: skip
_MAX_FOLDED = 1 << 22  # elements; larger constants stay computed rather than stored


def simplify(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """Fold constants, then merge zero Pads into Convs; a new model unless `inplace`."""
    out = model if inplace else _copy(model)
    _fold_constants(out)
    _fuse_pad_conv(out)
    return out


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where nodes whose inputs are all constants are replaced by initializers."""
    out = _copy(model)
    _fold_constants(out)
    return out


def fuse_pad_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where a zero, constant-mode, spatial-only Pad read by one Conv joins its pads."""
    out = _copy(model)
    _fuse_pad_conv(out)
    return out


def _fold_constants(model: onnx.ModelProto) -> None:
    graph = model.graph
    opset = _default_opset(model)
    overridable = {v.name for v in graph.input}
    consts = _Constants({t.name: t for t in graph.initializer if t.name not in overridable})
    kept: list[onnx.NodeProto] = []
    folded: dict[str, np.ndarray] = {}
    for node in graph.node:
        value = _try_fold(node, consts, opset)
        if value is None:
            kept.append(node)
        else:
            consts.values.update(value)
            folded.update(value)
    if not folded:
        return
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph, keep=overridable)
    used = _used_names(graph)
    graph.initializer.extend(
        numpy_helper.from_array(a, name) for name, a in folded.items() if name in used
    )
    live = {name for node in kept for name in node.output}
    keep_info = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)


class _Constants:
    """Initializers converted to numpy only when a foldable node reads them."""

    def __init__(self, protos: dict[str, onnx.TensorProto]) -> None:
        self.protos = protos
        self.values: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values or name in self.protos

    def size(self, name: str) -> int:
        if name in self.values:
            return int(self.values[name].size)
        return int(np.prod(self.protos[name].dims))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.values:
            self.values[name] = numpy_helper.to_array(self.protos[name])
        return self.values[name]


def _try_fold(node: onnx.NodeProto, consts: _Constants, opset: int) -> dict[str, np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in _KEEP:
        return None
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        return None
    inputs = [name for name in node.input if name]
    if node.op_type != "Constant" and (not inputs or any(n not in consts for n in inputs)):
        return None
    if any(consts.size(n) > _MAX_FOLDED for n in inputs):
        return None
    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(
            None, {n: consts[n] for n in inputs}
        )
    except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run stays a node
        return None
    if any(np.asarray(r).size > _MAX_FOLDED for r in results):
        return None
    return {name: np.asarray(r) for name, r in zip(node.output, results, strict=True) if name}


def _fuse_pad_conv(model: onnx.ModelProto) -> None:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    dropped: set[str] = set()
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        readers = users.get(pad.output[0], [])
        if (
            len(readers) != 1
            or readers[0].op_type != "Conv"
            or readers[0].input[0] != pad.output[0]
        ):
            continue
        conv = readers[0]
        extra = _spatial_zero_pads(pad, inits)
        conv_attrs = {a.name: a for a in conv.attribute}
        auto_pad = conv_attrs.get("auto_pad")
        if extra is None or (auto_pad is not None and auto_pad.s not in (b"", b"NOTSET")):
            continue
        rank = len(extra) // 2
        old = list(conv_attrs["pads"].ints) if "pads" in conv_attrs else [0] * (2 * rank)
        merged = [a + b for a, b in zip(old, extra, strict=True)]
        if "pads" in conv_attrs:
            conv_attrs["pads"].CopyFrom(helper.make_attribute("pads", merged))
        else:
            conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        dropped.add(pad.name or pad.output[0])
    if not dropped:
        return
    kept = [
        n for n in graph.node if not (n.op_type == "Pad" and (n.name or n.output[0]) in dropped)
    ]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph, keep={v.name for v in graph.input})


def _spatial_zero_pads(pad: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """Pads of an NC... tensor as Conv's [x1_begin, x2_begin, ..., x1_end, ...], or None."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) < 2 or pad.input[1] not in inits:
        return None
    if len(pad.input) > 3 and pad.input[3]:
        return None  # explicit axes: keep it simple
    if len(pad.input) > 2 and pad.input[2]:
        if pad.input[2] not in inits or np.any(numpy_helper.to_array(inits[pad.input[2]]) != 0):
            return None
    pads = numpy_helper.to_array(inits[pad.input[1]]).astype(np.int64).tolist()
    rank = len(pads) // 2
    begins, ends = pads[:rank], pads[rank:]
    if rank < 3 or any(begins[:2]) or any(ends[:2]) or min(pads) < 0:
        return None
    return begins[2:] + ends[2:]


def _used_names(graph: onnx.GraphProto) -> set[str]:
    return {name for node in graph.node for name in node.input} | {v.name for v in graph.output}


def _drop_unused_initializers(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Delete in place (no copies of the large weights that stay)."""
    used = _used_names(graph) | keep
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 17
