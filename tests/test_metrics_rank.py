"""Metrics that rank the methods (issue 17 item 6): ROAD, pointing game, energy-based pointing
game, sparseness, complexity and max-sensitivity, each against Quantus 0.6.0 on the same maps
(and the same ONNX model, wrapped as a torch module that runs it through ONNX Runtime), plus
known values of our own definitions where Quantus differs or fails."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.metrics import complexity as cx
from cnnviz.metrics import localization as loc
from cnnviz.metrics import road
from cnnviz.metrics.perturbation import Scorer
from cnnviz.runtime import make_session
from onnx import TensorProto, helper
from onnx_build import finish_model

K, SIDE = 5, 12


def conv_model(channels: int, seed: int = 4) -> onnx.ModelProto:
    """conv 3x3 -> relu -> conv 3x3 -> relu -> GAP -> gemm, `channels` input channels."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.6, (6, channels, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 6).astype(np.float32),
        "w2": rng.normal(0, 0.6, (8, 6, 3, 3)).astype(np.float32),
        "wf": rng.normal(0, 1.0, (K, 8)).astype(np.float32),
        "bf": rng.normal(0, 0.1, K).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, SIDE, SIDE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    return finish_model(nodes, inits, [x], [y], f"conv{channels}")


CARD = {"input": {"name": "input"}, "output": {"name": "logits", "kind": "logits"}}


def ort_module(model: onnx.ModelProto):
    """A torch module whose forward is the ONNX model run by ONNX Runtime (Quantus' model)."""
    torch = pytest.importorskip("torch")
    session = make_session(model, "cpu", 1)

    class Ort(torch.nn.Module):
        def forward(self, x):
            out = session.run(None, {"input": x.detach().cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(out)

    return Ort().eval()


@pytest.fixture(scope="module")
def quantus():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("quantus")


# ---- ROAD --------------------------------------------------------------------------------------
def test_imputation_equals_quantus_and_the_authors_system(quantus):
    from quantus.functions.perturb_func import noisy_linear_imputation

    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11)).astype(np.float32)
    for fraction in (0.05, 0.3, 0.9):
        removed = rng.random((9, 11)) < fraction
        removed[0, 0] = removed[-1, -1] = True  # corners: 3 of 8 neighbours inside
        ours = road.noisy_linear_imputation(image, removed, 0.0)
        theirs = noisy_linear_imputation(image, np.flatnonzero(removed), noise=0.0)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        assert np.array_equal(ours[:, ~removed], image[:, ~removed])
    # A removed pixel whose neighbours are all known is their weighted mean (weights sum to 1).
    removed = np.zeros((9, 11), bool)
    removed[4, 5] = True
    ours = road.noisy_linear_imputation(image, removed, 0.0)
    expected = sum(w * image[:, 4 + dr, 5 + dc] for dr, dc, w in road.NEIGHBOURS)
    np.testing.assert_allclose(ours[:, 4, 5], expected, atol=1e-6)
    # The noise: seeded, N(0, noise^2) on the imputed values only.
    removed = rng.random((9, 11)) < 0.5
    a = road.noisy_linear_imputation(image, removed, 0.5, np.random.default_rng(3))
    b = road.noisy_linear_imputation(image, removed, 0.5, np.random.default_rng(3))
    clean = road.noisy_linear_imputation(image, removed, 0.0)
    assert np.array_equal(a, b)
    residual = (a - clean)[:, removed]
    assert abs(residual.std() - 0.5) < 0.08 and np.all((a - clean)[:, ~removed] == 0)


def test_road_morf_lerf_equal_quantus_on_a_one_channel_model(quantus):
    """Quantus 0.6.0's ROAD indexes pixels of a 3-channel image past the end (IndexError: it
    flattens the attribution over channels x pixels but imputes per pixel), so the end-to-end
    comparison runs a 1-channel model; the imputation itself is compared on 3 channels above."""
    model = conv_model(1)
    scorer = Scorer(make_session(model, "cpu", 1), CARD, batch_size=16)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 1, SIDE, SIDE)).astype(np.float32)
    y = scorer.probabilities(x).argmax(axis=1)
    a = rng.random((8, 1, SIDE, SIDE)).astype(np.float32)  # no ties
    percentages = [25, 50, 75]
    ours = [road.road_curves(scorer, x[n], a[n, 0], int(y[n]), [p / 100 for p in percentages],
                             0.0, np.random.default_rng(0)) for n in range(len(x))]  # fmt: skip
    module = ort_module(model)
    for order, ranked in (("morf", a), ("lerf", 1.0 - a)):  # LeRF: the reversed order
        metric = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True,
                              display_progressbar=False)  # fmt: skip
        theirs = metric(model=module, x_batch=x, y_batch=y, a_batch=ranked, device="cpu")
        mine = np.mean([r[f"{order}_top1"] for r in ours], axis=0)
        np.testing.assert_allclose(mine, [theirs[p] for p in percentages], atol=1e-12)
    assert any(0 < v < 1 for r in ours for v in r["morf"])


def test_road_removes_the_ranked_pixels_and_scores_in_one_batch():
    """Known values: a map ranking one half of the image first removes exactly that half."""
    model = conv_model(3)
    scorer = Scorer(make_session(model, "cpu", 1), CARD, batch_size=4)
    image = np.random.default_rng(2).normal(size=(3, SIDE, SIDE)).astype(np.float32)
    saliency = np.zeros((SIDE, SIDE), np.float32)
    saliency[:, : SIDE // 2] = 1.0
    out = road.road_curves(scorer, image, saliency, 0, [0.5], 0.0, np.random.default_rng(0))
    left = np.zeros((SIDE, SIDE), bool)
    left[:, : SIDE // 2] = True
    expect = [road.noisy_linear_imputation(image, m, 0.0) for m in (left, ~left)]
    probs = scorer.probabilities(np.stack(expect))[:, 0]
    assert out["morf"] == pytest.approx([probs[0]], abs=1e-9)
    assert out["lerf"] == pytest.approx([probs[1]], abs=1e-9)
    assert out["gap"] == pytest.approx(probs[1] - probs[0], abs=1e-9)
    with pytest.raises(Exception, match="between 0 and 1"):
        road.removed_counts(100, [0.0, 0.5])


# ---- pointing games ----------------------------------------------------------------------------
def test_boxes_csv_and_mapping_through_resize_and_crop(tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("\ufefffile,x0,y0,x1,y1\n# a comment\ncat.jpg,10,20,30,40\n"
                   "cat.jpg,0,0,5,5\ndog,1,2,3,4,5,6,7,8\n", encoding="utf-8")  # fmt: skip
    boxes = loc.read_boxes(csv)
    assert boxes == {"cat.jpg": [(10, 20, 30, 40), (0, 0, 5, 5)],
                     "dog": [(1, 2, 3, 4), (5, 6, 7, 8)]}  # fmt: skip
    assert loc.boxes_of({"source": "x/dog.png"}, boxes) == boxes["dog"]
    bad = tmp_path / "bad.csv"
    bad.write_text("cat.jpg,10,20,5,40\n")
    with pytest.raises(Exception, match="empty"):
        loc.read_boxes(bad)
    # center_crop: a 400 x 200 file staged at 200 x 100 (reduced); resize_to 20, crop 16 x 16:
    # the staged image becomes 40 x 20, the crop starts at (12, 2) there = (60, 10) in staged
    # pixels = (120, 20) in the file's, 1 input pixel = 10 file pixels.
    pre = {"size": [16, 16], "resize": "center_crop", "resize_to": 20}
    entry = {"width": 200, "height": 100, "original_size": [400, 200]}
    mask = loc.box_mask(entry, [(120.0, 20.0, 160.0, 60.0)], pre)
    expected = np.zeros((16, 16), bool)
    expected[0:4, 0:4] = True  # centres 0.5 .. 3.5 lie in [0, 4]
    assert np.array_equal(mask, expected)
    # stretch: the whole image, scaled per axis.
    mask = loc.box_mask({"width": 32, "height": 64}, [(0, 32, 16, 64)], {"size": [8, 8],
                        "resize": "stretch"})  # fmt: skip
    assert mask.sum() == 16 and mask[4:, :4].all()


def test_pointing_games_equal_quantus(quantus):
    rng = np.random.default_rng(5)
    n = 12
    maps = rng.random((n, SIDE, SIDE)).astype(np.float32)
    maps[:4] -= 0.5  # signed maps
    maps[4:6] = np.round(maps[4:6] * 3) / 3  # ties at the maximum
    masks = np.zeros((n, SIDE, SIDE), bool)
    for i in range(n):
        r, c = rng.integers(0, SIDE - 4, 2)
        masks[i, r : r + 5, c : c + 6] = True
    masks[0] |= maps[0] == maps[0].max()  # a sure hit
    x = rng.normal(size=(n, 3, SIDE, SIDE)).astype(np.float32)
    y = np.zeros(n, int)
    module = ort_module(conv_model(3))
    kwargs = {"model": module, "x_batch": x, "y_batch": y, "s_batch": masks[:, None],
              "device": "cpu"}  # fmt: skip
    hits = quantus.PointingGame(disable_warnings=True)(a_batch=maps[:, None], **kwargs)
    ours = [loc.pointing_game(m, s) for m, s in zip(maps, masks, strict=True)]
    assert ours == [bool(h) for h in hits] and ours[0] and not all(ours)
    positive = np.clip(maps, 0, None)
    mass = quantus.RelevanceMassAccuracy(disable_warnings=True)(a_batch=positive[:, None], **kwargs)
    energy = [loc.energy_pointing_game(m, s) for m, s in zip(maps, masks, strict=True)]
    np.testing.assert_allclose(energy, mass, rtol=1e-5)
    assert loc.energy_pointing_game(-np.ones((4, 4)), np.ones((4, 4), bool)) is None


# ---- sparseness, complexity --------------------------------------------------------------------
def test_sparseness_and_complexity_equal_quantus(quantus):
    rng = np.random.default_rng(6)
    n = 6
    maps = rng.normal(size=(n, SIDE, SIDE)).astype(np.float32)  # signed: |m| is used
    maps[1] = rng.random((SIDE, SIDE)) ** 8  # concentrated
    maps[2] = 1.0  # uniform
    x = rng.normal(size=(n, 3, SIDE, SIDE)).astype(np.float32)
    kwargs = {"model": ort_module(conv_model(3)), "x_batch": x, "y_batch": np.zeros(n, int),
              "a_batch": maps[:, None], "device": "cpu"}  # fmt: skip
    gini = quantus.Sparseness(disable_warnings=True)(**kwargs)
    entropy = quantus.Complexity(disable_warnings=True)(**kwargs)
    np.testing.assert_allclose([cx.sparseness(m) for m in maps], gini, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([cx.complexity(m) for m in maps], entropy, rtol=1e-5, atol=1e-6)
    # Known values: uniform -> Gini 0, entropy log(H W); one pixel -> Gini (n - 1) / n, entropy 0.
    one = np.zeros((SIDE, SIDE))
    one[3, 4] = 2.0
    assert cx.sparseness(maps[2]) == pytest.approx(0.0, abs=1e-6)
    assert cx.complexity(maps[2]) == pytest.approx(np.log(SIDE * SIDE), abs=1e-6)
    assert cx.sparseness(one) == pytest.approx(1 - 1 / SIDE**2, abs=1e-4)  # the 1e-7 guard
    assert cx.complexity(one) == pytest.approx(0.0, abs=1e-9)


# ---- max-sensitivity ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """An explain Job over 3 staged images of a 3-channel model, targets = top-1."""
    from cnnviz.graph import conv_layers
    from cnnviz.images import stage_shard
    from cnnviz.methods.explain import load_job
    from cnnviz.modelcard import save_card
    from PIL import Image

    root = tmp_path_factory.mktemp("rank")
    model_dir = root / "models" / "tiny"
    model_dir.mkdir(parents=True)
    model = conv_model(3)
    onnx.save(model, str(model_dir / "model.onnx"))
    save_card(model_dir, {
        "name": "tiny", "source": "onnx:tiny.onnx", "weights": "file", "onnx": "model.onnx",
        "sha256": hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest(),
        "opset": 17, "input": {"name": "input", "shape": ["batch", 3, SIDE, SIDE]},
        "output": {"name": "logits", "kind": "logits", "num_classes": K},
        "preprocess": {"size": [SIDE, SIDE], "resize": "stretch", "scale": 255.0,
                       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                       "channel_order": "RGB"},
        "labels": [f"class{i}" for i in range(K)], "layers": conv_layers(model),
    })  # fmt: skip
    sources = []
    for i in range(3):
        path = root / "sources" / f"im{i}.png"
        path.parent.mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        sources.append((f"im{i}", path))
    manifest = root / "images" / "s000.json"
    stage_shard(sources, root / "images" / "s000", manifest)
    job, failed = load_job(model_dir, manifest, {"target": "top1"}, "cpu", 1, 4)
    assert not failed
    return {"job": job, "root": root, "model_dir": model_dir, "manifest": manifest}


@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_max_sensitivity_equals_quantus_with_the_same_draws(quantus, tiny_job, method):
    import dataclasses

    from cnnviz.metrics.robustness import max_sensitivity, perturbation
    from cnnviz.metrics.run import compute_maps, job_for

    job = tiny_job["job"]
    originals = compute_maps(job_for(job), method)
    samples, radius, seed = 3, 0.2, 7
    ours, _ = max_sensitivity(job, method, originals, samples, radius, seed)

    images = [i for i, _ in job.rows]
    draws = iter(range(samples))

    def same_noise(arr, indices, **_):
        s = next(draws)
        noise = np.stack([perturbation(job.inputs[i].shape, radius, seed, i, s) for i in images])
        return arr + noise.reshape(len(images), -1)

    def explain(model, inputs, targets, **_):
        noisy = dataclasses.replace(job, inputs=np.asarray(inputs, np.float32))
        rows = [(r, int(t)) for r, t in enumerate(targets)]
        return compute_maps(job_for(noisy, rows=rows), method)[:, None]

    metric = quantus.MaxSensitivity(nr_samples=samples, perturb_func=same_noise,
                                    lower_bound=radius, disable_warnings=True)  # fmt: skip
    theirs = metric(model=ort_module(job.model), x_batch=job.row_inputs,
                    y_batch=np.array(job.row_targets), a_batch=originals[:, None],
                    explain_func=explain, device="cpu")  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert all(v > 0 for v in ours)
    # Seeded: the same again; another seed gives other values.
    assert max_sensitivity(job, method, originals, samples, radius, seed)[0] == ours
    assert max_sensitivity(job, method, originals, samples, radius, seed + 1)[0] != ours


# ---- the metrics job and the summary's ranking -------------------------------------------------
def test_metrics_job_scores_boxes_road_and_ranks_the_methods(tiny_job, tmp_path):
    import json

    from cnnviz.cli import main
    from cnnviz.methods.explain import explain_shard
    from cnnviz.metrics import metrics_shard

    root, model_dir, manifest = tiny_job["root"], tiny_job["model_dir"], tiny_job["manifest"]
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("im0.png,0,0,10,12\nim1,5,6,20,24\n")  # im2: no box
    settings = {"steps": 4, "randomization": {"methods": []}, "class_sensitivity": {"classes": []},
                "road": {"fractions": [0.25, 0.75]},
                "max_sensitivity": {"samples": 2, "methods": ["gradcam"]}}  # fmt: skip
    outputs = []
    for method in ("gradcam", "saliency", "random"):
        maps = root / "tiny" / method / "s000"
        if method != "random":
            explain_shard(model_dir, manifest, method, maps, {"target": "top1"}, "cpu", 1, 4)
        out = tmp_path / "metrics" / f"{method}.json"
        doc = metrics_shard(model_dir, manifest, method, out, None if method == "random" else maps,
                            {"target": "top1"}, settings, "cpu", 1, 4, boxes)  # fmt: skip
        outputs.append(out)
        assert doc["failed"] == [] and doc["unboxed"] == ["im2"]
        assert doc["road_fractions"] == [0.25, 0.75]
        by_id = {r["image"]: r for r in doc["images"]}
        assert "pointing_game" in by_id["im0"] and "pointing_game" not in by_id["im2"]
        for record in doc["images"]:
            assert len(record["road"]["morf"]) == 2 and 0 <= record["sparseness"] <= 1
            assert ("max_sensitivity" in record) == (method == "gradcam")
        # the defaults come from the schema: ROAD's noise, max-sensitivity's radius
        assert doc["settings"]["road"]["noise"] == 0.01
        assert doc["settings"]["max_sensitivity"]["radius"] == 0.2
    # im0's box in the input frame: stretch 20 x 24 -> 12 x 12, x 0..10 -> 0..6, y 0..12 -> 0..6
    from cnnviz.metrics.run import box_masks

    masks, unboxed = box_masks(tiny_job["job"], manifest, boxes)
    assert unboxed == ["im2"] and masks[0].sum() == 36 and masks[0][:6, :6].all()

    out_dir = tmp_path / "summary"
    args = ["metrics-summary", "--inputs", *map(str, outputs), "--out-dir", str(out_dir)]
    assert main(args) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["images_without_box"] == ["im2"]
    ranked = {r["metric"]: r for r in summary["ranking"]}
    assert {"road_gap", "pointing_game", "energy_pointing_game", "sparseness", "complexity",
            "max_sensitivity", "insertion_auc"} <= set(ranked)  # fmt: skip
    assert [r["method"] for r in ranked["max_sensitivity"]["order"]] == ["gradcam"]
    for entry in summary["ranking"]:
        values = [r["value"] for r in entry["order"]]
        assert values == sorted(values, reverse=entry["better"] == "higher")
        assert entry["guide"] and entry["order"][0]["rank"] == 1
    rows = summary["methods"]
    assert rows["gradcam"]["boxed_maps"] == 2 and "road_gap_mean" in rows["random"]


def test_config_readme_documents_every_metrics_key_at_the_schemas_default():
    """The schema holds the defaults (metrics/run.py reads them); config/README's rows say the
    same: every key of the `metrics` section has a row naming it and its default."""
    from cnnviz.config import section_defaults

    readme = (Path(__file__).resolve().parents[1] / "config" / "README.md").read_text("utf-8")
    rows = [line.split(" | ") for line in readme.splitlines() if line.startswith("| `metrics.")]

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix, key, value

    def shown(value) -> list[str]:
        if isinstance(value, bool):
            return [str(value).lower()]
        if isinstance(value, list):
            return [str(v) for v in value]
        return [str(value)]

    def row_of(rows: list[list[str]], section: str, key: str) -> list[str] | None:
        for row in rows:
            first = row[0].split("`")[1]  # metrics.randomization.cuts: the row's first key
            if first.rpartition(".")[0] + "." == section and (
                first == f"{section}{key}" or f"`.{key}`" in row[0]
            ):
                return row
        return None

    for parent, key, default in leaves(section_defaults("metrics")):
        head = row_of(rows, f"metrics.{parent}", key)
        assert head is not None, f"config/README has no row for metrics.{parent}{key}"
        assert all(v in head[1] for v in shown(default)), (f"metrics.{parent}{key}", default)
    assert "| `images.boxes` |" in readme


@pytest.mark.slow
def test_on_efficientnet_the_metrics_equal_quantus_and_rank_gradcam_above_random(
    quantus, effnet_dir, tmp_path
):
    """Pretrained EfficientNet-Lite0, chelsea and coffee with a box each: sparseness, complexity,
    pointing games and Grad-CAM's max-sensitivity equal Quantus on the real maps; ROAD and the
    energy-based pointing game put Grad-CAM above random maps (measured: ROAD gap 0.52 vs -0.04
    at fractions 0.3, 0.7; energy 0.64 vs 0.43, saliency 0.50). 28 s on 2 shared cores."""
    import dataclasses

    from cnnviz.images import stage_shard, write_sample_images
    from cnnviz.methods.explain import load_job
    from cnnviz.metrics.robustness import max_sensitivity, perturbation
    from cnnviz.metrics.run import box_masks, compute_maps, job_for, random_maps

    paths = write_sample_images(tmp_path / "samples", ["chelsea", "coffee"])
    manifest = tmp_path / "s000.json"
    stage_shard([(p.stem, p) for p in paths], tmp_path / "staged", manifest)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("chelsea.png,130,20,330,250\ncoffee.png,20,60,390,470\n")
    job, _ = load_job(effnet_dir, manifest, {"target": "top1"}, "cpu", 2, 2)
    job = job_for(job)
    masks, unboxed = box_masks(job, manifest, boxes)
    assert unboxed == [] and all(0.2 < m.mean() < 0.95 for m in masks.values())
    s_batch = np.stack([masks[i] for i, _ in job.rows])[:, None]
    maps = {m: compute_maps(job, m) for m in ("gradcam", "saliency")}
    maps["random"] = np.stack(random_maps(job, 0))
    module = ort_module(job.model)
    common = {"model": module, "x_batch": job.row_inputs, "y_batch": np.array(job.row_targets),
              "device": "cpu"}  # fmt: skip
    for name, a in maps.items():
        a4 = a[:, None]
        pairs = (
            (cx.sparseness, quantus.Sparseness, a4, {}),
            (cx.complexity, quantus.Complexity, a4, {}),
            (loc.pointing_game, quantus.PointingGame, a4, {"s_batch": s_batch}),
            (loc.energy_pointing_game, quantus.RelevanceMassAccuracy, np.clip(a4, 0, None),
             {"s_batch": s_batch}),
        )  # fmt: skip
        for ours_of, metric, given, extra in pairs:
            theirs = metric(disable_warnings=True)(a_batch=given, **common, **extra)
            args = [(m,) if not extra else (m, masks[i]) for m, (i, _) in zip(a, job.rows,
                                                                              strict=True)]
            ours = [float(ours_of(*arg)) for arg in args]
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, err_msg=f"{name} {metric}")
    # Grad-CAM's max-sensitivity with Quantus' loop and the same draws.
    samples, radius, images = 2, 0.2, [i for i, _ in job.rows]
    ours, _ = max_sensitivity(job, "gradcam", maps["gradcam"], samples, radius, 0)
    draws = iter(range(samples))

    def same_noise(arr, indices, **_):
        s = next(draws)
        noise = np.stack([perturbation(job.inputs[i].shape, radius, 0, i, s) for i in images])
        return arr + noise.reshape(len(images), -1)

    def explain(model, inputs, targets, **_):
        noisy = dataclasses.replace(job, inputs=np.asarray(inputs, np.float32))
        rows = [(r, int(t)) for r, t in enumerate(targets)]
        return compute_maps(job_for(noisy, rows=rows), "gradcam")[:, None]

    theirs = quantus.MaxSensitivity(nr_samples=samples, perturb_func=same_noise,
                                    lower_bound=radius, disable_warnings=True)(
        a_batch=maps["gradcam"][:, None], explain_func=explain, **common)  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # ROAD (ours; Quantus' fails on 3 channels): Grad-CAM's order matters, a random one not.
    scorer = Scorer(make_session(job.model, "cpu", 2), job.card, batch_size=8)
    gap = {name: np.mean([road.road_curves(scorer, job.inputs[i], m, t, [0.3, 0.7], 0.01,
                                           np.random.default_rng(i))["gap"]
                          for m, (i, t) in zip(a, job.rows, strict=True)])
           for name, a in maps.items() if name != "saliency"}  # fmt: skip
    energy = {name: np.mean([loc.energy_pointing_game(m, masks[i])
                             for m, (i, _) in zip(a, job.rows, strict=True)])
              for name, a in maps.items()}  # fmt: skip
    print("ROAD gap", {k: round(float(v), 4) for k, v in gap.items()},
          "energy", {k: round(float(v), 4) for k, v in energy.items()})  # fmt: skip
    assert gap["gradcam"] > gap["random"] + 0.1 and energy["gradcam"] > energy["random"]


def test_ranking_orders_by_the_better_direction_ties_share_a_rank_and_road_is_flagged(tmp_path):
    """Known values through summarize: shard documents with fixed per-map numbers."""
    import json

    from cnnviz.metrics.summary import summarize

    def doc(method: str, gap: float, sparse: float, hits: list[int]) -> Path:
        images = [{"image": f"im{k}", "target": 0, "deletion_auc": 0.2, "insertion_auc": 0.5,
                   "deletion_curve": [1, 0], "insertion_curve": [0, 1], "sparseness": sparse,
                   "complexity": 5.0 - sparse, "pointing_game": hit, "energy_pointing_game": 0.5,
                   "road": {"morf_mean": 0.5 - gap / 2, "lerf_mean": 0.5 + gap / 2, "gap": gap}}
                  for k, hit in enumerate(hits)]  # fmt: skip
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps({"method": method, "model": "m", "shard": "s000",
                                    "settings": {}, "fractions": [0, 1], "images": images,
                                    "road_fractions": [0.5], "boxes": "b.csv",
                                    "unboxed": ["im9"], "failed": [], "timing": {}}))  # fmt: skip
        return path

    paths = [doc("a", 0.4, 0.5, [1, 1]), doc("b", -0.1, 0.7, [1, 1]), doc("random", 0.0, 0.3,
                                                                            [0, 1])]  # fmt: skip
    summary = summarize(paths, tmp_path / "out")
    ranked = {r["metric"]: r["order"] for r in summary["ranking"]}
    assert [(o["method"], o["rank"]) for o in ranked["road_gap"]] == [("a", 1), ("random", 2),
                                                                      ("b", 3)]  # fmt: skip
    assert [o["method"] for o in ranked["sparseness"]] == ["b", "a", "random"]
    assert [o["method"] for o in ranked["complexity"]] == ["b", "a", "random"]  # lower first
    assert [(o["method"], o["rank"]) for o in ranked["pointing_game"]] == [
        ("a", 1), ("b", 1), ("random", 3)]  # fmt: skip
    flagged = {(f["method"], f["metric"]) for f in summary["flags"]}
    assert ("b", "road_gap") in flagged and ("a", "road_gap") not in flagged
    assert summary["images_without_box"] == ["im9"] and summary["road_fractions"] == [0.5]


def test_the_model_page_tables_lead_with_the_leaderboard_and_the_reading_guide():
    from cnnviz.report.builder import summary_tables

    ranking = [{"metric": "road_gap", "better": "higher", "guide": "LeRF minus MoRF.",
                "order": [{"rank": 1, "method": "gradcam", "value": 0.4},
                          {"rank": 2, "method": "random", "value": 0.0}]},
               {"metric": "complexity", "better": "lower", "guide": "Entropy.",
                "order": [{"rank": 1, "method": "saliency", "value": 9.5}]}]  # fmt: skip
    tables = summary_tables({"methods": {"gradcam": {"maps": 2}}, "ranking": ranking})
    board, guide = tables[0], tables[1]
    assert board["title"].startswith("Methods ranked")
    assert board["columns"] == ["rank", "road_gap ↑", "complexity ↓"]
    assert board["rows"] == [["1", "gradcam (0.4)", "saliency (9.5)"], ["2", "random (0)", ""]]
    assert board["tips"]["road_gap ↑"] == "LeRF minus MoRF."
    assert guide["rows"][1] == ["complexity", "lower", "Entropy."]
    assert tables[2]["title"] == "Per method"
