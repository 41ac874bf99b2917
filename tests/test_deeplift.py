"""DeepLIFT (rescale rule) and Input × Gradient as `cnnviz explain` runs them (the method graphs of
`methods.attribution` through the one runner; the rescale rules of `autodiff.reference`), on
hand-built ONNX models: known values, summation-to-delta, and the fall back to the gradient."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.autodiff import vjp
from cnnviz.autodiff.reference import attach_reference, deeplift_rules
from cnnviz.methods.attribution import (
    deeplift_graph,
    delta_error,
    input_x_gradient_graph,
)
from cnnviz.runner import Runner
from onnx import TensorProto, helper
from onnx_build import finish_model

F32 = np.float32


def _vector_model(nodes, inits, n_in: int, n_out: int | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out or n_in])
    return finish_model(nodes, inits, [x], [y])


def _deeplift_model(model: onnx.ModelProto, rows: int) -> onnx.ModelProto:
    """The vjp under the DeepLIFT rules with its one-row reference forward on input "ref:x"."""
    return attach_reference(vjp(model, ["x"], batch=rows, node_rules=deeplift_rules), model, "x")


def _multipliers(model: onnx.ModelProto, x: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """The input multipliers of the rows x against the reference x0 (one row), seeded with
    ones."""
    import onnxruntime as ort

    g = _deeplift_model(model, len(x))
    seed_in = next(i for i in g.graph.input if i.name.startswith("seed:"))
    shape = [d.dim_value for d in seed_in.type.tensor_type.shape.dim]
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x.astype(F32), "ref:x": x0.astype(F32), seed_in.name: np.ones(shape, F32)}
    return sess.run(["grad:x"], feeds)[0]


def test_rescale_explains_a_saturated_relu_where_the_gradient_is_zero():
    """y = 1 - relu(1 - x) = min(x, 1) at x = 2 from x0 = 0: the gradient is 0 (saturated), the
    rescale multiplier of the ReLU is Δy/Δu = (0 - 1) / (-1 - 1) = 1/2, so the attribution is
    2 * 1/2 = 1 = f(2) - f(0) (Shrikumar et al.'s motivating example)."""
    nodes = [
        helper.make_node("Sub", ["one", "x"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("Sub", ["one", "r"], ["y"]),
    ]
    model = _vector_model(nodes, {"one": np.ones(1, F32)}, 1)
    m = _multipliers(model, np.array([[2.0]]), np.array([[0.0]]))
    np.testing.assert_allclose(m, [[0.5]], rtol=1e-6)


@pytest.mark.parametrize(
    ("op", "fn"),
    [
        ("Sigmoid", lambda v: 1 / (1 + np.exp(-v))),
        ("Tanh", np.tanh),
        ("Softplus", lambda v: np.log1p(np.exp(v))),
        ("Elu", lambda v: np.where(v > 0, v, np.expm1(v))),
    ],
)
def test_rescale_multiplier_is_the_secant_slope(op, fn):
    """Per element: (h(x) - h(x0)) / (x - x0), and the derivative where x == x0."""
    model = _vector_model([helper.make_node(op, ["x"], ["y"])], {}, 4)
    x = np.array([[2.0, -1.0, 0.5, 0.3]])
    x0 = np.array([[0.0, 1.5, -3.0, 0.3]])
    m = _multipliers(model, x, x0)
    secant = (fn(x[0, :3]) - fn(x0[0, :3])) / (x[0, :3] - x0[0, :3])
    np.testing.assert_allclose(m[0, :3], secant, rtol=1e-5)
    h = 1e-3  # equal inputs: the derivative, by central difference
    slope = (fn(0.3 + h) - fn(0.3 - h)) / (2 * h)
    np.testing.assert_allclose(m[0, 3], slope, rtol=1e-4)


def test_relu6_clip_is_rescaled():
    """Clip(0, 6) from x0 = 0: x = 9 -> 6/9, x = -2 -> 0, x = 3 -> 1 (the gradient is 0, 0, 1)."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    model = _vector_model(nodes, {"lo": np.array(0, F32), "hi": np.array(6, F32)}, 3)
    m = _multipliers(model, np.array([[9.0, -2.0, 3.0]]), np.zeros((1, 3)))
    np.testing.assert_allclose(m, [[6 / 9, 0.0, 1.0]], rtol=1e-6)


def _pool_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 1, 2])
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    return finish_model(nodes, {}, [x], [y])


def test_max_pool_splits_the_change_between_both_argmaxes():
    """Window 1: x's max 4 at (0,1), x0's max 5 at (0,0): top = 5, so (top - o0) = 0 goes to x's
    argmax and (o - top) = -1 to x0's: the multiplier at (0,0) is -1 / Δu = -1 / (1 - 5) = 1/4,
    0 elsewhere. Window 2: x's max 7 at (1,3) beats x0's 2 (at (0,2)): top = 7, 7 - 2 = 5 goes to
    (1,3), whose Δu is 7 - 0 = 7: multiplier 5/7; x0's argmax gets o - top = 0."""
    x = np.array([[1, 4, 1, 0], [3, 2, 0, 7]], F32).reshape(1, 1, 2, 4)
    x0 = np.array([[5, 0, 2, 0], [0, 0, 0, 0]], F32).reshape(1, 1, 2, 4)
    m = _multipliers(_pool_model(), x, x0)[0, 0]
    want = np.zeros((2, 4), F32)
    want[0, 0], want[1, 3] = 0.25, 5 / 7
    np.testing.assert_allclose(m, want, rtol=1e-6)
    # summation-to-delta per window: sum (x - x0) * m = o - o0 = (4 - 5) + (7 - 2)
    assert float(((x - x0)[0, 0] * m).sum()) == pytest.approx(4.0, rel=1e-6)


def test_equal_inputs_fall_back_to_the_gradient():
    """Where x == x0 (|Δu| < 1e-10) the ReLU passes its derivative: the multiplier of an
    identical pair is the plain gradient (1 where u > 0, 0 where u < 0)."""
    w = np.array([[1.0, -2.0], [0.5, 1.0]], F32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("ReduceSum", ["r", "axis"], ["y"]),
    ]
    model = _vector_model(nodes, {"w": w, "axis": np.array([1])}, 2, 1)
    x = np.array([[1.0, 1.0]])  # u = [1.5, -1]
    m = _multipliers(model, x, x.copy())
    np.testing.assert_allclose(m[0], w[:, 0], rtol=1e-6)  # only unit 0 is on


def test_a_product_of_two_computed_tensors_splits_its_change_by_the_means():
    """y = a * b with a = x1, b = x2, from x0 = (1, 0) to x = (3, 2): a's multiplier is
    mean(b) = 1 and b's is mean(a) = 2, so the attributions 2 * 1 + 2 * 2 = 6 = f(x) - f(x0)
    (the gradient, (2, 3), would give 10). y = x1 * x1: multiplier 2 mean(x1) = 4."""
    nodes = [
        helper.make_node("MatMul", ["x", "e1"], ["a"]),
        helper.make_node("MatMul", ["x", "e2"], ["b"]),
        helper.make_node("Mul", ["a", "b"], ["y"]),
    ]
    inits = {"e1": np.array([[1.0], [0.0]], F32), "e2": np.array([[0.0], [1.0]], F32)}
    model = _vector_model(nodes, inits, 2, 1)
    m = _multipliers(model, np.array([[3.0, 2.0]]), np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(m, [[1.0, 2.0]], rtol=1e-6)
    nodes = [helper.make_node("MatMul", ["x", "e1"], ["a"]),
             helper.make_node("Mul", ["a", "a"], ["y"])]  # fmt: skip
    square = _vector_model(nodes, inits, 2, 1)
    m = _multipliers(square, np.array([[3.0, 2.0]]), np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(m, [[4.0, 0.0]], rtol=1e-6)


def test_the_reference_forward_runs_once_for_all_rows():
    """Three rows against one reference: each row's multipliers are its own secant slopes."""
    model = _vector_model([helper.make_node("Tanh", ["x"], ["y"])], {}, 2)
    x = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 2.0]])
    x0 = np.array([[0.0, 1.0]])
    m = _multipliers(model, x, x0)
    np.testing.assert_allclose(m, (np.tanh(x) - np.tanh(x0)) / (x - x0), rtol=1e-5)


# ---- the method graphs on a small CNN ----------------------------------------------------------
C, H, W, K = 3, 8, 8, 5


def cnn(opset: int = 17) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool 3x3/2 (overlapping) -> Conv -> Clip(0, 6) -> Sigmoid -> Conv ->
    Tanh, + the pooled tensor (residual) -> LeakyRelu -> BatchNorm -> GlobalAveragePool -> Gemm:
    every rescaled op, a residual and an overlapping max pool."""
    rng = np.random.default_rng(3)

    def n(*shape, s=0.5):
        return (rng.normal(size=shape) * s).astype(F32)

    inits = {
        "w1": n(4, C, 3, 3), "b1": n(4, s=0.1), "w2": n(4, 4, 3, 3), "b2": n(4, s=0.1),
        "w3": n(4, 4, 3, 3), "lo": np.array(0, F32), "hi": np.array(6, F32),
        "sc": 1 + n(4, s=0.2), "bi": n(4, s=0.1), "mu": n(4, s=0.1), "var": 1 + np.abs(n(4)),
        "wf": n(K, 4, s=1.0), "bf": n(K, s=1.0),
    }  # fmt: skip
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=pads),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=pads),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Sigmoid", ["r2"], ["s2"]),
        helper.make_node("Conv", ["s2", "w3"], ["c3"], pads=pads),
        helper.make_node("Tanh", ["c3"], ["t3"]),
        helper.make_node("Add", ["t3", "p1"], ["a3"]),
        helper.make_node("LeakyRelu", ["a3"], ["l3"], alpha=0.1),
        helper.make_node("BatchNormalization", ["l3", "sc", "bi", "mu", "var"], ["n3"]),
        helper.make_node("GlobalAveragePool", ["n3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    return finish_model(nodes, inits, [x], [y])


def gated_cnn() -> onnx.ModelProto:
    """Conv -> SiLU (x * Sigmoid(x)) -> squeeze-excitation (GlobalAveragePool -> Conv -> Relu ->
    Conv -> HardSigmoid, times the feature map) -> HardSwish -> GlobalAveragePool -> Gemm:
    products of two computed tensors, as in MobileNetV3 and EfficientNet-B0."""
    rng = np.random.default_rng(4)

    def n(*shape, s=0.5):
        return (rng.normal(size=shape) * s).astype(F32)

    inits = {"w1": n(6, C, 3, 3), "b1": n(6, s=0.1), "ws": n(3, 6, 1, 1), "we": n(6, 3, 1, 1),
             "wf": n(K, 6, s=1.0), "bf": n(K, s=1.0)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["silu"]),
        helper.make_node("GlobalAveragePool", ["silu"], ["sq"]),
        helper.make_node("Conv", ["sq", "ws"], ["z"]),
        helper.make_node("Relu", ["z"], ["zr"]),
        helper.make_node("Conv", ["zr", "we"], ["e"]),
        helper.make_node("HardSigmoid", ["e"], ["gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["silu", "gate"], ["se"]),
        helper.make_node("HardSwish", ["se"], ["hs"]),
        helper.make_node("GlobalAveragePool", ["hs"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    return finish_model(nodes, inits, [x], [y])


def _deeplift(model, x, targets, baseline, images=2):
    graph = deeplift_graph(model, images)
    feeds = {"images": x, "targets": np.asarray(targets, np.int64)}
    return Runner(graph, "cpu", 2).run(feeds, None, {"baseline": baseline[None]})


@pytest.mark.parametrize("make", [cnn, gated_cnn])
def test_deeplift_sums_to_the_change_of_the_logit(make):
    """sum (x - x0) * m = f_t(x) - f_t(x0) for every image and baseline (every nonlinearity is
    rescaled, products split by the means); 3 images at 2 per call (a padded chunk)."""
    model = make()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, C, H, W)).astype(F32)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for baseline in (np.zeros((C, H, W), F32), np.full((C, H, W), -1.5, F32)):
        targets = [0, 3, 4]
        out = _deeplift(model, x, targets, baseline)
        f = sess.run(None, {"input": x})[0][np.arange(3), targets]
        f0 = sess.run(None, {"input": baseline[None]})[0][0, targets]
        np.testing.assert_allclose(out["values"], np.stack([f, f0], 1), rtol=1e-5, atol=1e-6)
        sums = out["signed"].reshape(3, -1).astype(np.float64).sum(1)
        np.testing.assert_allclose(sums, f - f0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["map"], out["signed"].sum(1), rtol=1e-5, atol=1e-6)
        assert max(delta_error(out["signed"][r], out["values"][r]) for r in range(3)) < 1e-4


def test_deeplift_differs_from_input_x_gradient_and_equals_it_on_a_linear_model():
    """On the CNN the two disagree (the rescale rule is not the gradient); with the zero baseline
    on a model without nonlinearities both are x * w_t exactly."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, C, H, W)).astype(F32)
    zero = np.zeros((C, H, W), F32)
    model = cnn()
    ixg = Runner(input_x_gradient_graph(model, 2), "cpu", 2).run(
        {"images": x, "targets": np.array([1, 2])}
    )
    dl = _deeplift(model, x, [1, 2], zero)
    assert np.abs(ixg["signed"] - dl["signed"]).max() > 1e-2 * np.abs(dl["signed"]).max()

    w = rng.normal(size=(K, C * H * W)).astype(F32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
    ]
    xi = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    yo = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    linear = finish_model(nodes, {"w": w, "b": np.ones(K, F32)}, [xi], [yo])
    want = x * w[[1, 2]].reshape(2, C, H, W)
    ixg = Runner(input_x_gradient_graph(linear, 1), "cpu", 2).run(
        {"images": x, "targets": np.array([1, 2])}
    )
    dl = _deeplift(linear, x, [1, 2], zero, images=1)
    for out in (ixg, dl):
        np.testing.assert_allclose(out["signed"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["map"], want.sum(1), rtol=1e-5, atol=1e-5)


def test_input_x_gradient_matches_finite_differences():
    """x * (f(x + h e_i) - f(x - h e_i)) / 2h on a few coordinates of the CNN (float64 sums)."""
    import onnxruntime as ort

    model = cnn()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, C, H, W)).astype(F32)
    out = Runner(input_x_gradient_graph(model, 1), "cpu", 2).run(
        {"images": x, "targets": np.array([2])}
    )
    h = 1e-2
    for index in [(0, 0, 3, 4), (0, 1, 0, 0), (0, 2, 7, 5), (0, 1, 4, 2)]:
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        fd = (sess.run(None, {"input": plus})[0][0, 2] - sess.run(None, {"input": minus})[0][0, 2])
        want = x[index] * fd / (2 * h)
        assert out["signed"][index] == pytest.approx(want, rel=2e-2, abs=1e-4)


def test_options_are_declared_once():
    from cnnviz import registry

    assert registry.METHODS["input_x_gradient"].options == {}
    baseline = registry.METHODS["deeplift"].options["baseline"]
    assert baseline.schema["enum"] == ["zero", "black", "white"]
    assert baseline.default == "zero"
    for method in ("input_x_gradient", "deeplift"):
        assert registry.METHODS[method].run == f"cnnviz.methods.attribution:run_{method}"


def test_run_functions_give_signed_maps_per_row():
    """run_deeplift / run_input_x_gradient through explain.Job with the registry's defaults (and the
    "white" baseline through the preprocessing): one float32 [H, W] channel sum and one signed
    [3, H, W] attribution per (image, target) row, marked for the relevance picture; DeepLIFT's
    rows equal the graph's and sum to the logit change."""
    from cnnviz.methods.attribution import run_deeplift, run_input_x_gradient
    from cnnviz.methods.backprop import make_baseline
    from cnnviz.methods.explain import Job

    model = cnn()
    x = np.random.default_rng(5).normal(size=(2, C, H, W)).astype(F32)
    rows = [(0, 1), (1, 4), (0, 2)]
    card = {"preprocess": {"scale": 255.0, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}}
    from cnnviz import registry

    defaults = registry.defaults("deeplift")
    for options in (defaults, {**defaults, "baseline": "white"}):
        job = Job(model, card, ["a", "b"], x, [], rows, options, "cpu", 1, 4)  # 2 images a call
        results = list(run_deeplift(job))
        assert [r[0] for r in results] == [0, 1, 0]
        base = make_baseline(options["baseline"], x[0], card["preprocess"])
        want = _deeplift(model, x[[0, 1, 0]], [1, 4, 2], base)
        for r, (_, raw, signed, info) in enumerate(results):
            assert raw.dtype == np.float32 and raw.shape == (H, W) and signed.shape == (C, H, W)
            np.testing.assert_allclose(signed, want["signed"][r], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(raw, signed.sum(0), rtol=1e-5, atol=1e-6)
            assert info["picture"] == "relevance" and info["baseline"] == options["baseline"]
            assert info["delta_error"] < 1e-4
    job = Job(model, card, ["a", "b"], x, [], rows, {}, "cpu", 1, 2)
    results = list(run_input_x_gradient(job))
    assert len(results) == 3 and all(r[2].shape == (C, H, W) for r in results)
    np.testing.assert_allclose(results[1][1], results[1][2].sum(0), rtol=1e-5, atol=1e-6)


def test_a_final_softmax_is_skipped_on_both_forwards():
    """With a final Softmax the seed and both values are the logits (as for the gradient
    methods), and the attributions sum to their change."""
    import onnxruntime as ort

    model = cnn()
    logits = onnx.ModelProto()
    logits.CopyFrom(model)
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    x = np.random.default_rng(6).normal(size=(2, C, H, W)).astype(F32)
    base = np.full((C, H, W), 0.5, F32)
    out = _deeplift(model, x, [2, 0], base)
    sess = ort.InferenceSession(logits.SerializeToString(), providers=["CPUExecutionProvider"])
    f = sess.run(None, {"input": np.concatenate([x, base[None]])})[0]
    want = np.stack([f[[0, 1], [2, 0]], f[2, [2, 0]]], 1)
    np.testing.assert_allclose(out["values"], want, rtol=1e-5, atol=1e-6)
    sums = out["signed"].reshape(2, -1).astype(np.float64).sum(1)
    np.testing.assert_allclose(sums, want[:, 0] - want[:, 1], rtol=1e-4, atol=1e-5)
