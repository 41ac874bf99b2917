"""Eigen-CAM, Ablation-CAM and RISE as cnnviz explain runs them (the graphs of
`cnnviz.methods.gradient_free` through the one runner), on tiny ONNX models against numpy
references of their definitions and known values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.methods import gradient_free as gf
from cnnviz.methods.cam import interpolation_matrix
from cnnviz.runner import Runner
from cnnviz.runtime import make_session
from onnx import TensorProto, helper
from onnx_build import finish_model

C, H, W, K = 3, 8, 8, 4
RNG = np.random.default_rng(11)


def _card(layers: list[tuple[str, str, list[int]]], classes: int = K,
          kind: str = "logits") -> dict:
    return {
        "name": "tiny",
        "input": {"name": "input", "shape": ["batch", C, H, W]},
        "output": {"name": "logits", "kind": kind, "num_classes": classes},
        "labels": [f"class{i}" for i in range(classes)],
        "layers": [
            {"name": n, "tensor": t, "conv_output": t, "shape": s, "depth": i}
            for i, (n, t, s) in enumerate(layers)
        ],
    }


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None]))


# ---- conv -> relu (A, 6 x 8 x 8) -> GAP -> Gemm; plus a skip path from the input -----------
P = {
    "w1": RNG.normal(0, 0.6, size=(6, C, 3, 3)).astype(np.float32),
    "b1": np.array([0.1, -0.2, 0.05, -50.0, 0.2, 0.0], np.float32),  # channel 3 is dead (zeros)
    "wf": RNG.normal(size=(K, 6)).astype(np.float32),
    "bf": np.array([3.0, 2.5, 4.0, 3.5], np.float32),
    "ws": RNG.normal(0, 0.3, size=(K, C)).astype(np.float32),
}


def _net(skip: bool) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["A"]),
        helper.make_node("GlobalAveragePool", ["A"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["head" if skip else "logits"], transB=1),
    ]
    inits = {k: v for k, v in P.items() if skip or k != "ws"}
    if skip:  # logits += ws @ mean(input): a path around the layer the tail must be fed
        nodes += [
            helper.make_node("GlobalAveragePool", ["input"], ["gi"]),
            helper.make_node("Flatten", ["gi"], ["fi"]),
            helper.make_node("Gemm", ["fi", "ws"], ["side"], transB=1),
            helper.make_node("Add", ["head", "side"], ["logits"]),
        ]
    return finish_model(nodes, inits, *[[v] for v in _io()], "gap_net")


NET, SKIP_NET = _net(False), _net(True)
CARD = _card([("conv1", "A", [6, H, W])])
# more channels (16) than positions (2 x 2): Eigen-CAM's other Gram matrix
WIDE = finish_model(
    [
        helper.make_node("Conv", ["input", "w16"], ["c1"], pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["A"]),
        helper.make_node("GlobalAveragePool", ["A"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ],
    {"w16": RNG.normal(size=(16, C, 3, 3)).astype(np.float32)}, *[[v] for v in _io()], "wide",
)
WIDE_CARD = _card([("conv1", "A", [16, 2, 2])], classes=16)


def _acts(x: np.ndarray, model: onnx.ModelProto = NET) -> np.ndarray:
    from cnnviz.graph import cut_at

    session = make_session(cut_at(model, ["A"]), "cpu", 1)
    return session.run(None, {"input": x})[0].astype(np.float64)


def _minmax(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / max(m.max() - m.min(), 1e-30)


def _finish(raw: np.ndarray) -> np.ndarray:
    """The CAM finish (cam._finish_in_graph) at input resolution: ReLU, normalise twice."""
    return _minmax(_minmax(np.maximum(raw, 0)))


# ---- Eigen-CAM ---------------------------------------------------------------------------
def _eigen_reference(a: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection_with_sign_correction on one image's maps."""
    x = a.reshape(len(a), -1).T
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    projection = (x @ vt[0]).reshape(a.shape[1:])
    return -projection if abs(projection.min()) > abs(projection.max()) else projection


@pytest.mark.parametrize("wide", [False, True])
def test_eigencam_is_the_first_principal_component_with_the_sign_rule(wide):
    """6 channels over 8 x 8 positions (the C x C Gram matrix) and 16 over 2 x 2 (hw x hw)."""
    model, card = (WIDE, WIDE_CARD) if wide else (NET, CARD)
    x = RNG.normal(size=(3, C, H, W)).astype(np.float32)
    out = Runner(gf.eigencam_graph(model, card, None, 2), "cpu", 1).run({"images": x})  # 2 calls
    a = _acts(x, model)
    for i in range(len(x)):
        want = _eigen_reference(a[i])
        got = out["projection"][i]
        # the projection up to a positive factor (the graph never scales by s1): the same sign
        cos = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.9999, (i, cos)
        if not wide:  # 2 x 2 upsampled: compared at the layer's size above
            np.testing.assert_allclose(out["map"][i], _finish(want), atol=1e-4)
        assert abs(got.max()) >= abs(got.min())  # the sign rule: the largest magnitude positive


def test_eigencam_sign_rule_and_known_component():
    """Maps that vary along one known direction: A_c(u) = q_c * f(u) (+ a constant per
    channel, removed by centring). The projection is +-|q| (f - mean f); f has a large positive
    bump, so the sign rule keeps that bump positive whichever sign the SVD returns, and flipping
    every channel's weights (q -> -q) gives the same map."""
    from cnnviz.methods.cam import layer_tensor

    f = np.zeros((H, W))
    f[5:7, 1:3] = 4.0
    f[0, 7] = -1.0
    q = RNG.uniform(0.5, 1.5, size=6)
    for sign in (1.0, -1.0):
        maps = (sign * q[:, None, None] * f[None] + 2.0).astype(np.float32)
        model = _identity_layer_model(maps)
        card = _card([("given", "A", [6, H, W])])
        assert layer_tensor(card, None) == "A"
        out = Runner(gf.eigencam_graph(model, card, None, 1), "cpu", 1).run(
            {"images": np.zeros((1, C, H, W), np.float32)}
        )
        centred = f - f.mean()
        np.testing.assert_allclose(
            out["projection"][0] / np.abs(out["projection"][0]).max(),
            centred / np.abs(centred).max(), atol=1e-5)
        np.testing.assert_allclose(out["map"][0], _finish(centred), atol=1e-5)


def _identity_layer_model(maps: np.ndarray) -> onnx.ModelProto:
    """A model whose layer A is `maps` [C', H, W] + 0 * input (broadcast over the batch)."""
    nodes = [
        helper.make_node("ReduceSum", ["input"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["z", "maps"], ["A"]),
        helper.make_node("GlobalAveragePool", ["A"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    inits = {"zero": np.zeros(1, np.float32), "maps": maps[None], "wf": P["wf"], "bf": P["bf"]}
    return finish_model(nodes, inits, *[[v] for v in _io()], "given_maps")


# ---- Ablation-CAM ------------------------------------------------------------------------
def _ablation_reference(x: np.ndarray, target: int, skip: bool) -> np.ndarray:
    """pytorch-grad-cam's AblationCAM written out: y_k with channel k zeroed; the tail here is
    GAP + Gemm (+ the input path), so y_k = y - wf[t, k] mean(A_k)."""
    a = _acts(x[None])[0]
    y = a.mean(axis=(1, 2)) @ P["wf"][target].astype(np.float64) + P["bf"][target]
    if skip:
        y += x.mean(axis=(1, 2)) @ P["ws"][target].astype(np.float64)
    ablated = np.array([y - P["wf"][target, k] * a[k].mean() for k in range(len(a))])
    weights = (y - ablated) / y
    return _finish((weights[:, None, None] * a).sum(0)), weights


@pytest.mark.parametrize("skip", [False, True])
def test_ablationcam_matches_the_definition(skip):
    model = SKIP_NET if skip else NET
    x = RNG.uniform(-1, 1, size=(2, C, H, W)).astype(np.float32)
    acts_graph, scores_graph, finish_graph, tensor = gf.ablation_graphs(model, CARD, None, 2, 4)
    assert tensor == "A"
    assert ("images" in scores_graph.image_inputs) == skip  # only a path around the layer reads it
    acts = Runner(acts_graph, "cpu", 1).run({"images": x})["acts"]
    scorer = Runner(scores_graph, "cpu", 1)
    weights = []
    for i, target in enumerate([0, 2]):
        channels = gf.ablation_plan(acts[i])
        assert 3 not in channels and len(channels) == 5  # the dead channel is not run
        w, score = gf.ablation_weights(scorer, x[i : i + 1], acts[i : i + 1], target, channels)
        want_map, want_w = _ablation_reference(x[i], target, skip)
        np.testing.assert_allclose(w, want_w, rtol=1e-4, atol=1e-5)
        weights.append(w)
    maps = Runner(finish_graph, "cpu", 1).run({"acts": acts, "weights": np.stack(weights)})
    for i, target in enumerate([0, 2]):
        np.testing.assert_allclose(maps["map"][i], _ablation_reference(x[i], target, skip)[0],
                                   atol=1e-4)


def test_ablation_scores_are_the_tail_run_on_zeroed_channels():
    """Every channel, calls of 4 with padding: each score equals a plain forward of the model
    with that channel's conv bias driven to -inf (the channel dead): the tail is the model's."""
    x = RNG.uniform(-1, 1, size=(1, C, H, W)).astype(np.float32)
    acts_graph, scores_graph, _, _ = gf.ablation_graphs(NET, CARD, None, 1, 4)
    assert "images" not in scores_graph.image_inputs  # the tail does not read the input
    acts = Runner(acts_graph, "cpu", 1).run({"images": x})["acts"]
    out = Runner(scores_graph, "cpu", 1).run({"acts": acts, "targets": np.array([1])},
                                             {"channels": np.arange(6)})
    forward = make_session(NET, "cpu", 1)
    assert out["score"][0] == pytest.approx(forward.run(None, {"input": x})[0][0, 1], rel=1e-5)
    for k in range(6):
        dead = onnx.ModelProto()
        dead.CopyFrom(NET)
        b1 = P["b1"].copy()
        b1[k] = -1e6
        init = next(i for i in dead.graph.initializer if i.name == "b1")
        init.CopyFrom(onnx.numpy_helper.from_array(b1, "b1"))
        want = make_session(dead, "cpu", 1).run(None, {"input": x})[0][0, 1]
        assert out["scores"][0, k] == pytest.approx(want, rel=1e-5, abs=1e-5), k


# ---- RISE --------------------------------------------------------------------------------
def test_rise_upsampling_is_skimage_resize_reflect():
    transform = pytest.importorskip("skimage.transform")
    for s, up in [(7, 256), (3, 12), (8, 36), (1, 5), (2, 9)]:
        grid = RNG.random((s, s))
        want = transform.resize(grid, (up, up), order=1, mode="reflect", anti_aliasing=False)
        m = gf.rise_upsampling(up, s)
        np.testing.assert_allclose(m @ grid @ m.T, want, atol=1e-12)
    # inside the outer half cell it is plain bilinear (half-pixel centres)
    np.testing.assert_allclose(gf.rise_upsampling(12, 3)[2:10], interpolation_matrix(12, 3)[2:10])


def _rise_reference(session, x: np.ndarray, target: int, grids: np.ndarray,
                    shifts: np.ndarray, p: float, probabilities: bool,
                    estimator: str = "paper") -> np.ndarray:
    """The paper's code (Petsiuk et al., RISE generate_masks / explain) with the given draws;
    `estimator` coverage divides by each pixel's mask sum instead of N p."""
    transform = pytest.importorskip("skimage.transform")
    s = grids.shape[-1]
    cell = np.ceil(np.array([H, W]) / s).astype(int)
    up = (s + 1) * cell
    masks = np.stack([
        transform.resize(g, up, order=1, mode="reflect", anti_aliasing=False)[
            dx : dx + H, dy : dy + W]
        for g, (dx, dy) in zip(grids.astype(np.float64), shifts, strict=True)
    ])
    logits = session.run(None, {"input": (x[None] * masks[:, None]).astype(np.float32)})[0]
    if not probabilities:
        e = np.exp(logits - logits.max(1, keepdims=True))
        logits = e / e.sum(1, keepdims=True)
    total = np.tensordot(logits[:, target].astype(np.float64), masks, 1)
    return total / len(masks) / p if estimator == "paper" else total / masks.sum(0)


def _rise(model, card, x, targets, grids, shifts, p, images=2, points=16,
          estimator="paper") -> np.ndarray:
    graph = gf.rise_graph(model, card, images, points, grids.shape[-1])
    out = Runner(graph, "cpu", 1).run(
        {"images": x, "targets": np.asarray(targets, np.int64)},
        {"grids": grids, "shifts": shifts},
    )
    return np.stack([gf.rise_finish(t, c, estimator, len(grids), p)
                     for t, c in zip(out["map"], out["coverage"], strict=True)])


def test_rise_matches_the_papers_algorithm_on_the_same_masks():
    x = RNG.uniform(-1, 1, size=(3, C, H, W)).astype(np.float32)
    p = 0.4
    grids, shifts = gf.rise_masks(70, 3, p, seed=5, size=(H, W))  # 70 = 4 calls of 16 + 6
    assert shifts.max() < 3 and shifts.min() >= 0  # cell = ceil(8 / 3)
    session = make_session(NET, "cpu", 1)
    for estimator in ("paper", "coverage"):
        ours = _rise(NET, CARD, x, [0, 3, 1], grids, shifts, p, estimator=estimator)
        for i, target in enumerate([0, 3, 1]):
            want = _rise_reference(session, x[i], target, grids, shifts, p, False, estimator)
            np.testing.assert_allclose(ours[i], want, rtol=1e-4, atol=1e-6)
    # seeded: the same draws again, other draws for another seed
    again = gf.rise_masks(70, 3, p, seed=5, size=(H, W))
    assert all(np.array_equal(u, v) for u, v in zip(again, (grids, shifts), strict=True))
    assert not np.array_equal(gf.rise_masks(70, 3, p, seed=6, size=(H, W))[0], grids)


def test_rise_peaks_on_the_region_the_score_reads():
    """A 'model' whose class-0 output is the mean of rows 1..3, columns 4..6 of channel 0 (a
    probability already): the saliency is E[mean_R(x M) M(u)] / p, largest over R."""
    region = np.zeros((H, W), np.float32)
    region[1:4, 4:7] = 1.0 / 9
    weights = np.zeros((2, C * H * W), np.float32)
    weights[0, : H * W] = region.ravel()
    weights[1] = 1.0 / (C * H * W)
    model = finish_model(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Gemm", ["flat", "wr"], ["logits"], transB=1)],
        {"wr": weights}, *[[v] for v in _io()], "region_mean",
    )
    card = _card([], classes=2, kind="probabilities")
    p = 0.5
    grids, shifts = gf.rise_masks(2000, 4, p, seed=0, size=(H, W))
    x = np.ones((1, C, H, W), np.float32)
    session = make_session(model, "cpu", 1)
    for estimator in ("paper", "coverage"):
        saliency = _rise(model, card, x, [0], grids, shifts, p, 1, 256, estimator)[0]
        want = _rise_reference(session, x[0], 0, grids, shifts, p, True, estimator)
        np.testing.assert_allclose(saliency, want, rtol=1e-4, atol=1e-6)
        inside = region > 0
        assert inside[np.unravel_index(saliency.argmax(), saliency.shape)], estimator
        assert saliency[inside].min() > saliency[~inside].mean() + 0.05, estimator
        # far from the region a pixel's mask is nearly independent of the score: E[P] = p
        assert saliency[7, 0] == pytest.approx(p, abs=0.05), estimator


def test_rise_options_are_checked():
    from cnnviz.errors import ConfigError

    with pytest.raises(ConfigError, match="0 < p <= 1"):
        gf.rise_masks(10, 3, 0.0, 0, (H, W))
    with pytest.raises(ConfigError, match="coverage or paper"):
        gf.rise_finish(np.ones((H, W)), np.ones((H, W)), "mean", 10, 0.5)
    from cnnviz import registry

    rise = registry.METHODS["rise"].options  # declared once, in the registry
    assert rise["estimator"].schema["enum"] == ["coverage", "paper"]
    assert registry.METHODS["eigencam"].cam_layer and registry.METHODS["ablationcam"].cam_layer


# ---- the explain entry points ------------------------------------------------------------
def _job(options: dict, rows: list[tuple[int, int]], x: np.ndarray):
    from cnnviz.methods.explain import Job

    return Job(NET, CARD, [f"img{i}" for i in range(len(x))], x, [], rows, options, "cpu", 1, 3)


def _defaults(method: str, **changed) -> dict:
    from cnnviz import registry

    return registry.with_defaults(method, {}) | changed


def test_run_functions_give_one_finished_map_per_row():
    x = RNG.uniform(-1, 1, size=(3, C, H, W)).astype(np.float32)
    rows = [(0, 0), (2, 1), (0, 3), (1, 2)]
    eigen = list(gf.run_eigencam(_job(_defaults("eigencam"), rows, x)))
    ablation = list(gf.run_ablationcam(_job(_defaults("ablationcam", batch_size=4), rows, x)))
    rise = list(gf.run_rise(_job(_defaults("rise", masks=40, grid=3, batch_size=16), rows, x)))
    a = _acts(x)
    for results in (eigen, ablation, rise):
        assert [r[0] for r in results] == [i for i, _ in rows]
        for _, raw, signed, _ in results:
            assert raw.shape == (H, W) and raw.dtype == np.float32 and signed is None
    for (i, _target), (_, raw, _, info) in zip(rows, eigen, strict=True):
        np.testing.assert_allclose(raw, _finish(_eigen_reference(a[i])), atol=1e-4)
        assert info == {"layer": "A"}
    for (i, target), (_, raw, _, info) in zip(rows, ablation, strict=True):
        np.testing.assert_allclose(raw, _ablation_reference(x[i], target, False)[0], atol=1e-4)
        assert info["ablated"] == 5 and info["channels"] == 6
    grids, shifts = gf.rise_masks(40, 3, 0.5, 0, (H, W))
    session = make_session(NET, "cpu", 1)
    for (i, target), (_, raw, _, info) in zip(rows, rise, strict=True):
        want = _rise_reference(session, x[i], target, grids, shifts, 0.5, False, "coverage")
        np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-6)
        assert info["masks"] == 40
