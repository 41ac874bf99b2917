"""Every node on the device (issue 14, item 3): the graphs the engine and the methods emit have a
CUDA kernel for every node (checked here, on any machine, against onnxruntime 1.31's CUDA kernel
table), and on a machine with CUDA no float-compute node runs outside CUDAExecutionProvider
(checked from the session's profile).

The graphs are cnnviz.device_check.GRAPHS (input gradients and graphs cut at a layer under each
policy, every whole-method graph whose builder exists): add a method's graph there. For any
other graph, call `assert_on_cuda(model)`: the static check always, the real CUDA run where CUDA
is usable.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from cluster.workflow_runs import tiny_classifier
from cnnviz.device_check import (
    GRAPHS,
    build_graph,
    card_for,
    check_on_cuda,
    cuda_kernel_gaps,
    cuda_placement,
    kernel_table,
    placement_problems,
    placement_session,
    run_once,
)
from cnnviz.runtime import cuda_usable
from onnx import TensorProto, helper
from onnx_build import finish_model

BATCH = 2
MODELS = ["vgg_like", "resnet_like", "tf_same_like"]
CUDA_REASON = ("CUDA is not usable here (cnnviz.runtime.cuda_usable() is False: no GPU or no "
               "CUDA libraries)")


# Gaps the engine emits today, reported to its owner (issue 14, item 3): the backward of a dense
# strided Conv with asymmetric ("TF same") pads, e.g. EfficientNet-Lite0's stem (3x3, stride 2,
# pads [0, 0, 1, 1]), is a ConvTranspose with the same asymmetric pads, which the CUDA provider
# runs on the CPU (with the copies around it). A test that meets only these xfails, naming them;
# any other problem fails it; once the engine is fixed, it passes.
KNOWN_GAPS = [re.compile(r"^ConvTranspose .*: asymmetric pads")]
KNOWN_CONSEQUENCES = [re.compile(r"^ConvTranspose .* ran on CPUExecutionProvider"),
                      re.compile(r"^Memcpy(ToHost|FromHost) .* copies float data")]


def _fail_on_new(problems: list[str], what: str) -> None:
    known = [p for p in problems if any(k.search(p) for k in KNOWN_GAPS)]
    if known:
        known += [p for p in problems if any(k.search(p) for k in KNOWN_CONSEQUENCES)]
    new = [p for p in problems if p not in known]
    assert new == [], f"{what}: {len(new)} problems:\n" + "\n".join(new)
    if problems:
        pytest.xfail("known CUDA gap, reported to the engine's owner: " + "; ".join(problems))


def assert_no_new_gaps(graph: onnx.ModelProto) -> None:
    """The static check: no node lacks a CUDA kernel (known gaps xfail)."""
    _fail_on_new(cuda_kernel_gaps(graph), graph.graph.name)


def assert_on_cuda(model: onnx.ModelProto, run: bool | None = None) -> None:
    """Fail with every node that keeps `model` off the device: a missing or type-restricted CUDA
    kernel, a host-memory input computed in the graph, and (where CUDA is usable, or `run`) a
    float node or float copy that a real CUDA run placed on the host (known gaps xfail)."""
    _fail_on_new(check_on_cuda(model, run=run), model.graph.name)


# ---- models --------------------------------------------------------------------------------------
def _weight(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def resnet_like(classes: int = 10, side: int = 32, stem_pads: tuple = (1, 1, 1, 1)
                ) -> onnx.ModelProto:
    """Stem Conv(s2)-BN-Relu-MaxPool(3x3 s2, overlapping) - a residual block (Conv-BN-Relu-
    Conv-BN, Add, Relu) - Conv(s2)-BN-Clip(0, 6) - AveragePool - GAP - Flatten - Gemm.
    `stem_pads` (0, 0, 1, 1): TensorFlow's "same" padding at stride 2, as EfficientNet's stem."""
    rng = np.random.default_rng(1)
    inits: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []

    def conv_bn(x: str, name: str, cin: int, cout: int, stride: int, pads=(1, 1, 1, 1)) -> str:
        inits[f"{name}.w"] = _weight(rng, cout, cin, 3, 3)
        inits[f"{name}.scale"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        inits[f"{name}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        inits[f"{name}.mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
        inits[f"{name}.var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.c"], name=f"/{name}/Conv",
                                      pads=list(pads), strides=[stride] * 2))
        nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{name}.c", f"{name}.scale", f"{name}.bias", f"{name}.mean", f"{name}.var"],
            [f"{name}.bn"], name=f"/{name}/BatchNormalization"))
        return f"{name}.bn"

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [name], name=f"/{name}/Relu"))
        return name

    x = relu(conv_bn("image", "stem", 3, 8, 2, stem_pads), "stem_relu")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="/pool/MaxPool",
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    y = relu(conv_bn("pool", "block1", 8, 8, 1), "block1_relu")
    y = conv_bn(y, "block2", 8, 8, 1)
    nodes.append(helper.make_node("Add", [y, "pool"], ["res"], name="/res/Add"))
    x = relu("res", "res_relu")
    x = conv_bn(x, "down", 8, 16, 2)
    inits["lo"], inits["hi"] = np.array(0, np.float32), np.array(6, np.float32)
    nodes.append(helper.make_node("Clip", [x, "lo", "hi"], ["r6"], name="/down/Clip"))
    nodes.append(helper.make_node("AveragePool", ["r6"], ["avg"], name="/avg/AveragePool",
                                  kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4))
    nodes.append(helper.make_node("GlobalAveragePool", ["avg"], ["gap"], name="/gap/GAP"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="/flatten/Flatten"))
    inits["fc.w"] = _weight(rng, classes, 16)
    inits["fc.b"] = np.zeros(classes, np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="/fc/Gemm",
                                  transB=1))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, side, side])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    return finish_model(nodes, inits, [image], [logits], name="resnet_like")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    vgg = onnx.load(str(tiny_classifier(tmp_path_factory.mktemp("vgg") / "vgg_like.onnx")))
    vgg.graph.name = "vgg_like"
    resnet = resnet_like()
    tf_same = resnet_like(stem_pads=(0, 0, 1, 1))
    tf_same.graph.name = "tf_same_like"
    return {"vgg_like": (vgg, card_for(vgg)), "resnet_like": (resnet, card_for(resnet)),
            "tf_same_like": (tf_same, card_for(tf_same))}


@pytest.fixture(scope="module")
def effnet(effnet_dir: Path) -> tuple:
    from cnnviz.modelcard import load_card, model_path

    card = load_card(effnet_dir)
    return onnx.load(str(model_path(effnet_dir, card))), card


# ---- the graphs (cnnviz.device_check.GRAPHS: engine graphs and whole-method graphs) --------------
ENGINE_GRAPHS = sorted(g for g in GRAPHS if g.startswith(("input/", "cut/")))
METHOD_GRAPHS = sorted(g for g in GRAPHS if g not in ENGINE_GRAPHS)


def built(name: str, model: onnx.ModelProto, card: dict) -> onnx.ModelProto:
    graph = build_graph(name, model, card, BATCH)
    if graph is None:
        pytest.skip(f"{name}: its builder does not exist (yet)")
    return graph


# ---- the static check on real graphs -------------------------------------------------------------
@pytest.mark.parametrize("graph", ENGINE_GRAPHS)
@pytest.mark.parametrize("name", MODELS)
def test_engine_graphs_have_cuda_kernels(tiny_models, name, graph):
    model, card = tiny_models[name]
    assert_no_new_gaps(built(graph, model, card))


@pytest.mark.torch
@pytest.mark.parametrize("graph", ENGINE_GRAPHS)
def test_efficientnet_lite0_engine_graphs_have_cuda_kernels(effnet, graph):
    model, card = effnet
    assert_no_new_gaps(built(graph, model, card))


@pytest.mark.torch
@pytest.mark.parametrize("graph", METHOD_GRAPHS)
def test_efficientnet_lite0_method_graphs_have_cuda_kernels(effnet, graph):
    model, card = effnet
    assert_no_new_gaps(built(graph, model, card))


@pytest.mark.parametrize("graph", METHOD_GRAPHS)
@pytest.mark.parametrize("name", MODELS)
def test_method_graphs_have_cuda_kernels(tiny_models, name, graph):
    model, card = tiny_models[name]
    assert_no_new_gaps(built(graph, model, card))


def test_the_engine_emits_scatter_and_maxpool_indices(tiny_models):
    """The type-sensitive nodes the backward graphs hold are really in what was checked."""
    model, card = tiny_models["resnet_like"]
    graph = built("input/guided", model, card)
    ops = {(n.op_type, len(n.output)) for n in graph.graph.node}
    assert ("MaxPool", 2) in ops and ("ScatterElements", 1) in ops and ("Greater", 1) in ops


# ---- the check can fail --------------------------------------------------------------------------
def _one_node(op: str, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]],
              inits: dict[str, np.ndarray] | None = None, opset: int = 17, **attrs):
    node = helper.make_node(op, [i[0] for i in inputs] + list(inits or {}),
                            [o[0] for o in outputs], name=f"/deliberate/{op}", **attrs)
    graph = helper.make_graph(
        [node], f"one_{op}",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


F, I64, I32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_one_node("MaxUnpool", [("x", F, [1, 1, 2, 2]), ("i", I64, [1, 1, 2, 2])],
                   [("y", F, [1, 1, 4, 4])], kernel_shape=[2, 2], strides=[2, 2]),
         r"MaxUnpool /deliberate/MaxUnpool \[ai.onnx opset 17\]: no CUDA kernel"),
        (_one_node("Col2Im", [("x", F, [1, 4, 4])], [("y", F, [1, 1, 3, 3])],
                   {"image_shape": np.array([3, 3], np.int64),
                    "block_shape": np.array([2, 2], np.int64)}, opset=18),
         r"Col2Im .*: no CUDA kernel"),
        (_one_node("Where", [("c", BOOL, [4]), ("a", BOOL, [4]), ("b", BOOL, [4])],
                   [("y", BOOL, [4])]),
         r"Where .*opset 17\]: T = bool has no CUDA kernel"),
        (_one_node("Where", [("c", BOOL, [4]), ("a", TensorProto.INT8, [4]),
                             ("b", TensorProto.INT8, [4])], [("y", TensorProto.INT8, [4])]),
         r"T = int8 has no CUDA kernel"),
        (_one_node("Clip", [("x", I32, [4])], [("y", I32, [4])],
                   {"lo": np.array(0, np.int32), "hi": np.array(6, np.int32)}),
         r"Clip .*: T = int32 has no CUDA kernel"),
        (_one_node("Pad", [("x", I64, [4])], [("y", I64, [6])], {"pads": np.array([1, 1])}),
         r"Pad .*: T = int64 has no CUDA kernel"),
        (_one_node("OneHot", [("i", I32, [4])], [("y", F, [4, 3])],
                   {"depth": np.array(3, np.int64), "values": np.array([0, 1], np.float32)}),
         r"OneHot .*\(indices, values, depth\) = \('int32', 'float', 'int64'\)"),
        (_one_node("ScatterND", [("x", F, [4]), ("i", I64, [2, 1]), ("u", F, [2])],
                   [("y", F, [4])], reduction="mul"),
         r"ScatterND .*: reduction='mul' is not supported"),
        (_one_node("Reshape", [("x", F, ["n", 4]), ("s", I64, [2])], [("y", F, ["m", 2])]),
         r"Reshape .*: its shape input 's' is read from host memory and is computed"),
        (_one_node("ConvTranspose", [("x", F, [1, 1, 2, 2])], [("y", F, [1, 1, 4, 4])],
                   {"w": np.ones((1, 1, 3, 3), np.float32)}, kernel_shape=[3, 3], strides=[2, 2],
                   pads=[0, 0, 1, 1]),
         r"ConvTranspose .*: asymmetric pads \[0, 0, 1, 1\]: the CUDA provider drops"),
        (_one_node("ConvTranspose", [("x", F, [1, 1, 2, 2])], [("y", F, [1, 1, 4, 4])],
                   {"w": np.ones((1, 1, 3, 3), np.float32)}, kernel_shape=[3, 3], strides=[2, 2],
                   auto_pad="SAME_UPPER"),
         r"ConvTranspose .*: auto_pad=SAME_UPPER"),
        (_one_node("ConvTranspose", [("x", F, [1, 1, 2, 2])], [("y", F, [1, 1, 4, 4])],
                   {"w": np.ones((1, 1, 3, 3), np.float32)}, kernel_shape=[3, 3], strides=[2, 2],
                   pads=[1, 1, 1, 1], output_padding=[1, 1]),
         None),
        (_one_node("Upsample", [("x", F, [1, 1, 2, 2])], [("y", F, [1, 1, 4, 4])],
                   {"scales": np.array([1, 1, 2, 2], np.float32)}, opset=9),
         None),
    ],
    ids=["maxunpool", "col2im", "where-bool", "where-int8", "clip-int32", "pad-int64",
         "onehot-triple", "scatternd-mul", "reshape-computed-shape", "convtranspose-asymmetric",
         "convtranspose-same-upper", "convtranspose-symmetric-ok", "upsample-9-ok"],
)
def test_gaps_are_reported(model, expected):
    gaps = cuda_kernel_gaps(model)
    if expected is None:
        assert gaps == []
    else:
        assert any(re.search(expected, g) for g in gaps), gaps


def test_other_domains_and_opsets_are_reported():
    model = _one_node("Softplus", [("x", F, [4])], [("y", F, [4])])
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert cuda_kernel_gaps(model) == [
        "Softplus /deliberate/Softplus [com.example opset 1]: no CUDA kernel"]
    # Conv at opset 22 takes bfloat16; at 17 it does not.
    bf = TensorProto.BFLOAT16
    conv = _one_node("Conv", [("x", bf, [1, 1, 3, 3]), ("w", bf, [1, 1, 1, 1])],
                     [("y", bf, [1, 1, 3, 3])])
    assert any("T = bfloat16 has no CUDA kernel" in g for g in cuda_kernel_gaps(conv))


def test_constant_host_inputs_are_fine():
    shape = np.array([2, 2], np.int64)
    model = _one_node("Reshape", [("x", F, [4])], [("y", F, [2, 2])], {"shape": shape})
    assert cuda_kernel_gaps(model) == []


# ---- the kernel table ----------------------------------------------------------------------------
def test_kernel_table_records_its_source():
    table = kernel_table()
    assert table["provider"] == "CUDAExecutionProvider"
    assert table["onnxruntime"] == "1.31"
    assert re.fullmatch(r"[0-9a-f]{40}", table["source"]["commit"])
    ops = table["kernels"]["ai.onnx"]
    assert "MaxUnpool" not in ops and "Col2Im" not in ops
    where = next(r for r in ops["Where"] if r["until"] is None)
    assert "bool" not in where["types"]["T"] and where["types"]["B"] == ["bool"]


def _tool():
    path = Path(__file__).parents[1] / "scripts" / "tools" / "cuda_kernel_table.py"
    spec = importlib.util.spec_from_file_location("cuda_kernel_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXCERPT = """
## Operators implemented by CUDAExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Where|*in* condition:**B**<br> *in* X:**T**<br> *in* Y:**T**<br> *out* output:**T**|16+|**B** = tensor(bool)<br/> **T** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(int64), tensor(uint8)|
|||[9, 15]|**B** = tensor(bool)<br/> **T** = tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(int64), tensor(uint8)|
| |
|**Operator Domain:** *com.microsoft*||||
|BiasGelu|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|1+|**T** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16)|


<a name="dmlexecutionprovider"/>

## Operators implemented by DmlExecutionProvider
|**Operator Domain:** *ai.onnx*||||
|Abs|*in* X:**T**<br> *out* Y:**T**|13+|**T** = tensor(float)|
"""  # noqa: E501 - two rows of onnxruntime's docs/OperatorKernels.md, as written there


def test_the_table_tool_parses_operator_kernels_md():
    tool = _tool()
    kernels = tool.parse_doc(EXCERPT)
    assert set(kernels) == {"ai.onnx", "com.microsoft"}
    assert kernels["ai.onnx"]["Where"] == kernel_table()["kernels"]["ai.onnx"]["Where"]
    assert "Abs" not in kernels["ai.onnx"]  # another provider's section
    assert tool.parse_version("[6, 12]") == (6, 12) and tool.parse_version("13") == (13, 13)


def _tensorrt_present() -> bool:
    """get_all_opkernel_def() loads every provider library the wheel ships; without TensorRT's
    libnvinfer it crashes the process (seen on an H200 with CUDA 13 and no TensorRT)."""
    import ctypes.util
    import os

    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    folders = [Path(p) for p in paths if p and Path(p).is_dir()]
    return ctypes.util.find_library("nvinfer") is not None or any(
        any(folder.glob("libnvinfer.so*")) for folder in folders)


@pytest.mark.skipif(not cuda_usable(), reason=CUDA_REASON)
@pytest.mark.skipif(not _tensorrt_present(), reason="the wheel's kernel listing needs "
                    "TensorRT's libnvinfer (it loads every provider library), absent here")
def test_kernel_table_agrees_with_the_installed_wheel(tmp_path):
    """Every kernel the shipped table promises is registered by the installed onnxruntime-gpu
    (its get_all_opkernel_def, read where the CUDA provider loads). Where this fails, the wheel's
    table is written to the failure message's path: ship it (scripts/tools/cuda_kernel_table.py
    ort)."""
    import json
    import subprocess
    import sys

    tool = Path(__file__).parents[1] / "scripts" / "tools" / "cuda_kernel_table.py"
    out = tmp_path / "cuda_kernels_ort.json"
    done = subprocess.run([sys.executable, str(tool), "ort"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out.write_text(done.stdout)
    wheel = json.loads(done.stdout)["kernels"]["ai.onnx"]
    missing = []
    for op, rows in kernel_table()["kernels"]["ai.onnx"].items():
        for row in rows:
            for opset in range(row["since"], min(row["until"] or 25, 25) + 1):
                have = next((r for r in wheel.get(op, []) if r["since"] <= opset
                             and (r["until"] is None or opset <= r["until"])), None)
                if have is None:
                    missing.append(f"{op} opset {opset}: no kernel in the wheel")
                    continue
                for name, types in row["types"].items():
                    extra = set(types) - set(have["types"].get(name, types))
                    if extra:
                        missing.append(f"{op} opset {opset} {name}: {sorted(extra)} not in wheel")
    assert missing == [], f"{len(missing)} rows (the wheel's table: {out}):\n" + "\n".join(
        sorted(set(missing))[:80])


# ---- the run-time check --------------------------------------------------------------------------
def test_placement_report_reads_the_profile_on_cpu(tiny_models, tmp_path):
    """On a CPU session every node is off CUDA: the report must say so (the CUDA test's
    assertion can fail)."""
    model, _ = tiny_models["vgg_like"]
    session = placement_session(built("input/gradient", model, None), "cpu",
                                profile_dir=str(tmp_path))
    run_once(session)
    report = cuda_placement(session)
    assert report["providers"] and set(report["providers"]) == {"CPUExecutionProvider"}
    assert {n["op"] for n in report["float_off_cuda"]} >= {"Conv", "Gemm"}
    assert any("ran on CPUExecutionProvider" in p for p in placement_problems(report))
    assert "CPUExecutionProvider" in report["assignment"] or report["assignment"] == {}


def test_placement_report_classifies_a_cuda_profile(tmp_path):
    """A CUDA run's profile (the events ORT writes, abridged): float work off CUDA and float
    copies are problems; ORT's host-side shape nodes on integers are not."""
    import json

    def node(name, op, provider, inputs, outputs):
        args = {"op_name": op, "provider": provider,
                "input_type_shape": [{t: [2, 3]} for t in inputs],
                "output_type_shape": [{t: [2, 3]} for t in outputs]}
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": 5, "args": args}

    events = [
        {"cat": "Session", "name": "model_run", "dur": 100},
        node("conv", "Conv", "CUDAExecutionProvider", ["float"] * 3, ["float"]),
        node("conv", "Conv", "CUDAExecutionProvider", ["float"] * 3, ["float"]),  # 2nd run
        node("shape_add", "Add", "CPUExecutionProvider", ["int64", "int64"], ["int64"]),
        node("Memcpy_token_1", "MemcpyToHost", "CUDAExecutionProvider", ["float"], ["float"]),
        node("Memcpy_token_2", "MemcpyFromHost", "CUDAExecutionProvider", ["int64"], ["int64"]),
        node("bwd/ConvTranspose_7", "ConvTranspose", "CPUExecutionProvider",
             ["float", "float"], ["float"]),
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    report = cuda_placement(object(), profile=path)
    assert report["providers"] == {"CUDAExecutionProvider": 3, "CPUExecutionProvider": 2}
    assert [n["node"] for n in report["off_cuda"]] == ["shape_add", "bwd/ConvTranspose_7"]
    assert [n["node"] for n in report["float_off_cuda"]] == ["bwd/ConvTranspose_7"]
    assert [n["op"] for n in report["memcpy"]] == ["MemcpyToHost", "MemcpyFromHost"]
    assert [n["node"] for n in report["float_memcpy"]] == ["Memcpy_token_1"]
    assert report["assignment"] == {}
    problems = placement_problems(report)
    assert len(problems) == 2
    assert problems[0].startswith("ConvTranspose bwd/ConvTranspose_7 ran on CPUExecutionProvider")
    assert problems[1].startswith("MemcpyToHost Memcpy_token_1 copies float data")


@pytest.mark.skipif(not cuda_usable(), reason=CUDA_REASON)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("name", MODELS)
def test_every_node_runs_on_cuda(tiny_models, name, graph):
    model, card = tiny_models[name]
    assert_on_cuda(built(graph, model, card), run=True)


@pytest.mark.torch
@pytest.mark.skipif(not cuda_usable(), reason=CUDA_REASON)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_efficientnet_lite0_runs_on_cuda(effnet, graph):
    model, card = effnet
    assert_on_cuda(built(graph, model, card), run=True)
