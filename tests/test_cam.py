"""Class activation maps, as cnnviz explain runs them (the method graphs `cam.cam_graph` and
`cam.scorecam_graphs` through the one runner), on tiny ONNX models against numpy references of
their definitions written out by hand."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import reference_methods as ref
from cnnviz.errors import ConfigError
from cnnviz.methods import cam
from cnnviz.methods.explain import score_channels
from cnnviz.runner import Runner
from cnnviz.runtime import make_session
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper
from onnx_build import finish_model

C, H, W, K = 3, 8, 8, 4
RNG = np.random.default_rng(3)


def _model(nodes, inits, name="tiny") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])
    return finish_model(nodes, inits, [x], [y], name)


def _card(layers: list[tuple[str, str, list[int]]], classes: int = K) -> dict:
    return {
        "name": "tiny",
        "input": {"name": "input", "shape": ["batch", C, H, W]},
        "output": {"name": "logits", "kind": "logits", "num_classes": classes},
        "labels": [f"class{i}" for i in range(classes)],
        "layers": [
            {"name": n, "tensor": t, "conv_output": t, "shape": s, "depth": i}
            for i, (n, t, s) in enumerate(layers)
        ],
    }


# ---- a two-conv net: maxpool -> conv -> relu (a1) -> conv -> relu (a2) -> GAP -> Gemm ----------
P = {
    "w1": RNG.normal(0, 0.5, size=(5, C, 3, 3)).astype(np.float32),
    "b1": RNG.normal(0, 0.1, size=5).astype(np.float32),
    "w2": RNG.normal(0, 0.5, size=(6, 5, 3, 3)).astype(np.float32),
    "b2": RNG.normal(0, 0.1, size=6).astype(np.float32),
    "wf": RNG.normal(size=(K, 6)).astype(np.float32),
    "bf": RNG.normal(size=K).astype(np.float32),
}
NET = _model(
    [
        helper.make_node("MaxPool", ["input"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ],
    P,
)
NET_CARD = _card([("conv1", "a1", [5, 4, 4]), ("conv2", "a2", [6, 4, 4])])


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3, pad 1, stride 1; x [N, Ci, h, w] -> [N, Co, h, w]."""
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3))
    return np.einsum("nchwab,ocab->nohw", windows, w) + b[None, :, None, None]


def _net_numpy(x: np.ndarray, targets: list[int]):
    """A1, A2, logits and d logit_t / dA1, d logit_t / dA2, by hand."""
    x = x.astype(np.float64)
    n = len(x)
    pooled = x.reshape(n, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))
    a1 = np.maximum(_conv(pooled, P["w1"], P["b1"]), 0)
    c2 = _conv(a1, P["w2"], P["b2"])
    a2 = np.maximum(c2, 0)
    logits = a2.mean(axis=(2, 3)) @ P["wf"].T + P["bf"]
    g2 = np.broadcast_to(P["wf"][targets][:, :, None, None] / 16.0, a2.shape)
    gc2 = g2 * (c2 > 0)
    # Transposed conv of the c2 gradient: correlate with the flipped, channel-swapped kernel.
    flipped = P["w2"][:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    g1 = _conv(gc2, flipped, np.zeros(5))
    return a1, a2, logits, g1, np.array(g2)


def _bilinear_naive(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize INTER_LINEAR by the textbook formula, one output pixel at a time."""
    h, w = m.shape
    out = np.zeros(size)
    for i in range(size[0]):
        for j in range(size[1]):
            y = min(max((i + 0.5) * h / size[0] - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / size[1] - 0.5, 0), w - 1)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1]) + fy * (
                (1 - fx) * m[y1, x0] + fx * m[y1, x1]
            )
    return out


def _minmax(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / (m.max() - m.min())


def _reference_maps(a: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    """The variants' definitions written out per image, channel by channel."""
    out: dict[str, list] = {v: [] for v in cam.VARIANTS}
    for ai, gi in zip(a, g, strict=True):
        w_grad = np.array([gk.mean() for gk in gi])
        w_x = [(gk * ak).sum() / (ak.sum() + 1e-7) for ak, gk in zip(ai, gi, strict=True)]
        w_pp = []
        for ak, gk in zip(ai, gi, strict=True):
            alpha = gk**2 / (2 * gk**2 + ak.sum() * gk**3 + 1e-6)
            alpha[gk == 0] = 0
            w_pp.append((np.maximum(gk, 0) * alpha).sum())
        raws = {
            "gradcam": sum(wk * ak for wk, ak in zip(w_grad, ai, strict=True)),
            "gradcampp": sum(wk * ak for wk, ak in zip(w_pp, ai, strict=True)),
            "layercam": sum(np.maximum(gk, 0) * ak for gk, ak in zip(gi, ai, strict=True)),
            "hirescam": sum(gk * ak for gk, ak in zip(gi, ai, strict=True)),
            "xgradcam": sum(wk * ak for wk, ak in zip(w_x, ai, strict=True)),
        }
        for v, raw in raws.items():
            out[v].append(_minmax(_bilinear_naive(_minmax(np.maximum(raw, 0)), (H, W))))
    return {v: np.array(maps) for v, maps in out.items()}


def graph_cams(model, card, x, targets, layer, images, variants=cam.VARIANTS) -> dict:  # noqa: ANN001
    """What cnnviz explain runs: every variant from one graph, `images` images per call."""
    graph = cam.cam_graph(model, card, layer, images, variants)
    out = Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets, np.int64)})
    return {**{v: out[v] for v in variants}, "layer": graph.metadata["layer"]}


@pytest.fixture(scope="module")
def net_sessions():
    """Sessions over the cut vjp graph alone (the engine's A and G, read by the reference)."""
    model1, tensor = cam.build_cam_model(NET, NET_CARD, "conv1", batch=1)
    model2, _ = cam.build_cam_model(NET, NET_CARD, "conv1", batch=2)
    assert tensor == "a1"
    return make_session(model1, "cpu", 1), make_session(model2, "cpu", 1)


def test_grad_cam_family_matches_numpy_definitions(net_sessions):
    x = RNG.normal(size=(3, C, H, W)).astype(np.float32)
    targets = [0, 2, 3]
    a1, _, logits, g1, _ = _net_numpy(x, targets)
    a, g, lo = ref.cam_inputs(net_sessions[1], NET_CARD, x, targets, "conv1")
    np.testing.assert_allclose(a, a1, atol=1e-5)
    np.testing.assert_allclose(g, g1, atol=1e-6)
    np.testing.assert_allclose(lo, logits, atol=1e-5)
    maps = graph_cams(NET, NET_CARD, x, targets, "conv1", images=2)  # one padded call
    assert maps["layer"] == "a1"
    expected = _reference_maps(a1, g1)
    for v in cam.VARIANTS:
        assert maps[v].shape == (3, H, W) and maps[v].dtype == np.float32
        np.testing.assert_allclose(maps[v], expected[v], atol=2e-5, err_msg=v)
    # The variants really differ here (the check above is not one map five times).
    for v, w in itertools.combinations(cam.VARIANTS, 2):
        assert np.abs(maps[v] - maps[w]).max() > 0.05, (v, w)


def test_gradcam_weights_equal_directional_finite_differences(net_sessions):
    from cnnviz.autodiff.finite_diff import gradcam_weights_fd, tail_session

    x = RNG.normal(size=(1, C, H, W)).astype(np.float32)
    a, g, _ = ref.cam_inputs(net_sessions[0], NET_CARD, x, [1], "conv1")
    session, name = tail_session(NET, "a1", threads=1)
    seed = np.eye(K, dtype=np.float32)[1]
    fd = gradcam_weights_fd(session, name, a, seed=seed, eps=1e-2)
    ours = ref.cam_weights("gradcam", a, g)[0]
    np.testing.assert_allclose(ours, fd, rtol=1e-2, atol=1e-4)


def test_default_layer_is_the_last_spatial_conv_and_batches_agree():
    x = RNG.normal(size=(3, C, H, W)).astype(np.float32)
    targets = [3, 1, 1]
    maps = graph_cams(NET, NET_CARD, x, targets, None, images=2, variants=("gradcam",))
    assert maps["layer"] == "a2"
    _, a2, _, _, g2 = _net_numpy(x, targets)
    expected = _reference_maps(a2, g2)
    np.testing.assert_allclose(maps["gradcam"], expected["gradcam"], atol=2e-5)
    # conv1 in calls of 2 (3 images: the last call padded) == one image per call.
    together = graph_cams(NET, NET_CARD, x, targets, "conv1", images=2)
    alone = graph_cams(NET, NET_CARD, x, targets, "conv1", images=1)
    for v in cam.VARIANTS:
        np.testing.assert_allclose(together[v], alone[v], atol=1e-6)


def test_wrong_layer_or_variant_is_named():
    with pytest.raises(ConfigError, match="conv9"):
        cam.cam_graph(NET, NET_CARD, "conv9", 1)
    with pytest.raises(ConfigError, match="nope"):
        cam.cam_graph(NET, NET_CARD, "conv1", 1, variants=("nope",))


def test_interpolation_matches_the_textbook_formula():
    """`cam.interpolation_matrix`, the upsampling weights of every CAM graph."""
    m = RNG.normal(size=(3, 5))
    np.testing.assert_allclose(
        ref.resize_bilinear(m[None], (11, 7))[0], _bilinear_naive(m, (11, 7)), atol=1e-12
    )
    corners = ref.resize_bilinear(m[None], (9, 9), align_corners=True)[0]
    assert np.allclose(corners[[0, 0, -1, -1], [0, -1, 0, -1]], m[[0, 0, -1, -1], [0, -1, 0, -1]])
    assert np.allclose(corners[::4, ::2], m)  # 9 = 2 * (5 - 1) + 1 columns, 4 * (3 - 1) + 1 rows


# ---- Score-CAM on a model whose answer is known -------------------------------------------------
# A = Relu(x[:, 0] * Q): channel k holds the red channel inside quadrant k (channel 4 repeats
# quadrant 0, channel 5 is all zero). logit 0 = 8 * mean of the red channel over quadrant 0,
# logit 1 = 0: only the top-left quadrant matters for class 0.
Q = np.zeros((6, H, W), np.float32)
for k, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4), (0, 0)]):
    Q[k, r : r + 4, c : c + 4] = 1
WQ = np.zeros((2, H * W), np.float32)
WQ[0] = 8.0 * Q[0].reshape(-1) / 16.0
QUAD = _model(
    [
        helper.make_node("Slice", ["input", "s0", "s1", "s_axis"], ["red"]),
        helper.make_node("Mul", ["red", "q"], ["m"]),
        helper.make_node("Relu", ["m"], ["A"]),
        helper.make_node("Flatten", ["red"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wq", "bq"], ["logits"], transB=1),
    ],
    {
        "s0": np.array([0]),
        "s1": np.array([1]),
        "s_axis": np.array([1]),
        "q": Q[None],
        "wq": WQ,
        "bq": np.zeros(2, np.float32),
    },
    "quadrants",
)
QUAD_CARD = _card([("quad", "A", [6, H, W])], classes=2)


def _quad_logits(x: np.ndarray) -> np.ndarray:
    return x[:, 0].reshape(len(x), -1).astype(np.float64) @ WQ.T.astype(np.float64)


def _score_cam_reference(x: np.ndarray, a: np.ndarray, target: int) -> np.ndarray:
    """pytorch-grad-cam's ScoreCAM, channel by channel (the layer is at input resolution)."""
    scores = []
    for ak in a:
        mask = (ak - ak.min()) / (ak.max() - ak.min() + 1e-8)
        scores.append(_quad_logits(x * mask)[0, target])
    weights = np.exp(scores) / np.exp(scores).sum()
    raw = np.maximum(sum(wk * ak for wk, ak in zip(weights, a, strict=True)), 0)
    return _minmax(_bilinear_naive(_minmax(raw), (H, W)))


@pytest.fixture(scope="module")
def quad_runners():
    """explain._scorecam's three graphs: the layer's maps, the channel scores (4 masked inputs
    per call), the weighted maps finished."""
    acts, scores, finish, tensor = cam.scorecam_graphs(QUAD, QUAD_CARD, "quad", 1, 4)
    assert tensor == "A"
    return tuple(Runner(g, "cpu", 1) for g in (acts, scores, finish))


def _score_cam(runners, x: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(map [H, W], layer maps [C, h, w], counts) as cnnviz explain computes Score-CAM."""
    acts_runner, scorer, finisher = runners
    acts = acts_runner.run({"images": x})["acts"]
    weights, counts = score_channels(scorer, x, target, acts[0])
    return finisher.run({"acts": acts, "weights": weights[None]})["map"][0], acts[0], counts


def test_score_cam_finds_the_region_and_matches_the_definition(quad_runners):
    x = RNG.uniform(0.5, 1.0, size=(1, C, H, W)).astype(np.float32)
    heat, a, counts = _score_cam(quad_runners, x, 0)
    assert heat.shape == (H, W) and heat.dtype == np.float32
    assert heat[:4, :4].sum() / heat.sum() > 0.99
    assert heat[:4, :4].min() > 0.4
    np.testing.assert_allclose(heat, _score_cam_reference(x, a, 0), atol=1e-5)
    # 4 distinct quadrant masks + the blank input for the all-zero channel; channel 4 = channel 0.
    assert counts == {"channels": 6, "constant": 1, "forward_passes": 5}
    # every channel scored (no dedupe; 6 channels in calls of 4): the same map
    _, scorer, finisher = quad_runners
    scores = scorer.run({"images": x, "targets": np.array([0])}, {"lowres": a})["scores"][0]
    weights = cam.score_weights(scores.astype(np.float64)).astype(np.float32)
    plain = finisher.run({"acts": a[None], "weights": weights[None]})["map"][0]
    np.testing.assert_allclose(heat, plain, atol=1e-5)
    # Class 1 does not depend on the image: equal weights, so the map is the sum of the maps.
    flat, _, _ = _score_cam(quad_runners, x, 1)
    np.testing.assert_allclose(flat, _minmax(x[0, 0] * Q.sum(0).astype(np.float64)), atol=1e-5)
