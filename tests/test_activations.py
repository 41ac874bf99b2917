"""Activations on tiny ONNX conv models: exposed values, blank channels, sparsity, shard outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.artifacts import read_json, write_json
from cnnviz.errors import ConfigError
from cnnviz.images import stage_shard
from cnnviz.methods.activations import (
    activations_shard,
    expose,
    extract,
    grid_layers,
    layer_stats,
    sparsity_plot,
)
from cnnviz.methods.predictions import predict, predict_shard, top_k
from cnnviz.render import BLANK_DARK, BLANK_LIGHT
from cnnviz.report import build_report
from cnnviz.report.portable import crawl
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SIZE = 8
CHANNELS = 6
LABELS = ["cat", "dog", "<script>alert(1)</script>", "car", "tree"]


def tiny_model(dead: list[list[int]], seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """conv3x3+Relu blocks (CHANNELS each); dead[i] lists layer i's channels with bias -1e3."""
    rng = np.random.default_rng(seed)
    nodes, inits, layers = [], [], []
    prev, prev_c = "input", 3
    for i, dead_channels in enumerate(dead):
        w = rng.normal(0, 0.5, (CHANNELS, prev_c, 3, 3)).astype(np.float32)
        b = np.abs(rng.normal(0.5, 0.1, CHANNELS)).astype(np.float32)
        b[dead_channels] = -1e3
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"Conv_{i}",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"Relu_{i}"))
        layers.append(
            {"name": f"block{i}", "tensor": f"relu{i}", "conv_node": f"Conv_{i}",
             "conv_output": f"conv{i}", "activation": "Relu", "shape": [CHANNELS, SIZE, SIZE],
             "kernel": [3, 3], "stride": [1, 1], "groups": 1, "depth": i}
        )  # fmt: skip
        prev, prev_c = f"relu{i}", CHANNELS
    fc = rng.normal(0, 1, (CHANNELS, len(LABELS))).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = {
        "name": "tiny", "source": "onnx:test", "weights": "random", "onnx": "model.onnx",
        "sha256": "0" * 64, "opset": 17,
        "input": {"name": "input", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits", "num_classes": len(LABELS)},
        "preprocess": {"size": [SIZE, SIZE], "resize": "center_crop", "resize_to": SIZE,
                       "scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3,
                       "channel_order": "RGB"},
        "labels": LABELS, "layers": layers,
        "verification": {"reference": "none", "image": "none", "max_abs_diff": 0.0,
                         "tolerance": 1e-3},
        "exporter": {"test": "1"}, "created": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    return model, card


def write_model_dir(folder: Path, model: onnx.ModelProto, card: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_json(folder / "model.json", card)
    return folder


def batch(n: int = 3, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def test_values_equal_a_direct_run_of_the_exposed_tensor():
    model, card = tiny_model([[], [1], [0, 2]])
    x = batch()
    acts = extract(model, card, x, layers="all", device="cpu", batch_size=2)
    assert list(acts) == ["block0", "block1", "block2"]
    # the oracle: a session on a model whose only output is the tensor
    for row in card["layers"]:
        single = onnx.ModelProto()
        single.CopyFrom(model)
        del single.graph.output[:]
        single.graph.output.append(
            helper.make_tensor_value_info(row["tensor"], TensorProto.FLOAT, None)
        )
        (direct,) = make_session(single, "cpu").run(None, {"input": x})
        assert acts[row["name"]].shape == (3, CHANNELS, SIZE, SIZE)
        np.testing.assert_array_equal(acts[row["name"]], direct)
    only = extract(model, card, x, layers=["relu1"], device="cpu")  # by tensor name
    assert list(only) == ["block1"]
    with pytest.raises(ConfigError, match="block0"):
        extract(model, card, x, layers=["nope"], device="cpu")


def test_expose_keeps_existing_outputs():
    model, _ = tiny_model([[]])
    out = expose(model, ["relu0", "logits"])
    assert [o.name for o in out.graph.output] == ["logits", "relu0"]
    assert [o.name for o in model.graph.output] == ["logits"]  # the original is untouched


def test_blank_fraction_finds_the_dead_channels():
    dead = [[], [0, 3], [1, 2, 4]]
    model, card = tiny_model(dead)
    acts = extract(model, card, batch(4), device="cpu")
    for i, channels in enumerate(dead):
        for image in acts[f"block{i}"]:
            stats = layer_stats(image)
            assert stats["blank_fraction"] == pytest.approx(len(channels) / CHANNELS)
            assert stats["max"] == pytest.approx(float(image.max()))
            assert stats["mean"] == pytest.approx(float(image.mean()), rel=1e-5)
            assert (image[channels] == 0).all()


def _staged(tmp_path: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(5)
    sources = []
    for i in range(n):
        path = tmp_path / "in" / f"photo{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_text("nope")
    manifest = tmp_path / "results" / "images" / "shards" / "s000.json"
    stage_shard(sources + [broken], tmp_path / "results" / "images", manifest)
    return manifest


def test_shard_outputs_stats_and_sparsity(tmp_path, capsys):
    dead = [[], [0], [0, 1, 2], [0, 1, 2, 3, 4]]  # built to get sparser with depth
    model, card = tiny_model(dead)
    model_dir = write_model_dir(tmp_path / "results" / "models" / "tiny", model, card)
    manifest = _staged(tmp_path)
    out_dir = tmp_path / "results" / "tiny" / "activations"
    data = activations_shard(
        model_dir, manifest, out_dir, layers="all", channels={"block1": [2, 5]},
        device="cpu", batch_size=2,
    )  # fmt: skip
    assert "3/3 images" in capsys.readouterr().err
    stats = read_json(out_dir / "s000.json")
    assert stats == data
    assert [row["name"] for row in stats["layers"]] == ["block0", "block1", "block2", "block3"]
    assert [row["depth"] for row in stats["layers"]] == [0, 1, 2, 3]
    assert [i["id"] for i in stats["images"]] == ["photo0", "photo1", "photo2"]
    assert any("broken.jpg" in f["source"] for f in stats["failed"])
    for image in stats["images"]:
        fractions = [image["layers"][f"block{i}"]["blank_fraction"] for i in range(4)]
        assert fractions == pytest.approx([len(d) / CHANNELS for d in dead])
        folder = out_dir / image["id"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "block0.png", "block1.png", "block1_ch2.png", "block1_ch5.png",
            "block2.png", "block3.png",
        ]  # fmt: skip
    # the deepest grid shows its five blank channels as hatched tiles
    grid = np.asarray(Image.open(out_dir / "photo0" / "block3.png").convert("RGB"))
    assert (grid == BLANK_DARK).all(axis=-1).any() and (grid == BLANK_LIGHT).all(axis=-1).any()

    plot = sparsity_plot([out_dir], out_dir / "sparsity.png")
    assert Image.open(plot).size[0] >= 600
    again = sparsity_plot([out_dir / "s000.json"], out_dir / "sparsity2.png")
    assert plot.read_bytes() == again.read_bytes()  # deterministic, folder or file input
    again.unlink()

    with pytest.raises(ConfigError, match="0..5"):
        activations_shard(model_dir, manifest, tmp_path / "x", channels={"block0": [6]},
                          device="cpu")  # fmt: skip


def test_grids_for_some_layers_stats_for_every_layer(tmp_path):
    model, card = tiny_model([[], [0], [0, 1, 2], [0, 1, 2, 3, 4]])
    model_dir = write_model_dir(tmp_path / "models" / "tiny", model, card)
    out_dir = tmp_path / "activations"
    data = activations_shard(model_dir, _staged(tmp_path), out_dir, grids={"spread": 2},
                             channels={"block1": [2]}, device="cpu")  # fmt: skip
    assert data["grids"] == ["block0", "block3"]  # first and last
    for image in data["images"]:
        assert set(image["layers"]) == {"block0", "block1", "block2", "block3"}
        assert sorted(p.name for p in (out_dir / image["id"]).iterdir()) == [
            "block0.png", "block1_ch2.png", "block3.png"]  # chosen channels: still drawn
    rows = card["layers"]
    assert grid_layers(rows, {"spread": 3}) == ["block0", "block2", "block3"]
    assert grid_layers(rows, {"spread": 9}) == ["block0", "block1", "block2", "block3"]
    assert grid_layers(rows, ["block2", "block1"]) == ["block1", "block2"]
    with pytest.raises(ConfigError, match="nope"):
        grid_layers(rows, ["nope"])


def test_predictions(tmp_path):
    model, card = tiny_model([[], [1]])
    session = make_session(model, "cpu")
    x = batch(5)
    probs = predict(session, card, list(x), batch_size=2)
    (logits,) = session.run(None, {"input": x})
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    best = top_k(probs[0], LABELS, k=3)
    assert [b["index"] for b in best] == list(np.argsort(-probs[0])[:3])
    assert best[0]["label"] == LABELS[best[0]["index"]]
    assert top_k(np.array([0.5, 0.5]), None, k=2)[1] == {
        "index": 1,
        "label": "class 1",
        "prob": 0.5,
    }

    model_dir = write_model_dir(tmp_path / "results" / "models" / "tiny", model, card)
    manifest = _staged(tmp_path)
    out = tmp_path / "results" / "tiny" / "predictions" / "s000.json"
    data = predict_shard(model_dir, manifest, out, device="cpu", batch_size=2, top_k=5)
    assert read_json(out) == data
    assert data["model"] == "tiny"
    assert [i["id"] for i in data["images"]] == ["photo0", "photo1", "photo2"]
    assert all(len(i["top"]) == 5 for i in data["images"])
    assert sum(t["prob"] for t in data["images"][0]["top"]) == pytest.approx(1.0, rel=1e-5)
    assert [f["source"].endswith("broken.jpg") for f in data["failed"]] == [True]


def test_end_to_end_report(tmp_path):
    """stage -> predict -> activations -> sparsity -> report, on the tiny model."""
    model, card = tiny_model([[], [0], [0, 1, 2]])
    results = tmp_path / "results"
    model_dir = write_model_dir(results / "models" / "tiny", model, card)
    manifest = _staged(tmp_path)
    predict_shard(model_dir, manifest, results / "tiny" / "predictions" / "s000.json", "cpu")
    acts = results / "tiny" / "activations"
    activations_shard(model_dir, manifest, acts, device="cpu")
    sparsity_plot([acts / "s000.json"], acts / "sparsity.png")
    index = build_report(results, results / "report", {"models": {"tiny": {}}}, ["tiny"], {})
    found = crawl(index)
    assert not found.broken, found.broken[:3]
    for png in results.rglob("*.png"):
        if "report" not in png.parts:
            assert png.resolve() in {f.resolve() for f in found.files}, png
    page = (results / "report" / "tiny.html").read_text()
    assert "<script>alert(1)</script>" not in page
    assert page.count("<script>") <= 1  # one optional, inline enhancement script
    assert 'href="tiny.html"' in index.read_text()
