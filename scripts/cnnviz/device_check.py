"""Does every node of a graph run on the CUDA provider? (issue 14, item 3)

Two checks of one idea:

- `cuda_kernel_gaps(model)`, anywhere (no GPU needed): each node the CUDA execution provider of
  onnxruntime 1.31 has no kernel for, by op type, domain, the opset in force and the element
  types of its inputs and outputs where the kernel is type-restricted (Where on bool data, Pad on
  int64, Clip on int32, OneHot's type triples, ScatterND reductions other than add, MaxUnpool and
  Col2Im, which have none), and the nodes the provider refuses although it has a kernel
  (ConvTranspose with asymmetric pads or auto_pad SAME_*, Cast to string). The kernels are a
  table shipped with the package (`data/cuda_kernels_1_31.json`, written by
  scripts/tools/cuda_kernel_table.py from onnxruntime's docs/OperatorKernels.md). It also names
  nodes whose kernel reads an input from host memory (Reshape's shape, Slice's starts, Pad's
  pads, Clip's bounds, a reduction's axes, ...) when that input is computed in the graph from
  run-time data, which costs a device-to-host copy and a sync each run; such inputs are fine
  when they are constants (initializers, or folded by ONNX Runtime).
- `cuda_placement(session)`, on a real CUDA session: which provider ran each node, from ONNX
  Runtime's profile (Node events' `args.provider`, with their input/output types) and, where
  the session recorded it, `get_provider_graph_assignment_info()`. Nodes off the CUDA provider
  are split into those that touch floating-point data (a fallback that matters) and ORT's small
  host-side shape subgraphs on integers (acceptable); the Memcpy nodes ORT inserts are listed
  apart. `placement_session(model)` builds such a session, `check_on_cuda(model)` runs both
  checks and returns the problems, one line each.

`GRAPHS` names the graphs cnnviz runs for a model (input gradients and graphs cut at a layer
under each backward policy, and every whole-method graph whose builder exists); `build_graph`
builds one. Add a method's graph there and the tests (tests/test_device_check.py) and the
command below check it.

On a GPU machine::

    from cnnviz.device_check import placement_session, run_once, cuda_placement
    session = placement_session(model_or_path)          # device cuda, profiling on
    run_once(session)                                     # or session.run(...) with real feeds
    report = cuda_placement(session)                      # ends the profile
    report["float_off_cuda"], report["memcpy"], report["providers"]

or for every graph of an exported model (a folder with model.json, or an .onnx file)::

    python -m cnnviz.device_check results/models/efficientnet-lite0 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

CUDA_EP = "CUDAExecutionProvider"
TABLE = "cuda_kernels_1_31.json"
ONNX_DOMAINS = ("", "ai.onnx")
FLOATS = {"float", "float16", "double", "bfloat16"}
# Inputs a CUDA kernel declares as host memory (OrtMemTypeCPUInput), by op: position -> name.
HOST_INPUTS: dict[str, dict[int, str]] = {
    "Reshape": {1: "shape"},
    "Expand": {1: "shape"},
    "Tile": {1: "repeats"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Pad": {1: "pads", 2: "constant_value", 3: "axes"},
    "Clip": {1: "min", 2: "max"},
    "Resize": {1: "roi", 2: "scales", 3: "sizes"},
    "Upsample": {1: "scales"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Split": {1: "split"},
    "TopK": {1: "K"},
    "ConstantOfShape": {0: "input"},
    "OneHot": {1: "depth", 2: "values"},
    "Range": {0: "start", 1: "limit", 2: "delta"},
    "CumSum": {1: "axis"},
    "Dropout": {1: "ratio", 2: "training_mode"},
    **{op: {1: "axes"} for op in (
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}
# OneHot's CUDA kernels are registered per (indices, values/output, depth) triple.
ONEHOT_TRIPLES = {("int64", v, "int64") for v in ("float", "float16", "int64")} | {
    ("int32", v, "int32") for v in ("float", "float16")}
# Attribute values a CUDA kernel rejects at run time (op -> attribute -> allowed values).
ATTRIBUTE_LIMITS = {"ScatterND": {"reduction": {"none", "add"}}}
# Never a kernel: ONNX Runtime turns these into initializers when it loads the graph.
FOLDED = {"Constant"}
RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


@functools.lru_cache(maxsize=1)
def kernel_table() -> dict[str, Any]:
    """The shipped table: {"kernels": {domain: {op: [{since, until, types}]}}, "source": ...}."""
    text = resources.files("cnnviz").joinpath("data", TABLE).read_text(encoding="utf-8")
    return json.loads(text)


# ---- the static check ----------------------------------------------------------------------------
def cuda_kernel_gaps(model: onnx.ModelProto) -> list[str]:
    """One line per node the CUDA provider cannot run on the device, [] when every node can.

    A line names the node, its op type and domain, the opset in force, and (for type-restricted
    kernels) the offending constraint with the node's element type and what the kernel takes.
    """
    table = kernel_table()
    kernels = table["kernels"]
    names_only = {d: set(ops) for d, ops in table.get("names_only", {}).items()}
    opsets = {("ai.onnx" if o.domain in ONNX_DOMAINS else o.domain): o.version
              for o in model.opset_import}
    types = element_types(model)
    constant = constant_tensors(model)
    gaps: list[str] = []
    for node in model.graph.node:
        if node.op_type in FOLDED:
            continue
        domain = "ai.onnx" if node.domain in ONNX_DOMAINS else node.domain
        opset = opsets.get(domain)
        where = f"{node.op_type} {node.name or '(unnamed)'} [{domain} opset {opset}]"
        rows = kernels.get(domain, {}).get(node.op_type)
        if rows is None:
            if node.op_type not in names_only.get(domain, set()):
                gaps.append(f"{where}: no CUDA kernel")
            continue
        row = _row_for(rows, opset)
        if row is None:
            spans = ", ".join(_span(r) for r in rows)
            gaps.append(f"{where}: no CUDA kernel for this opset (kernels for {spans})")
            continue
        gaps += [f"{where}: {why}" for why in _type_problems(node, domain, opset, row, types)]
        gaps += [f"{where}: {why}" for why in _attribute_problems(node)]
        gaps += [f"{where}: {why}" for why in _capability_problems(node)]
        for position, name in HOST_INPUTS.get(node.op_type, {}).items():
            tensor = node.input[position] if position < len(node.input) else ""
            if tensor and tensor not in constant:
                gaps.append(
                    f"{where}: its {name} input {tensor!r} is read from host memory and is "
                    "computed in the graph (a device-to-host copy and sync each run; make it "
                    "a constant)"
                )
    return gaps


def _row_for(rows: list[dict], opset: int | None) -> dict | None:
    if opset is None:
        return None
    for row in rows:
        until = row["until"] if row["until"] is not None else 1 << 30
        if row["since"] <= opset <= until:
            return row
    return None


def _span(row: dict) -> str:
    return f"{row['since']}+" if row["until"] is None else f"{row['since']}-{row['until']}"


def _type_problems(node, domain: str, opset: int, row: dict, types: dict[str, str]) -> list[str]:
    allowed = row["types"]
    if not allowed:
        return []
    bound = _bind_constraints(node, domain, opset, types)
    problems = []
    for constraint, elems in bound.items():
        if constraint not in allowed:
            continue
        for elem in sorted(elems - set(allowed[constraint])):
            problems.append(
                f"{constraint} = {elem} has no CUDA kernel (takes {', '.join(allowed[constraint])})"
            )
    if node.op_type == "OneHot" and len(node.input) == 3:
        triple = tuple(types.get(n) for n in (node.input[0], node.input[2], node.input[1]))
        if None not in triple and triple not in ONEHOT_TRIPLES:
            problems.append(
                f"(indices, values, depth) = {triple} is not one of the CUDA kernel's triples "
                f"{sorted(ONEHOT_TRIPLES)}"
            )
    return problems


def _bind_constraints(node, domain: str, opset: int, types: dict[str, str]) -> dict[str, set[str]]:
    """{constraint or formal parameter name: element types of the node's tensors bound to it}."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "" if domain == "ai.onnx" else domain)
    except onnx.defs.SchemaError:
        return {}
    bound: dict[str, set[str]] = {}
    for formals, actual in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, tensor in enumerate(actual):
            if not tensor or not formals or tensor not in types:
                continue
            formal = formals[min(i, len(formals) - 1)]
            variadic = formal.option == onnx.defs.OpSchema.FormalParameterOption.Variadic
            if i >= len(formals) and not variadic:
                continue
            for key in {formal.type_str, formal.name}:
                bound.setdefault(key, set()).add(types[tensor])
    return bound


def _attribute_problems(node) -> list[str]:
    problems = []
    for name, values in ATTRIBUTE_LIMITS.get(node.op_type, {}).items():
        for attr in node.attribute:
            if attr.name == name:
                value = helper.get_attribute_value(attr)
                value = value.decode() if isinstance(value, bytes) else value
                if value not in values:
                    problems.append(f"{name}={value!r} is not supported by the CUDA kernel "
                                    f"({', '.join(sorted(values))} are)")
    return problems


def _capability_problems(node) -> list[str]:
    """Nodes the CUDA provider has a kernel for but refuses in GetCapability (onnxruntime's
    cuda_execution_provider.cc: ConvTransposeNeedFallbackToCPU, CastNeedFallbackToCPU), which
    ORT then runs on the CPU provider with copies around them."""
    a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "ConvTranspose":
        pads = list(a.get("pads", []))
        rank = len(pads) // 2
        if any(pads[i] != pads[i + rank] for i in range(rank)):
            return [f"asymmetric pads {pads}: the CUDA provider drops ConvTranspose to the CPU "
                    "(cuDNN takes symmetric padding only; pad the input or crop the output "
                    "instead)"]
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            return [f"auto_pad={auto}: the CUDA provider drops ConvTranspose to the CPU (the "
                    "padding may be asymmetric); give explicit symmetric pads"]
    if node.op_type == "Cast" and a.get("to") == TensorProto.STRING:
        return ["Cast to string: the CUDA provider drops it to the CPU"]
    return []


def element_types(model: onnx.ModelProto) -> dict[str, str]:
    """Element type name ("float", "int64", "bool", ...) of every tensor shape inference types."""
    from .graph import weightless  # weights left out: a model past 2 GiB cannot be serialized

    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=False)
    except Exception:  # noqa: BLE001 - a graph inference cannot type still has its own annotations
        inferred = model
    graph = inferred.graph
    out: dict[str, str] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            out[value.name] = _type_name(elem)
    for init in graph.initializer:
        out[init.name] = _type_name(init.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = _type_name(attr.t.data_type)
    return out


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower()


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors ONNX Runtime knows before a run: initializers, Constant outputs, the outputs of
    deterministic nodes on constants only (constant folding), and Shape/Size of statically
    shaped tensors."""
    graph = model.graph
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    static = _static_shapes(model)
    for node in graph.node:
        if node.op_type == "Constant":
            constant.update(node.output)
        elif node.op_type in ("Shape", "Size") and node.input and node.input[0] in static:
            constant.update(node.output)
        elif node.op_type not in RANDOM and all(n in constant for n in node.input if n):
            constant.update(node.output)
    return constant


def _static_shapes(model: onnx.ModelProto) -> set[str]:
    from .graph import weightless

    try:
        graph = onnx.shape_inference.infer_shapes(weightless(model)).graph
    except Exception:  # noqa: BLE001
        graph = model.graph
    out = set()
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out.add(value.name)
    return out


# ---- the run-time check --------------------------------------------------------------------------
def placement_session(model: onnx.ModelProto | str | os.PathLike[str] | bytes, device: str = "cuda",
                      threads: int | None = None, profile_dir: str | None = None):
    """A session like `runtime.make_session`'s, with the profiler and ORT's record of node
    assignment on, for `cuda_placement`. device "cuda" raises DeviceError where CUDA is unusable."""
    from .runtime import open_session, providers_for, session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(profile_dir or tempfile.mkdtemp(), "placement")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return open_session(model, options, providers_for(device))


def sample_feeds(session, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of the session's input shapes (symbolic dims as 1): small normal floats, zero
    integers (a valid class index or position), False booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
        kind = value.type[len("tensor("):-1]
        if kind in FLOATS:
            dtype = {"float": np.float32, "float16": np.float16, "double": np.float64}.get(
                kind, np.float32)
            feeds[value.name] = rng.standard_normal(shape).astype(dtype) * 0.1
        elif kind == "bool":
            feeds[value.name] = np.zeros(shape, bool)
        else:
            feeds[value.name] = np.zeros(shape, np.dtype(helper.tensor_dtype_to_np_dtype(
                getattr(TensorProto, kind.upper()))))
    return feeds


def run_once(session, feeds: dict[str, np.ndarray] | None = None) -> list:
    return session.run(None, feeds if feeds is not None else sample_feeds(session))


def cuda_placement(session, profile: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Where each node of a profiled session ran (run it at least once first).

    Ends the session's profiling unless `profile` (a profile JSON file) is given. Returns
      providers:      {provider: number of nodes} from the profile
      nodes:          [{node, op, provider, inputs, outputs}] one per profiled node (first run)
      off_cuda:       nodes not on CUDAExecutionProvider, Memcpy nodes excepted
      float_off_cuda: those of them with a floating-point input or output (the fallbacks that
                      matter; the rest are ORT's host-side shape subgraphs on integers)
      memcpy:         the MemcpyToHost/MemcpyFromHost nodes ORT inserted
      float_memcpy:   those of them that copy floating-point data
      assignment:     {provider: [(node, op)]} from get_provider_graph_assignment_info()
                      where the session recorded it (the graph as partitioned), else {}
    """
    path = str(profile) if profile is not None else session.end_profiling()
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    nodes, seen = [], set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        name = e["name"][: -len("_kernel_time")]
        if name in seen:
            continue
        seen.add(name)
        nodes.append({
            "node": name,
            "op": args.get("op_name", "?"),
            "provider": args.get("provider", "?"),
            "inputs": _profile_types(args.get("input_type_shape", [])),
            "outputs": _profile_types(args.get("output_type_shape", [])),
        })
    providers = Counter(n["provider"] for n in nodes)
    memcpy = [n for n in nodes if n["op"].startswith("Memcpy")]
    off = [n for n in nodes if n["provider"] != CUDA_EP and not n["op"].startswith("Memcpy")]

    def floating(n: dict) -> bool:  # no types recorded: assume the worst
        kinds = set(n["inputs"] + n["outputs"])
        return not kinds or bool(FLOATS & kinds)

    return {
        "profile": path,
        "providers": dict(providers),
        "nodes": nodes,
        "off_cuda": off,
        "float_off_cuda": [n for n in off if floating(n)],
        "memcpy": memcpy,
        "float_memcpy": [n for n in memcpy if floating(n)],
        "assignment": assignment_info(session),
    }


def _profile_types(entries: list) -> list[str]:
    return [kind for entry in entries if isinstance(entry, dict) for kind in entry]


def assignment_info(session) -> dict[str, list[tuple[str, str]]]:
    """{provider: [(node, op type)]} as ORT partitioned the graph (needs the session option
    session.record_ep_graph_assignment_info=1, as `placement_session` sets), else {}."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001 - not recorded, or an older onnxruntime
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for sub in subgraphs:
        out.setdefault(sub.ep_name, []).extend((n.name, n.op_type) for n in sub.get_nodes())
    return out


def placement_problems(report: dict[str, Any]) -> list[str]:
    """One line per float-compute node off CUDA and per copy of float data, from a report."""
    lines = [f"{n['op']} {n['node']} ran on {n['provider']} (inputs {n['inputs']}, outputs "
             f"{n['outputs']})" for n in report["float_off_cuda"]]
    lines += [f"{n['op']} {n['node']} copies float data between host and device (inputs "
              f"{n['inputs']})" for n in report["float_memcpy"]]
    if CUDA_EP not in report["providers"]:
        lines.append(f"no node ran on {CUDA_EP}: providers {report['providers']}")
    return lines


def check_on_cuda(model: onnx.ModelProto, run: bool | None = None,
                  feeds: dict[str, np.ndarray] | None = None) -> list[str]:
    """Every problem that keeps `model` off the device: the static kernel gaps, and (with `run`,
    by default wherever CUDA is usable) the float nodes and copies a real CUDA run placed on the
    host. [] means every node ran on CUDAExecutionProvider."""
    problems = cuda_kernel_gaps(model)
    if run is None:
        from .runtime import cuda_usable

        run = cuda_usable()
    if run:
        with tempfile.TemporaryDirectory() as tmp:
            session = placement_session(model, "cuda", profile_dir=tmp)
            run_once(session, feeds)
            problems += placement_problems(cuda_placement(session))
    return problems


# ---- the graphs cnnviz runs for a model ----------------------------------------------------------
POLICIES = ("gradient", "guided", "deconvnet")
Builder = Callable[[onnx.ModelProto, dict, int], "onnx.ModelProto | None"]


def _input_gradient(policy: str) -> Builder:
    def build(model: onnx.ModelProto, card: dict, batch: int) -> onnx.ModelProto:
        from .methods.backprop import gradient_model

        return gradient_model(model, policy, batch)
    return build


def _cut(policy: str) -> Builder:
    def build(model: onnx.ModelProto, card: dict, batch: int) -> onnx.ModelProto:
        from .autodiff import vjp
        from .methods.cam import build_cam_model, layer_tensor

        if policy == "gradient":  # exactly the Grad-CAM graph
            return build_cam_model(model, card, None, batch)[0]
        return vjp(model, wrt=[layer_tensor(card, None)], policy=policy, batch=batch)
    return build


CARD, BATCH = "<card>", "<batch>"  # stand for the model's card / the batch in _method's arguments


def _method(module: str, function: str, *args, **kwargs) -> Builder:
    """A whole-method graph builder `cnnviz.methods.<module>.<function>` (None where it does not
    exist), called with the model and `args` (CARD and BATCH filled in)."""
    def build(model: onnx.ModelProto, card: dict, batch: int) -> onnx.ModelProto | None:
        builder = getattr(importlib.import_module(f"cnnviz.methods.{module}"), function, None)
        if builder is None:
            return None
        fill = {CARD: card, BATCH: batch}
        graph = builder(model, *[fill.get(a, a) if isinstance(a, str) else a for a in args],
                        **kwargs)
        return getattr(graph, "model", graph)
    return build


def _filters(mode: str, which: str) -> Builder:
    """Filter visualization's step graph (`which` = "step") or evaluation graph ("eval") at the
    last conv layer, as `methods.objective_job.ObjectiveJob` builds them for filters."""
    def build(model: onnx.ModelProto, card: dict, batch: int) -> onnx.ModelProto | None:
        jobs = importlib.import_module("cnnviz.methods.objective_job")
        from .methods.cam import layer_tensor
        from .methods.objectives import channel
        from .methods.optvis import Normalization

        norm = Normalization.from_preprocess(card.get("preprocess", {}))
        job = jobs.ObjectiveJob(model, [channel(layer_tensor(card, None), 0)], batch,
                                mode=mode, steps=4, lr=0.05, norm=norm, device="cpu",
                                threads=1)
        return job.spec.model if which == "step" else job.eval_graph
    return build


GRAPHS: dict[str, Builder] = {
    **{f"input/{p}": _input_gradient(p) for p in POLICIES},
    **{f"cut/{p}": _cut(p) for p in POLICIES},
    **{f"gradient_graph/{p}": _method("backprop", "gradient_graph", p, BATCH) for p in POLICIES},
    "smoothgrad_graph": _method("backprop", "smoothgrad_graph", BATCH, 3, 0.15),
    "integrated_gradients_graph": _method("backprop", "integrated_gradients_graph", BATCH, 3),
    "cam_graph": _method("cam", "cam_graph", CARD, None, BATCH, guided=True),
    "occlusion_graph": _method("occlusion", "occlusion_graph", CARD, BATCH, 4, 8),
    "filters/lucent/step": _filters("lucent", "step"),
    "filters/seed/step": _filters("seed", "step"),
    "filters/lucent/eval": _filters("lucent", "eval"),
}


def build_graph(name: str, model: onnx.ModelProto, card: dict, batch: int = 2
                ) -> onnx.ModelProto | None:
    """The graph `name` of GRAPHS for `model` (None when its builder does not exist)."""
    return GRAPHS[name](model, card, batch)


def card_for(model: onnx.ModelProto, classes: int | None = None) -> dict:
    """The parts of a model card the graph builders read, for a bare ONNX model."""
    from .graph import conv_layers, find_logits

    logits = find_logits(model)
    if classes is None:
        out = next((o for o in model.graph.output if o.name == logits), model.graph.output[0])
        classes = out.type.tensor_type.shape.dim[-1].dim_value
    return {"name": model.graph.name, "layers": conv_layers(model),
            "output": {"name": logits, "kind": "logits", "num_classes": classes}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cnnviz.device_check",
        description="Check that every graph cnnviz runs for a model has a CUDA kernel for every "
        "node and, on CUDA, that no float node runs off the device.")
    p.add_argument("model", type=Path, help="a model folder (model.json) or an .onnx file")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="cuda/auto: also run each graph on CUDA and read its profile")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--graphs", nargs="*", default=sorted(GRAPHS), choices=sorted(GRAPHS))
    p.add_argument("--json", type=Path, help="write the per-graph reports here")
    args = p.parse_args(argv)
    if args.model.is_dir():
        from .modelcard import load_card, model_path

        card = load_card(args.model)
        model = onnx.load(str(model_path(args.model, card)))
    else:
        model = onnx.load(str(args.model))
        card = card_for(model)
    if args.device == "auto":
        from .runtime import cuda_usable

        run = cuda_usable()
    else:
        run = args.device == "cuda"
    reports, failed = {}, 0
    for name in args.graphs:
        graph = build_graph(name, model, card, args.batch)
        if graph is None:
            print(f"{name}: no builder here, skipped")
            continue
        report: dict[str, Any] = {"nodes": len(graph.graph.node), "gaps": cuda_kernel_gaps(graph)}
        if run:
            with tempfile.TemporaryDirectory() as tmp:
                session = placement_session(graph, "cuda", profile_dir=tmp)
                run_once(session)
                placed = cuda_placement(session)
            report.update({k: placed[k] for k in ("providers", "float_off_cuda", "off_cuda",
                                                   "memcpy", "float_memcpy")})
            report["problems"] = placement_problems(placed)
        problems = report["gaps"] + report.get("problems", [])
        failed += bool(problems)
        where = f", providers {report['providers']}" if run else ""
        print(f"{name}: {report['nodes']} nodes, {len(problems)} problems{where}")
        for line in problems:
            print(f"    {line}")
        reports[name] = report
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
