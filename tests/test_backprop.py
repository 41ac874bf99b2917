"""Input-gradient methods, as cnnviz explain runs them (the method graphs of `backprop` through
the one runner), on tiny ONNX models against analytic and numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.errors import ConfigError
from cnnviz.methods import backprop as bp
from cnnviz.methods.explain import completeness_error, ig_points, run_method
from cnnviz.runner import Runner, chunk_plan
from numpy_conv import conv3x3, conv3x3_transpose
from onnx import TensorProto, helper, numpy_helper

C, H, W, K = 3, 6, 6, 4
RNG = np.random.default_rng(7)


def _model(nodes, inits, out_shape=("batch", K)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))
    graph = helper.make_graph(
        nodes, "tiny", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def linear_model() -> tuple[onnx.ModelProto, np.ndarray]:
    w = RNG.normal(size=(K, C * H * W)).astype(np.float32)
    b = RNG.normal(size=K).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
    ]
    return _model(nodes, {"w": w, "b": b}), w.reshape(K, C, H, W)


def conv_net(activation: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv3x3(pad 1) -> act -> conv3x3(pad 1) -> act -> GlobalAveragePool -> Gemm."""
    p = {
        "w1": RNG.normal(0, 0.5, size=(5, C, 3, 3)).astype(np.float32),
        "b1": RNG.normal(0, 0.1, size=5).astype(np.float32),
        "w2": RNG.normal(0, 0.5, size=(4, 5, 3, 3)).astype(np.float32),
        "b2": RNG.normal(0, 0.1, size=4).astype(np.float32),
        "wf": RNG.normal(size=(K, 4)).astype(np.float32),
        "bf": RNG.normal(size=K).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    return _model(nodes, p), p


def gradients(model, x, targets, policy="gradient", images=None) -> dict:  # noqa: ANN001
    """`signed` [N, 3, H, W] and `map` [N, H, W] of `backprop.gradient_graph`, `images` per call."""
    graph = bp.gradient_graph(model, policy, images or len(x))
    return Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets, np.int64)})


def integrated(
    model, x, target, steps, baseline="zero", method="gausslegendre", pre=None, rows=8
) -> tuple[np.ndarray, float]:  # noqa: ANN001
    """([3, H, W] attributions, completeness error) of one image as explain computes them,
    `rows` path points per call."""
    alphas, weights = ig_points(method, steps)
    images, points = chunk_plan(len(alphas), rows)
    graph = bp.integrated_gradients_graph(model, images, points)
    base = bp.make_baseline(baseline, x, pre)
    out = Runner(graph, "cpu", 1).run(
        {"images": x[None], "targets": np.array([target])},
        {"alphas": alphas, "weights": weights},
        {"baseline": base[None]},
    )
    return out["signed"][0], completeness_error(out["signed"][0], out["values"][0])


def images(n: int) -> np.ndarray:
    return RNG.normal(size=(n, C, H, W)).astype(np.float32)


# ---- numpy reference for the ReLU net ------------------------------------------------------------
def relu_net_gradient(x, t, p, policy):
    x = x.astype(np.float64)
    c1 = conv3x3(x, p["w1"], p["b1"])
    c2 = conv3x3(np.maximum(c1, 0), p["w2"], p["b2"])
    g = np.broadcast_to(p["wf"][t][:, None, None] / (H * W), c2.shape)

    def act_back(g, pre):
        return np.maximum(g, 0) * (pre > 0) if policy == "guided" else g * (pre > 0)

    g = conv3x3_transpose(act_back(g, c2), p["w2"])
    return conv3x3_transpose(act_back(g, c1), p["w1"])


# ---- tests ---------------------------------------------------------------------------------------
def test_saliency_is_abs_gradient_of_linear_model():
    model, w = linear_model()
    x, targets = images(3), [0, 3, 1]
    out = gradients(model, x, targets)
    np.testing.assert_allclose(out["signed"], w[targets], rtol=1e-5, atol=1e-6)
    assert out["map"].shape == (3, H, W)
    np.testing.assert_allclose(out["map"], np.abs(w[targets]).max(axis=1), rtol=1e-5, atol=1e-6)


def test_batching_matches_one_at_a_time():
    model, _ = conv_net("Relu")
    x, targets = images(5), [0, 1, 2, 3, 1]
    singles = gradients(model, x, targets, "guided", images=1)["signed"]
    two = gradients(model, x, targets, "guided", images=2)["signed"]  # the last call padded
    np.testing.assert_allclose(two, singles, atol=1e-6)


def test_guided_and_plain_match_numpy_and_differ():
    model, p = conv_net("Relu")
    x, targets = images(2), [1, 2]
    plain = gradients(model, x, targets)["signed"]
    guided = gradients(model, x, targets, "guided")["signed"]
    for i, t in enumerate(targets):
        np.testing.assert_allclose(
            plain[i], relu_net_gradient(x[i], t, p, "gradient"), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            guided[i], relu_net_gradient(x[i], t, p, "guided"), rtol=1e-4, atol=1e-6
        )
    assert np.abs(guided - plain).max() > 1e-3 * np.abs(plain).max()


def test_deconvnet_differs_from_guided():
    model, _ = conv_net("Relu")
    x = images(1)
    guided = gradients(model, x, [0], "guided")["signed"]
    deconv = gradients(model, x, [0], "deconvnet")["signed"]
    assert deconv.shape == (1, C, H, W)
    assert not np.allclose(guided, deconv)


def test_smoothgrad_is_seeded_mean_of_noisy_gradients():
    from test_method_graphs import job_for

    model, _ = conv_net("Relu")
    x = images(1)
    options = dict(samples=6, noise_level=0.2)

    def heat(seed: int) -> np.ndarray:  # explain's SmoothGrad, 4 rows per call: two calls
        job = job_for(model, {}, x, [2], batch_size=4, seed=seed, **options)
        return next(run_method(job, "smoothgrad"))[1]

    a = heat(3)
    assert np.array_equal(a, heat(3))
    assert not np.allclose(a, heat(4))
    # the definition: the mean signed gradient at x + sigma * noise, sigma = 0.2 * (max - min)
    noisy = x[0] + np.float32(0.2 * (x.max() - x.min())) * bp.unit_noise(6, x.shape[1:], 3)
    assert abs(float((noisy - x[0]).std()) - 0.2 * float(x.max() - x.min())) < 0.05
    ref = gradients(model, noisy, [2] * 6)["signed"].mean(axis=0)
    graph = bp.smoothgrad_graph(model, 1, 4, 0.2)  # 6 samples: 4 + 2 (padded with weight 0)
    signed = Runner(graph, "cpu", 1).run(
        {"images": x, "targets": np.array([2])},
        {"noise": bp.unit_noise(6, x.shape[1:], 3), "weights": np.full(6, 1 / 6, np.float32)},
    )["signed"][0]
    np.testing.assert_allclose(signed, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a, np.abs(ref).max(axis=0), rtol=1e-4, atol=1e-6)


def test_integrated_gradients_linear_is_exact():
    model, w = linear_model()
    x = images(1)[0]
    for method in ("gausslegendre", "riemann_left"):
        attr, err = integrated(model, x, 2, steps=10, baseline="zero", method=method)
        np.testing.assert_allclose(attr, x * w[2], rtol=1e-4, atol=1e-5)
        assert err < 1e-4
    base = RNG.normal(size=x.shape).astype(np.float32)
    attr, err = integrated(model, x, 1, steps=5, baseline=base)
    np.testing.assert_allclose(attr, (x - base) * w[1], rtol=1e-4, atol=1e-5)
    # captum's trapezoid weights sum to 1 - 1/n: kept for agreement, visible in completeness.
    _, err = integrated(model, x, 1, steps=10, method="riemann_trapezoid")
    assert abs(err - 0.1) < 1e-3


def test_integrated_gradients_completeness_on_smooth_model():
    model, _ = conv_net("Tanh")
    x = images(1)[0]
    _, err = integrated(model, x, 3, steps=16, baseline="zero")  # 18 points in calls of 8
    assert err < 1e-2
    pre = {"scale": 255.0, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    black = bp.make_baseline("black", x, pre)
    np.testing.assert_allclose(black[:, 0, 0], [-2.5, -1.6, -1.0], rtol=1e-6)
    _, err = integrated(model, x, 3, steps=32, baseline="black", pre=pre)
    assert err < 1e-2


def test_bad_arguments_are_named():
    from test_method_graphs import job_for

    model, _ = linear_model()
    card = {"preprocess": {"scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3}}
    with pytest.raises(ConfigError, match="baseline"):
        list(
            run_method(
                job_for(model, card, images(1), [0], steps=4, baseline="grey"),
                "integrated_gradients",
            )
        )
    with pytest.raises(ConfigError, match="method"):
        list(
            run_method(
                job_for(model, card, images(1), [0], steps=4, method="simpson"),
                "integrated_gradients",
            )
        )
    with pytest.raises(ConfigError, match="samples"):
        list(run_method(job_for(model, card, images(1), [0], samples=0), "smoothgrad"))


def test_signed_rgb_maps_zero_to_grey():
    g = np.zeros((3, 4, 5), np.float32)
    g[0, 0, 0], g[1, 1, 1] = 1.0, -1.0
    rgb = bp.signed_rgb(g, percentile=100)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[2, 2]) == (128, 128, 128)
    assert rgb[0, 0, 0] == 255 and rgb[1, 1, 1] == 0


def test_final_softmax_is_skipped_and_logits_exposed():
    w = RNG.normal(size=(K, C * H * W)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["scores"], transB=1),
        helper.make_node("Softmax", ["scores"], ["logits"], axis=1),
    ]
    model = _model(nodes, {"w": w})
    x = images(2)
    np.testing.assert_allclose(
        gradients(model, x, [1, 2], images=4)["signed"],
        w.reshape(K, C, H, W)[[1, 2]],
        rtol=1e-5,
        atol=1e-6,
    )
    _, err = integrated(model, x[0], 3, steps=4, rows=4)  # completeness on the logits
    assert err < 1e-4
