"""Filter visualization's step as one ONNX graph (optvis_graph) against the numpy host loop.

The pieces (Fourier parameterization, random transforms) match `optvis`'s numpy functions and
their hand-written adjoints; a whole step matches the numpy engine (same draws, same update);
the Gather/GatherElements backward rules match central finite differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.autodiff import vjp
from cnnviz.methods import filters as fv
from cnnviz.methods import objectives as ob
from cnnviz.methods import optvis as ov
from cnnviz.methods import optvis_graph as og
from cnnviz.methods.objective_job import ObjectiveJob
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper
from test_filters import IMAGENET, small_net

RNG = np.random.default_rng(99)
NORM = ov.Normalization.from_preprocess(IMAGENET)

# CUDA kernels of ONNX Runtime 1.31 (docs/OperatorKernels.md, CUDAExecutionProvider, float32 /
# int64 where used) for the op types the step graphs may emit; Where, MaxUnpool, Col2Im and
# control flow are left out on purpose.
CUDA_OPS = {
    "Add", "Cast", "Clip", "Concat", "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Equal",
    "Expand", "Floor", "Gather", "GatherElements", "Greater", "Identity", "Less", "LessOrEqual",
    "MatMul", "Max", "Min", "Mul", "Neg", "Pad", "ReduceMean", "ReduceSum", "Relu", "Reshape",
    "ScatterElements", "ScatterND", "Sigmoid", "Slice", "Split", "Sqrt", "Sub", "Transpose",
    "Unsqueeze", "And", "GlobalAveragePool", "Sum", "MaxPool", "HardSigmoid", "Tanh",
    "Abs", "Sign",  # total_variation() and its backward (Sign: float, opset 13+)
}  # fmt: skip


def model_of(nodes, inputs, inits=(), outputs=("y",), opset=17) -> onnx.ModelProto:
    elem = inputs[0].type.tensor_type.elem_type
    outs = [helper.make_tensor_value_info(o, elem, None) for o in outputs]
    graph = helper.make_graph(nodes, "t", inputs, outs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def fd_grad(session, feeds, x_name, seed, eps):
    """Central differences of sum(seed * y) in every entry of feeds[x_name] (float64)."""
    x = feeds[x_name]
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        vals = []
        for sign in (1, -1):
            xp = x.copy()
            xp[i] += sign * eps
            vals.append(float(np.sum(session.run(["y"], {**feeds, x_name: xp})[0] * seed)))
        out[i] = (vals[0] - vals[1]) / (2 * eps)
    return out


def check_rule(model, feeds, eps=1e-6, rtol=1e-7):
    x = feeds["x"]
    forward = make_session(model, "cpu", 1)
    y = forward.run(["y"], feeds)[0]
    seed = RNG.standard_normal(y.shape)
    grad_model = vjp(model, ["x"], ["y"], batch=x.shape[0])
    got = make_session(grad_model, "cpu", 1).run(["grad:x"], {**feeds, "seed:y": seed})[0]
    ref = fd_grad(forward, feeds, "x", seed, eps)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    return grad_model


# ---- Gather / GatherElements rules --------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_gather_rule_fd_constant_indices(axis):
    """Repeated and negative constant indices (the adjoint adds what several outputs read)."""
    x = RNG.standard_normal((2, 4, 3))
    dim = x.shape[axis]
    idx = np.array([[0, dim - 1, 0], [-1, 1, 0]], np.int64)
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], axis=axis),
             helper.make_node("Tanh", ["g"], ["y"])]  # fmt: skip
    inp = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 4, 3])]
    model = model_of(nodes, inp, [numpy_helper.from_array(idx, "idx")])
    grad_model = check_rule(model, {"x": x})
    assert "ScatterElements" in og.op_types(grad_model)


def test_gather_rule_fd_computed_and_scalar_indices():
    """Indices fed at run time (wrapped in-graph when negative), and a scalar index."""
    x = RNG.standard_normal((1, 5, 2))
    nodes = [
        helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),  # [1, 1, 4, 2]
        helper.make_node("Gather", ["x", "k"], ["s"], axis=1),  # [1, 2]
        helper.make_node("Unsqueeze", ["s", "one"], ["s1"]),
        helper.make_node("Mul", ["g", "s1"], ["y"]),
    ]
    inp = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 5, 2]),
           helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 4])]  # fmt: skip
    inits = [numpy_helper.from_array(np.array(-2, np.int64), "k"),
             numpy_helper.from_array(np.array([0, 1], np.int64), "one")]  # fmt: skip
    model = model_of(nodes, inp, inits)
    check_rule(model, {"x": x, "idx": np.array([[4, -1, 0, 2]], np.int64)})


def test_gather_elements_rule_fd():
    x = RNG.standard_normal((2, 3, 4))
    idx = np.array(RNG.integers(-4, 4, size=(2, 3, 5)), np.int64)  # duplicates and negatives
    nodes = [helper.make_node("GatherElements", ["x", "idx"], ["g"], axis=2),
             helper.make_node("Mul", ["g", "g"], ["y"])]  # fmt: skip
    inp = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3, 4])]
    model = model_of(nodes, inp, [numpy_helper.from_array(idx, "idx")])
    grad_model = check_rule(model, {"x": x})
    assert "ScatterElements" in og.op_types(grad_model)


def test_gather_rules_refuse_below_opset_16():
    from cnnviz.autodiff import UnsupportedOpError

    nodes = [helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)]
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    model = model_of(nodes, inp, [numpy_helper.from_array(np.array([1, 1], np.int64), "idx")],
                     opset=15)
    with pytest.raises(UnsupportedOpError, match="opset"):
        vjp(model, ["x"], ["y"])


# ---- graph pieces against the numpy parts -------------------------------------------------------
def piece_model(emit, inputs: dict[str, tuple]) -> onnx.ModelProto:
    e = og.Emitter()
    out = emit(e)
    e.op("Identity", [out], out="y")
    inp = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in inputs.items()]
    return model_of(e.nodes, inp, e.inits)


@pytest.mark.parametrize("size", [6, 7, 16])
def test_fourier_image_graph_matches_numpy_and_its_adjoint(size):
    b = 2
    param = ov.FourierImage(size, size)
    spectrum = (RNG.standard_normal((b, *param.shape)) * 0.5).astype(np.float32)
    model = piece_model(lambda e: og.fourier_image(e, "s", b, size), {"s": spectrum.shape})
    got = make_session(model, "cpu", 1).run(["y"], {"s": spectrum})[0]
    np.testing.assert_allclose(got, param.forward(spectrum), atol=2e-6)
    # the engine's backward of the graph (MatMul, Conv, Sigmoid rules) = the numpy adjoints
    seed = RNG.standard_normal(got.shape).astype(np.float32)
    grad = make_session(vjp(model, ["s"], ["y"], batch=b), "cpu", 1).run(
        ["grad:s"], {"s": spectrum, "seed:y": seed})[0]  # fmt: skip
    ref = param.backward(seed)
    np.testing.assert_allclose(grad, ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("out_size", [(32, 32), (24, 40)])
def test_random_transform_graph_matches_numpy_and_its_adjoint(out_size):
    """Same draws -> the same bilinear taps: pad, jitter, scale x rotate, jitter, resize."""
    b, size, steps = 4, 16, 6
    model = piece_model(
        lambda e: og.random_transform(e, "img", "draw", b, size, out_size, NORM),
        {"img": (b, 3, size, size), "draw": (b, 6)},
    )
    forward = make_session(model, "cpu", 1)
    backward = make_session(vjp(model, ["img"], ["y"], batch=b), "cpu", 1)
    tables = [fv.transform_table(fv.filter_rng(3, c), steps) for c in range(b)]
    rngs = [fv.filter_rng(3, c) for c in range(b)]
    for k in range(steps):
        image = RNG.random((b, 3, size, size)).astype(np.float32)
        draw = np.stack([t[k] for t in tables])
        transforms = ov.Transforms((size, size), out_size, NORM)
        ref = transforms.forward(image, [ov.draw_transform(r) for r in rngs])
        got = forward.run(["y"], {"img": image, "draw": draw})[0]
        np.testing.assert_allclose(got, ref, atol=1e-5)
        seed = RNG.standard_normal(got.shape).astype(np.float32)
        grad = backward.run(["grad:img"], {"img": image, "draw": draw, "seed:y": seed})[0]
        expected = transforms.backward(seed)
        np.testing.assert_allclose(grad, expected, atol=1e-5 * np.abs(expected).max())


def test_transform_table_is_the_numpy_stream():
    rng, again = fv.filter_rng(1, 7), fv.filter_rng(1, 7)
    table = fv.transform_table(rng, 5)
    for row in table:
        d = ov.draw_transform(again)
        sampling = ov.affine_sampling((8, 8), np.array([d.scale]), np.array([d.angle]))
        assert tuple(row[[0, 1, 4, 5]]) == (*d.jitter1, *d.jitter2)
        ref = ov.affine_sampling((8, 8), np.array([1.0]), np.array([0.0]))
        assert sampling.weight.shape == ref.weight.shape
        inv = 1.0 / d.scale
        assert row[2] == np.float32(inv * np.cos(np.deg2rad(d.angle)))
        assert row[3] == np.float32(inv * np.sin(np.deg2rad(d.angle)))


# ---- whole steps against the numpy engine -------------------------------------------------------
def one_lucent_step(model, tensor, channels, pre, size, threads=1):
    """(graph: spectrum after one step and its gradient read back from Adam's m; numpy: the
    gradient and the spectrum after one step) for the same start and draws."""
    norm = ov.Normalization.from_preprocess(pre)
    b = len(channels)
    job = ObjectiveJob(model, [ob.channel(tensor, 0)], b, mode="lucent", steps=1, lr=0.05,
                       norm=norm, param_size=size, device="cpu", threads=threads)  # fmt: skip
    s = job.size
    param = ov.FourierImage(s, s)
    rngs = [fv.filter_rng(5, c) for c in channels]
    spectrum = np.stack([param.init(r) for r in rngs])
    draws = np.stack([fv.transform_table(r, 1) for r in rngs])
    state = job.initial_state(1)
    state.update({"fv:spectrum": spectrum, "fv:m": np.zeros_like(spectrum),
                  "fv:v": np.zeros_like(spectrum)})  # fmt: skip
    consts = {"fv:draws": draws, "fv:bias": fv.adam_bias(1),
              **job.constants([ob.channel(tensor, c) for c in channels])}
    out = job.loop(state, consts, 1)
    graph_grad = -out["fv:m"] / np.float32(0.1)  # m after one step: (1 - b1) * (-g)
    objective = fv.LayerObjective(model, tensor, b, "cpu", threads)
    rngs = [fv.filter_rng(5, c) for c in channels]
    spectrum = np.stack([param.init(r) for r in rngs])
    transforms = ov.Transforms((s, s), job.input_shape[1:], norm)
    x = transforms.forward(param.forward(spectrum), [ov.draw_transform(r) for r in rngs])
    _, grad = objective(x, channels, redirect=[True] * b)
    numpy_grad = param.backward(transforms.backward(grad))
    numpy_new = ov.Adam(0.05).step(spectrum, -numpy_grad)
    return out["fv:spectrum"], graph_grad, numpy_new, numpy_grad


def assert_step_matches(graph_new, graph_grad, numpy_new, numpy_grad, grad_rtol, param_atol):
    b = len(numpy_grad)
    scale = np.abs(numpy_grad).reshape(b, -1).max(1)
    err = np.abs(graph_grad - numpy_grad).reshape(b, -1).max(1) / scale
    assert np.all(err < grad_rtol), err
    # Adam's first step is lr * g / (|g| + eps): entries with |g| near float noise move by up
    # to lr either way; everywhere else the parameters agree
    clear = np.abs(numpy_grad) > 1e-3 * scale[:, None, None, None, None]
    np.testing.assert_allclose(graph_new[clear], numpy_new[clear], atol=param_atol)
    assert np.abs(graph_new - numpy_new).max() <= 2 * 0.05 + 1e-6


def test_one_lucent_step_equals_the_numpy_step():
    new, grad, numpy_new, numpy_grad = one_lucent_step(small_net(), "r2", [0, 2, 3, 5],
                                                       IMAGENET, 16)  # fmt: skip
    assert_step_matches(new, grad, numpy_new, numpy_grad, grad_rtol=1e-5, param_atol=1e-6)


@pytest.mark.parametrize("mode", ["lucent", "seed"])
def test_graph_engine_reproduces_the_numpy_engine(mode):
    """A few steps of the whole job (start, curves, final, images) on the tiny model."""
    kwargs = dict(mode=mode, steps=3, seed=5, preprocess=IMAGENET, param_size=16, batch_size=4,
                  device="cpu", threads=1, norm_bound=None if mode == "lucent" else 20.0)
    channels = [0, 2, 3, 5]
    old = fv.optimize_filters(small_net(), "r2", channels, engine="numpy", **kwargs)
    new = fv.optimize_filters(small_net(), "r2", channels, engine="graph", **kwargs)
    assert new.info["engine"] == "graph" and old.info["engine"] == "numpy"
    np.testing.assert_allclose(new.curves, old.curves, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.start_image, old.start_image, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.final, old.final, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.raw, old.raw, atol=1e-4)
    assert new.images.shape == old.images.shape


def test_a_short_chunk_is_padded_and_unchanged():
    """5 filters in batches of 3 (the second chunk padded to 3) equal 5 batches of 1."""
    kwargs = dict(mode="lucent", steps=3, seed=2, preprocess=IMAGENET, param_size=16,
                  device="cpu", threads=1)
    channels = [5, 1, 0, 4, 2]
    padded = fv.optimize_filters(small_net(), "r2", channels, batch_size=3, **kwargs)
    single = fv.optimize_filters(small_net(), "r2", channels, batch_size=1, **kwargs)
    assert padded.info["batch"] == 3
    np.testing.assert_allclose(padded.images, single.images, atol=1e-5)
    np.testing.assert_allclose(padded.curves, single.curves, rtol=1e-4, atol=1e-6)


def test_old_opsets_and_flat_outputs_fall_back_to_the_numpy_engine():
    model = small_net()
    model.opset_import[0].version = 15
    res = fv.optimize_filters(model, "r2", [1], mode="seed", steps=2, preprocess=IMAGENET,
                              device="cpu", threads=1)  # fmt: skip
    assert res.info["engine"] == "numpy"
    logits = fv.optimize_filters(small_net(), "logits", [1], mode="seed", steps=2,
                                 preprocess=IMAGENET, device="cpu", threads=1)  # fmt: skip
    assert logits.info["engine"] == "numpy"  # not a feature map: the host loop
    assert logits.curves[0, -1] > logits.curves[0, 0]
    with pytest.raises(fv.ConfigError, match="engine"):
        fv.optimize_filters(model, "r2", [1], steps=1, engine="torch")


@pytest.mark.parametrize("mode", ["lucent", "seed"])
def test_step_graph_ops_have_cuda_kernels(mode):
    """Every op of the step and evaluation graphs has a CUDA kernel (no Where, no MaxUnpool);
    shapes, axes and pads are initializers (no Shape op), state in and out match."""
    job = ObjectiveJob(small_net(), [ob.channel("r1", 0)], 2, mode=mode, steps=4, lr=0.05,
                       norm=NORM, param_size=16, norm_bound=3.0, device="cpu",
                       threads=1)  # fmt: skip
    for graph in (job.spec.model, job.eval_graph):
        ops = set(og.op_types(graph))
        assert ops <= CUDA_OPS, ops - CUDA_OPS
        assert "Shape" not in ops
        assert not {"conv2", "fc", "pool"} & {n.name for n in graph.graph.node}  # cut at r1's layer
    inputs = {i.name for i in job.spec.model.graph.input}
    outputs = {o.name for o in job.spec.model.graph.output}
    for name in job.spec.state:
        assert name in inputs and name + og.STATE_SUFFIX in outputs
    assert outputs == {n + og.STATE_SUFFIX for n in job.spec.state} | {"fv:values"}


# ---- the real model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_efficientnet_step_matches_the_numpy_step(effnet_dir: Path):
    """EfficientNet-Lite0, blocks.8.expand_conv (pre-ReLU6): one lucent step's gradient and
    update, and two seed-mode steps, against the numpy engine. The gradient agrees to 1e-2 of
    its largest entry: the model's own ReLU6 kinks make it that sensitive (perturbing the
    input by 1e-6 moves the numpy gradient by 2e-3 to 7e-3 of its largest entry)."""
    from cnnviz.modelcard import find_layer, load_card, model_path

    card = load_card(effnet_dir)
    model = onnx.load(str(model_path(effnet_dir, card)))
    tensor = fv.objective_tensor(model, find_layer(card, "blocks.8.expand_conv")["tensor"])
    new, grad, numpy_new, numpy_grad = one_lucent_step(model, tensor, [0, 1, 2, 3],
                                                       card["preprocess"], 128, threads=2)
    assert_step_matches(new, grad, numpy_new, numpy_grad, grad_rtol=1e-2, param_atol=1e-4)
    kwargs = dict(mode="seed", steps=1, preprocess=card["preprocess"], batch_size=4,
                  device="cpu", threads=2)
    old = fv.optimize_filters(model, tensor, [0, 1, 2, 3], engine="numpy", **kwargs)
    now = fv.optimize_filters(model, tensor, [0, 1, 2, 3], engine="graph", **kwargs)
    np.testing.assert_allclose(now.raw, old.raw, atol=1e-5)
    np.testing.assert_allclose(now.final, old.final, rtol=1e-3, atol=1e-4)


# ---- on the GPU (skipped without CUDA) ----------------------------------------------------------
def _cuda() -> bool:
    from cnnviz.runtime import cuda_usable

    return cuda_usable()


@pytest.mark.skipif(not _cuda(), reason="needs onnxruntime-gpu with a usable CUDA device")
@pytest.mark.parametrize("mode", ["lucent", "seed"])
def test_step_graph_runs_on_cuda_only_and_agrees_with_cpu(mode, tmp_path: Path):
    """Every node of the step graph on the CUDA provider (ORT's profile), and CUDA and CPU
    agree (loosely: TF32 convolutions and matmuls, then Adam's sign-like first steps)."""
    import json

    import onnxruntime as ort
    from cnnviz.runtime import providers_for, session_options

    kwargs = dict(mode=mode, steps=3, seed=1, preprocess=IMAGENET, param_size=16,
                  batch_size=4, threads=1)  # fmt: skip
    on_cpu = fv.optimize_filters(small_net(), "r2", [0, 1, 2, 3], device="cpu", **kwargs)
    on_gpu = fv.optimize_filters(small_net(), "r2", [0, 1, 2, 3], device="cuda", **kwargs)
    assert on_gpu.info["providers"][0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(on_gpu.curves, on_cpu.curves, rtol=2e-2, atol=1e-3)
    job = ObjectiveJob(small_net(), [ob.channel("r2", 0)], 4, mode=mode, steps=2, lr=0.05,
                       norm=NORM, param_size=16, device="cuda", threads=1)  # fmt: skip
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "step")
    job.session = ort.InferenceSession(job.spec.model.SerializeToString(), options,
                                       providers=providers_for("cuda"))
    job.run([0, 1, 2, 3], 2, 0.05, 0, NORM, 16, None)
    events = json.loads(Path(job.session.end_profiling()).read_text())
    placed = {(e["args"]["op_name"], e["args"]["provider"]) for e in events
              if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}  # fmt: skip
    assert placed and all(p == "CUDAExecutionProvider" for _, p in placed), sorted(placed)
