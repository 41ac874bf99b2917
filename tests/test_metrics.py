"""Explanation-quality metrics: deletion / insertion, randomization test, class sensitivity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.metrics import perturbation as pt
from cnnviz.metrics.randomization import cut_points, randomizable_layers, randomized_model
from cnnviz.metrics.similarity import rankdata, spearman, ssim
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper
from onnx_build import finish_model

RNG = np.random.default_rng(11)


def _model(nodes, inits, side: int, classes: int, name: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    return finish_model(nodes, inits, [x], [y], name)


# ---- a model whose answer is known: logit 0 = 10 * mean(region of the image) - 5 ----------------
SIDE, REGION = 32, (slice(8, 16), slice(16, 24))  # 64 of 1024 pixels
SCALE, SHIFT = 10.0, 5.0


def region_model() -> onnx.ModelProto:
    """conv (one SIDE x SIDE kernel: the mean of the region over the channels) -> relu -> GAP ->
    gemm: logits = [10 m - 5, 0], so p(class 0) = sigmoid(10 m - 5)."""
    kernel = np.zeros((1, 3, SIDE, SIDE), np.float32)
    kernel[0, :, REGION[0], REGION[1]] = 1.0 / (3 * 64)
    inits = {
        "k": kernel,
        "wf": np.array([[SCALE], [0.0]], np.float32),
        "bf": np.array([-SHIFT, 0.0], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "k"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    return _model(nodes, inits, SIDE, 2, "region")


@pytest.fixture(scope="module")
def region():
    card = {"input": {"name": "input"}, "output": {"name": "logits", "kind": "logits"}}
    scorer = pt.Scorer(make_session(region_model(), "cpu", 1), card, batch_size=64)
    image = RNG.normal(size=(3, SIDE, SIDE)).astype(np.float32)
    image[:, REGION[0], REGION[1]] = 1.0  # m = 1: p = sigmoid(5)
    return scorer, image


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_deletion_insertion_rank_the_ideal_map_best_and_random_maps_near_chance(region):
    scorer, image = region
    grey = np.zeros_like(image)
    steps = 64  # 16 pixels per step

    def curves(saliency, seed=0):
        return pt.perturbation_curves(scorer, image, saliency, 0, steps, grey, seed)

    ideal = np.zeros((SIDE, SIDE))
    ideal[REGION] = 1.0
    best, worst = curves(ideal), curves(1.0 - ideal)
    # Analytic: the region goes first, 16 of its 64 pixels a step (its mean m falls linearly).
    k = np.arange(steps + 1)
    m = np.clip(1.0 - 16 * k / 64, 0.0, 1.0)
    np.testing.assert_allclose(best["deletion"], _sigmoid(SCALE * m - SHIFT), atol=1e-5)
    np.testing.assert_allclose(best["insertion"], _sigmoid(SCALE * (1 - m) - SHIFT), atol=1e-5)
    np.testing.assert_allclose(best["fractions"], k / steps)
    assert best["deletion_auc"] < 0.05 and best["insertion_auc"] > 0.95
    assert worst["deletion_auc"] > 0.95 and worst["insertion_auc"] < 0.05
    # A random order removes the region uniformly: E[m(x)] = 1 - x and, sigmoid being
    # symmetric about m = 1/2, both expected AUCs are 1/2.
    randoms = [curves(np.random.default_rng(s).random((SIDE, SIDE)), seed=s) for s in range(8)]
    deletion = np.mean([r["deletion_auc"] for r in randoms])
    insertion = np.mean([r["insertion_auc"] for r in randoms])
    assert best["deletion_auc"] < deletion < worst["deletion_auc"]
    assert worst["insertion_auc"] < insertion < best["insertion_auc"]
    assert abs(deletion - 0.5) < 0.05 and abs(insertion - 0.5) < 0.05
    # Batching does not change the numbers.
    small = pt.Scorer(scorer.session, {}, batch_size=7)
    again = pt.perturbation_curves(small, image, ideal, 0, steps, grey, 0)
    np.testing.assert_allclose(again["deletion"], best["deletion"], atol=1e-6)


def test_baselines_and_insertion_start_from_the_blurred_image(region):
    from scipy.ndimage import gaussian_filter

    scorer, image = region
    blurred = pt.baseline_image(image, "blur", 2.0)
    for c in range(3):
        np.testing.assert_allclose(blurred[c], gaussian_filter(image[c], 2.0), atol=1e-5)
    assert not pt.baseline_image(image, "grey").any()
    pre = {"scale": 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    np.testing.assert_allclose(pt.baseline_image(image, "zero", pre=pre), -2.0)
    saliency = RNG.random((SIDE, SIDE))
    grey = np.zeros_like(image)
    result = pt.perturbation_curves(scorer, image, saliency, 0, 16, grey, 0, blurred)
    p_image, p_grey, p_blur = scorer.probabilities(np.stack([image, grey, blurred]))[:, 0]
    assert result["deletion"][0] == pytest.approx(p_image)
    assert result["deletion"][-1] == pytest.approx(p_grey)
    assert result["insertion"][0] == pytest.approx(p_blur)
    assert result["insertion"][-1] == pytest.approx(p_image)
    with pytest.raises(Exception, match="baseline"):
        pt.baseline_image(image, "noise")


def test_step_counts_and_trapezoid():
    np.testing.assert_array_equal(pt.step_counts(10, 4), [0, 3, 6, 9, 10])
    assert pt.auc([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    positions = pt.pixel_positions(np.array([[0.0, 3.0], [3.0, 1.0]]), seed=1)
    assert sorted(positions[[1, 2]]) == [0, 1] and positions[3] == 2 and positions[0] == 3


# ---- Spearman and SSIM against scipy / skimage ------------------------------------------------
def test_spearman_and_ssim_match_scipy_and_skimage():
    from scipy.stats import rankdata as scipy_rankdata
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    for shape in [(17, 23), (64, 64)]:
        a = rng.random(shape)
        b = 0.6 * a + 0.4 * rng.random(shape)
        ties = rng.integers(0, 4, size=shape).astype(float)  # many ties
        assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-10)
        assert spearman(a, ties) == pytest.approx(spearmanr(a.ravel(), ties.ravel())[0], abs=1e-10)
        np.testing.assert_allclose(rankdata(ties), scipy_rankdata(ties.ravel()))
        for x, y in [(a, b), (a, ties / 3.0), (a, a)]:
            expected = structural_similarity(x, y, data_range=1.0)
            assert ssim(x, y, data_range=1.0) == pytest.approx(expected, abs=1e-10)
    assert np.isnan(spearman(np.ones((8, 8)), rng.random((8, 8))))


# ---- a tiny CNN through explain and the whole metrics job --------------------------------------
TINY, K = 16, 4


def tiny_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {
        "w1": rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 6).astype(np.float32),
        "w2": rng.normal(0, 0.5, (8, 6, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 8).astype(np.float32),
        "wf": rng.normal(0, 1.0, (K, 8)).astype(np.float32),
        "bf": rng.normal(0, 0.1, K).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    return _model(nodes, inits, TINY, K, "tinycnn")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A results folder with the tiny model, one shard of 2 images, gradcam and saliency maps."""
    from cnnviz.graph import conv_layers
    from cnnviz.images import stage_shard
    from cnnviz.methods.explain import explain_shard
    from cnnviz.modelcard import save_card
    from PIL import Image

    root = tmp_path_factory.mktemp("metrics")
    model_dir = root / "models" / "tiny"
    model_dir.mkdir(parents=True)
    model = tiny_cnn()
    onnx.save(model, str(model_dir / "model.onnx"))
    save_card(model_dir, {
        "name": "tiny", "source": "onnx:tiny.onnx", "weights": "file", "onnx": "model.onnx",
        "sha256": hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest(),
        "opset": 17, "input": {"name": "input", "shape": ["batch", 3, TINY, TINY]},
        "output": {"name": "logits", "kind": "logits", "num_classes": K},
        "preprocess": {"size": [TINY, TINY], "resize": "stretch", "scale": 255.0,
                       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                       "channel_order": "RGB"},
        "labels": [f"class{i}" for i in range(K)], "layers": conv_layers(model),
    })  # fmt: skip
    sources = []
    for i in range(2):
        path = root / "sources" / f"im{i}.png"
        path.parent.mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        sources.append((f"im{i}", path))
    manifest = root / "images" / "s000.json"
    stage_shard(sources, root / "images" / "s000", manifest)
    for method in ("gradcam", "saliency"):
        explain_shard(model_dir, manifest, method, root / "tiny" / method / "s000",
                      {"target": "top1"}, "cpu", 1, 2)  # fmt: skip
    settings = {
        "steps": 16,
        "randomization": {"cuts": 3, "methods": ["gradcam", "saliency"]},
        "class_sensitivity": {"classes": ["second", "last"]},
    }
    return {"root": root, "model_dir": model_dir, "manifest": manifest, "settings": settings}


def _run(tiny_run, method, out_name):
    from cnnviz.cli import main
    from cnnviz.metrics import metrics_shard

    root = tiny_run["root"]
    out = root / "tiny" / "metrics" / out_name / f"{method}.json"
    if method == "random":  # through the command line, as the workflow runs it
        card = tiny_run["model_dir"] / "model.json"
        args = ["metrics", "--method", "random", "--card", str(card),
                "--manifest", str(tiny_run["manifest"]), "--out", str(out),
                "--options", '{"target": "top1"}', "--metrics", json.dumps(tiny_run["settings"]),
                "--device", "cpu", "--threads", "1", "--batch-size", "2"]  # fmt: skip
        assert main(args) == 0
        return out, json.loads(out.read_text())
    maps = root / "tiny" / method / "s000"
    return out, metrics_shard(tiny_run["model_dir"], tiny_run["manifest"], method, out, maps,
                              {"target": "top1"}, tiny_run["settings"], "cpu", 1, 2)  # fmt: skip


def _without_timing(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timing")
    return data


def test_metrics_job_is_deterministic_and_complete(tiny_run):
    first, result = _run(tiny_run, "gradcam", "s000")
    second, _ = _run(tiny_run, "gradcam", "again")
    assert _without_timing(first) == _without_timing(second)
    assert result["failed"] == [] and len(result["images"]) == 2
    assert [c["layers"] for c in result["randomization_cuts"]] == [1, 2, 3]
    assert [c["cut"] for c in result["randomization_cuts"]] == ["logits", "w2", "w1"]
    for record in result["images"]:
        assert len(record["deletion_curve"]) == len(result["fractions"]) == 17
        assert 0.0 <= record["deletion_auc"] <= 1.0 and 0.0 <= record["insertion_auc"] <= 1.0
        assert record["deletion_curve"][0] == pytest.approx(record["prob"], abs=1e-6)
        assert [r["layers"] for r in record["randomization"]] == [1, 2, 3]
        assert all(-1 <= r["ssim"] <= 1 for r in record["randomization"])
        assert set(record["class_sensitivity"]) == {"second", "last"}
        assert record["class_sensitivity"]["last"]["class"] != record["target"]
    assert {"deletion_insertion_s_per_map", "randomization_s_per_map",
            "class_sensitivity_s_per_map"} <= set(result["timing"])  # fmt: skip


def test_summary_flags_and_plots_are_deterministic(tiny_run, tmp_path):
    from cnnviz.cli import main

    inputs = [_run(tiny_run, m, "s000")[0] for m in ("gradcam", "saliency", "random")]
    random_doc = json.loads(inputs[-1].read_text())
    assert "randomization" not in random_doc["images"][0] and random_doc["failed"] == []
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["metrics-summary", "--inputs", *map(str, inputs), "--out-dir", str(out)]
        assert main(args) == 0
    for name in ("summary.json", "deletion_insertion.png", "randomization.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["reference"] == "random" and summary["maps"] == 4
    assert set(summary["methods"]) == {"gradcam", "saliency", "random"}
    row = summary["methods"]["gradcam"]
    for key in ("deletion_auc_mean", "insertion_auc_std", "randomized_spearman_mean",
                "randomized_ssim_mean", "class_last_spearman_mean", "flags"):  # fmt: skip
        assert key in row, key
    assert set(summary["randomization_spearman"]["saliency"]) == {"logits", "w2", "w1"}
    assert all(isinstance(text, str) and text for text in summary["how_to_read"].values())
    for flag in summary["flags"]:
        assert {"method", "metric", "value", "threshold", "reason"} <= set(flag)


def test_randomizing_rewrites_the_top_layers_only_and_is_seeded():
    model = tiny_cnn()
    layers = randomizable_layers(model)
    assert [row["weight"] for row in layers] == ["w1", "w2", "wf"]
    assert cut_points(3, 6) == [1, 2, 3] and cut_points(50, 6) == [1, 2, 14, 26, 38, 50]
    assert cut_points(50, 2) == [1, 50] and cut_points(50, 1) == [50]

    def weights(m):
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    before = weights(model)
    top2 = weights(randomized_model(model, layers, 2, seed=3))
    assert np.array_equal(top2["w1"], before["w1"]) and np.array_equal(top2["b1"], before["b1"])
    for name in ("w2", "b2", "wf", "bf"):
        assert top2[name].shape == before[name].shape and top2[name].dtype == np.float32
        assert not np.array_equal(top2[name], before[name]), name
    # cascading: the layer randomized at the first cut keeps its values at later ones
    top1 = weights(randomized_model(model, layers, 1, seed=3))
    assert np.array_equal(top1["wf"], top2["wf"]) and np.array_equal(top1["w2"], before["w2"])
    assert np.array_equal(weights(randomized_model(model, layers, 2, seed=3))["w2"], top2["w2"])
    he = weights(randomized_model(model, layers, 3, seed=3, init="he"))
    assert not he["b1"].any()


# ---- the real model --------------------------------------------------------------------------
@pytest.mark.slow
def test_randomizing_all_layers_changes_gradcam_on_efficientnet(effnet_dir, tmp_path):
    from cnnviz.images import stage_shard, write_sample_images
    from cnnviz.methods.explain import load_job
    from cnnviz.metrics.randomization import randomization_test
    from cnnviz.metrics.run import compute_maps, job_for

    paths = write_sample_images(tmp_path / "samples", ["chelsea", "coffee"])
    manifest = tmp_path / "s000.json"
    stage_shard([(p.stem, p) for p in paths], tmp_path / "staged", manifest)
    job, _ = load_job(effnet_dir, manifest, {"target": "top1"}, "cpu", 2, 2)
    job = job_for(job)
    found = {}
    for method in ("gradcam", "guided_backprop"):
        originals = compute_maps(job, method)
        cuts, per_row, seconds = randomization_test(job, method, originals, cuts=4, seed=0)
        rho = np.array([[r["spearman"] or 0.0 for r in row] for row in per_row])  # [image, cut]
        found[method] = rho.mean(axis=0)
        names = [c["cut"] for c in cuts]
        means = {n: round(float(v), 4) for n, v in zip(names, rho.mean(0), strict=True)}
        print(f"{method}: mean Spearman per cut {means}, per image {rho.round(4).tolist()}"
              f" ({seconds:.1f} s)")  # fmt: skip
        assert [c["layers"] for c in cuts] == [1, 2, 26, 50] and names[-1] == "conv_stem"
    gradcam, guided = found["gradcam"], found["guided_backprop"]
    # Grad-CAM's maps lose the original's order once every weight is random.
    assert abs(gradcam[-1]) < 0.5
    # Guided backprop hardly notices a random logits layer, and less than Grad-CAM the top half
    # of the network randomized (Adebayo et al.: it shows the image's structure).
    assert guided[0] > 0.9 and guided[0] > gradcam[0] and guided[2] > gradcam[2]
