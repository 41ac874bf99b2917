"""Each method as one graph (cnnviz.methodgraph) run by the one runner (cnnviz.runner) gives the
maps of the step-by-step reference implementations (tests/reference_methods.py: plain sessions
over the engine's backward graphs and numpy, on the host): on a tiny two-layer CNN, with the
runner's chunking, padding and sums across calls exercised, and on EfficientNet-Lite0 (ReLU6,
depthwise strided convs, TF-same pads). The graphs themselves are held to the torch peers in
test_cam_peers / test_backprop_peers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import reference_methods as ref
from cnnviz.methods import backprop as bp
from cnnviz.methods import cam
from cnnviz.methods.explain import Job, run_method, spread_layers
from cnnviz.methods.projections import ProjectionRunner
from cnnviz.modelcard import load_card, model_path
from cnnviz.registry import CAM_FAMILY
from cnnviz.runner import Runner, chunk_plan
from cnnviz.runtime import make_session
from test_activations import tiny_model

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tiny() -> tuple[onnx.ModelProto, dict]:
    model, card = tiny_model([[], [1]])
    card["preprocess"] = {
        "size": [8, 8],
        "resize": "stretch",
        "scale": 255.0,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "channel_order": "RGB",
    }
    return model, card


def images(n: int, side: int) -> np.ndarray:
    return RNG.normal(size=(n, 3, side, side)).astype(np.float32)


def job_for(model, card, x, targets, batch_size: int = 2, **options) -> Job:  # noqa: ANN001
    views = [np.zeros((1, 1, 3), np.uint8)] * len(x)
    return Job(
        model,
        card,
        [f"i{i}" for i in range(len(x))],
        x,
        views,
        [(i, int(t)) for i, t in enumerate(targets)],
        options,
        "cpu",
        1,
        batch_size,
    )


def maps_of(job: Job, method: str) -> tuple[np.ndarray, list]:
    results = list(run_method(job, method))
    return np.stack([raw for _, raw, _, _ in results]), results


# ---- the runner --------------------------------------------------------------------------------
def test_chunk_plan_fits_the_rows():
    assert chunk_plan(1, 8) == (8, 1)
    assert chunk_plan(25, 64) == (2, 25)
    assert chunk_plan(52, 8) == (1, 8)  # points split over calls


def test_runner_pads_chunks_and_sums_points_over_calls(tiny):
    """5 images in calls of 2 (the last padded), 7 noise samples in calls of 3 (padded with
    weight 0): the same SmoothGrad as one call holding everything."""
    model, _ = tiny
    x, t = images(5, 8), np.array([0, 1, 1, 0, 1])
    noise = bp.unit_noise(7, (3, 8, 8), seed=3)
    weights = np.full(7, 1 / 7, np.float32)
    whole = Runner(bp.smoothgrad_graph(model, 5, 7, 0.2), "cpu", 1).run(
        {"images": x, "targets": t}, {"noise": noise, "weights": weights}
    )["signed"]
    split = Runner(bp.smoothgrad_graph(model, 2, 3, 0.2), "cpu", 1).run(
        {"images": x, "targets": t}, {"noise": noise, "weights": weights}
    )["signed"]
    assert whole.shape == split.shape == (5, 3, 8, 8)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-7)
    session = ref.gradient_session(model, "gradient", 7, "cpu", 1)
    for i in range(5):  # the reference: the same noisy points through the plain gradient
        want = ref.smoothgrad_gradient(session, x[i], int(t[i]), 7, 0.2, seed=3, batch_size=7)
        np.testing.assert_allclose(whole[i], want, rtol=1e-4, atol=1e-6)


# ---- every method against its reference on the tiny model -------------------------------------
def test_cam_family_from_one_graph(tiny):
    model, card = tiny
    x, t = images(3, 8), [0, 1, 1]
    from cnnviz.methods.explain import cam_family

    out = {}
    job = job_for(model, card, x, t)
    results = cam_family(job, list(CAM_FAMILY))
    graph, _ = cam.build_cam_model(model, card, None, 3)
    want = ref.grad_cam_family(make_session(graph, "cpu", 1), card, x, t)
    for variant in cam.VARIANTS:
        out[variant] = np.stack([r[1] for r in results[variant]])
        np.testing.assert_allclose(out[variant], want[variant], atol=2e-5)
    guided = ref.input_gradients(ref.gradient_session(model, "guided", 3, "cpu", 1), x, t)
    signed = np.stack([r[2] for r in results["guided_gradcam"]])
    np.testing.assert_allclose(signed, ref.guided_grad_cam(want["gradcam"], guided), atol=1e-5)


@pytest.mark.parametrize(
    "method, policy",
    [("saliency", "gradient"), ("guided_backprop", "guided"), ("deconvnet", "deconvnet")],
)
def test_input_gradient_methods(tiny, method, policy):
    model, card = tiny
    x, t = images(3, 8), [1, 0, 1]
    maps, results = maps_of(job_for(model, card, x, t), method)
    want = ref.input_gradients(ref.gradient_session(model, policy, 3, "cpu", 1), x, t)
    np.testing.assert_allclose(maps, bp.channel_max_abs(want), rtol=1e-5, atol=1e-7)
    if method != "saliency":  # the signed signal comes back for the picture
        np.testing.assert_allclose(np.stack([r[2] for r in results]), want, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_and_completeness(tiny):
    model, card = tiny
    x, t = images(2, 8), [1, 0]
    # batch 4: the 10 path points + 2 end points take three calls per image
    job = job_for(model, card, x, t, batch_size=4, steps=10)
    maps, results = maps_of(job, "integrated_gradients")
    session = ref.gradient_session(model, "gradient", 12, "cpu", 1)
    for i in range(2):
        attr, error = ref.integrated_gradients(
            session, x[i], t[i], steps=10, pre=card["preprocess"]
        )
        np.testing.assert_allclose(maps[i], np.abs(attr).max(axis=0), rtol=1e-4, atol=1e-6)
        assert results[i][3]["completeness_error"] == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_occlusion_with_patches_cut_at_the_border(tiny):
    model, card = tiny
    x, t = images(2, 8), [0, 1]
    # window 3, stride 2 on 8 pixels: the last patch sticks out and is cut (captum's rule)
    maps, _ = maps_of(job_for(model, card, x, t, window=3, stride=2), "occlusion")
    session = make_session(model, "cpu", 1)
    for i in range(2):
        np.testing.assert_allclose(
            maps[i], ref.occlusion(session, card, x[i], t[i], 3, 2), atol=1e-6
        )


def test_score_cam_scores_each_distinct_channel_once(tiny):
    model, card = tiny
    x, t = images(2, 8), [1, 0]
    maps, results = maps_of(job_for(model, card, x, t, batch_size=2), "scorecam")
    forward = make_session(model, "cpu", 1)
    tensor = cam.layer_tensor(card, None)
    from cnnviz.graph import expose

    acts = make_session(expose(model, [tensor]), "cpu", 1).run([tensor], {"input": x})[0]
    for i in range(2):
        info: dict = {}
        want = ref.score_cam(forward, card, x[i : i + 1], t[i], acts[i], 3, info=info)
        np.testing.assert_allclose(maps[i], want, atol=1e-5)
        assert results[i][3]["forward_passes"] == info["forward_passes"]


def test_projections_from_one_graph(tiny):
    model, card = tiny
    x = images(3, 8)
    layers = [row["name"] for row in card["layers"]]
    new = ProjectionRunner(model, card, layers, 2, images=2, device="cpu", threads=1,
                           policy="deconvnet")
    old = ref.Projector(model, card, layers, 2, "cpu", 1)
    got = new.project_layers(x, 2)
    for i in range(3):
        want = old.project_layers(x[i : i + 1], 2)
        for layer in layers:
            for a, b in zip(got[layer][i], want[layer][0], strict=True):
                assert (a["channel"], a["position"], a["bbox"]) == (
                    b["channel"],
                    b["position"],
                    b["bbox"],
                )
                assert a["value"] == pytest.approx(b["value"], rel=1e-6)
                np.testing.assert_allclose(a["projection"], b["projection"], atol=1e-6)


# ---- EfficientNet-Lite0: ReLU6, depthwise strided convs, TF-same pads -----------------------
@pytest.fixture(scope="module")
def effnet(effnet_dir: Path):  # noqa: ANN201
    card = load_card(effnet_dir)
    model = onnx.load(str(model_path(effnet_dir)))
    from cnnviz.images import preprocess
    from PIL import Image
    from skimage import data

    x = np.stack(
        [
            preprocess(Image.fromarray(getattr(data, name)()), card["preprocess"])
            for name in ("chelsea", "coffee")
        ]
    ).astype(np.float32)
    t = make_session(model, "cpu", 2).run(None, {card["input"]["name"]: x})[0].argmax(1)
    return model, card, x, [int(v) for v in t]


@pytest.mark.slow
def test_effnet_every_gradient_method_matches_its_reference(effnet):
    model, card, x, t = effnet
    job = job_for(model, card, x, t, batch_size=2, samples=3, steps=4)
    graph, _ = cam.build_cam_model(model, card, None, 2)
    cams = ref.grad_cam_family(make_session(graph, "cpu", 2), card, x, t)
    for variant in cam.VARIANTS:
        got, _ = maps_of(job, variant)
        np.testing.assert_allclose(got, cams[variant], atol=5e-5)
    for method, policy in [
        ("saliency", "gradient"),
        ("guided_backprop", "guided"),
        ("deconvnet", "deconvnet"),
    ]:
        got, _ = maps_of(job, method)
        want = ref.input_gradients(ref.gradient_session(model, policy, 2, "cpu", 2), x, t)
        np.testing.assert_allclose(got, bp.channel_max_abs(want), rtol=1e-4, atol=1e-6)
    got, _ = maps_of(dataclasses.replace(job, rows=job.rows[:1]), "integrated_gradients")
    attr, _ = ref.integrated_gradients(
        ref.gradient_session(model, "gradient", 6, "cpu", 2), x[0], t[0], steps=4
    )
    np.testing.assert_allclose(got[0], np.abs(attr).max(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_effnet_projections_match_the_projector(effnet):
    model, card, x, _ = effnet
    layers = spread_layers(card, 2)
    runner = ProjectionRunner(model, card, layers, 2, 2, "cpu", 2, policy="deconvnet")
    got = runner.project_layers(x, 2)
    projector = ref.Projector(model, card, layers, 2, "cpu", 2)
    for i in range(2):
        want = projector.project_layers(x[i : i + 1], 2)
        for layer in layers:
            for a, b in zip(got[layer][i], want[layer][0], strict=True):
                assert (a["channel"], a["position"]) == (b["channel"], b["position"])
                scale = np.abs(b["projection"]).max()
                np.testing.assert_allclose(a["projection"], b["projection"], atol=1e-4 * scale)


def test_cuda_sessions_compute_in_full_fp32(monkeypatch):
    """The CUDA provider is asked for fp32 convolutions (no TF32), and the CPU stays the
    fallback: TF32 moved input-gradient maps to r 0.993 against the CPU on an H200."""
    from cnnviz import runtime

    monkeypatch.setattr(runtime, "cuda_usable", lambda: True)
    providers = runtime.providers_for("cuda")
    assert providers[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert providers[1:] == ["CPUExecutionProvider"]
    assert runtime.providers_for("cpu") == ["CPUExecutionProvider"]
