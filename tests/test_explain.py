"""`cnnviz explain` on a tiny model: every method writes its artifacts, failures are recorded
per method instead of stopping the job, and the finite-difference fallback is marked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.methods.explain import explain_shard
from cnnviz.methods.shard_maps import read_shard_maps
from cnnviz.pictures import render_shard
from cnnviz.registry import SCORED
from onnx import helper
from test_activations import _staged, tiny_model, write_model_dir

# methods that also store a signed [3, H, W] signal (the relevance methods draw their raw map)
SIGNED = {"guided_backprop", "deconvnet", "guided_gradcam", "input_x_gradient", "deeplift", "lrp"}


def with_softsign(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tiny model with a Softsign (an op without a backward rule) after its first block."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for node in graph.node:
        if "relu0" in node.input:
            node.input[list(node.input).index("relu0")] = "soft0"
    graph.node.insert(2, helper.make_node("Softsign", ["relu0"], ["soft0"], name="Softsign_0"))
    return model


def add_softsign(model_dir: Path) -> None:
    path = str(model_dir / "model.onnx")
    onnx.save(with_softsign(onnx.load(path)), path)


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, Path]:
    model, card = tiny_model([[], [1]])
    card["preprocess"] = {"size": [8, 8], "resize": "stretch", "scale": 255.0,
                          "mean": [0.5] * 3, "std": [0.25] * 3, "channel_order": "RGB"}
    card["name"] = "tiny"
    model_dir = write_model_dir(tmp_path / "models" / "tiny", model, card)
    return model_dir, _staged(tmp_path)


@pytest.mark.parametrize("method", SCORED)
def test_every_method_writes_one_array_file_and_an_index(shard, tmp_path: Path,
                                                         method: str) -> None:
    model_dir, manifest = shard
    options = {"samples": 2, "steps": 4, "window": 4, "stride": 2, "batch_size": 4}
    summary = explain_shard(model_dir, manifest, method, tmp_path / method, options,
                            device="cpu", batch_size=2)
    assert len(summary["maps"]) == 3 and summary["failed"][0]["stage"] == "staging"
    rows, maps = read_shard_maps(tmp_path / method)
    assert maps.shape == (3, 8, 8) and maps.dtype == np.float32 and np.isfinite(maps).all()
    for entry, row in zip(summary["maps"], rows, strict=True):
        assert row["method"] == method and row["target"] == entry["target"]
        assert row["image"] == entry["image"] and row["row"] == entry["row"]
    assert not list((tmp_path / method).glob("*.png"))  # pictures: the render step's
    index = json.loads((tmp_path / method / "index.json").read_text())
    assert ("signed" in index["arrays"]) == (method in SIGNED)
    drawn = render_shard(model_dir, manifest, tmp_path / method, tmp_path / "pictures", "all")
    assert len(drawn["pictures"]) == 3
    assert all((tmp_path / "pictures" / p["png"]).stat().st_size > 0 for p in drawn["pictures"])


def test_an_op_without_a_rule_fails_that_method_by_name(shard, tmp_path: Path) -> None:
    model_dir, manifest = shard
    add_softsign(model_dir)
    summary = explain_shard(model_dir, manifest, "saliency", tmp_path / "s", {}, device="cpu")
    assert summary["maps"] == []
    error = summary["failed"][-1]["error"]
    assert "Softsign" in error and "finite-differences" in error
    # gradient-free methods still finish on the same model
    occl = explain_shard(model_dir, manifest, "occlusion", tmp_path / "o",
                         {"window": 4, "stride": 2}, device="cpu")
    assert len(occl["maps"]) == 3


def test_finite_difference_fallback_runs_and_is_marked(shard, tmp_path: Path) -> None:
    model_dir, manifest = shard
    add_softsign(model_dir)
    approx = explain_shard(model_dir, manifest, "saliency", tmp_path / "fd",
                           {"gradient_fallback": "finite-differences"}, device="cpu")
    assert len(approx["maps"]) == 3  # the fallback's accuracy: test_autodiff_rules.py
    info = read_shard_maps(tmp_path / "fd")[0][0]
    assert info["approximate"] is True and "Softsign" in info["notes"][0]


def test_a_quantized_model_is_straight_through_and_marked(shard, tmp_path: Path) -> None:
    """QuantizeLinear -> DequantizeLinear after the first block: saliency runs (straight-through
    gradient, not the silent zero of an integer tensor) and its maps are marked approximate."""
    from onnx import numpy_helper

    model_dir, manifest = shard
    path = str(model_dir / "model.onnx")
    model = onnx.load(path)
    graph = model.graph
    for node in graph.node:
        if "relu0" in node.input:
            node.input[list(node.input).index("relu0")] = "deq0"
    graph.node.insert(2, helper.make_node("QuantizeLinear", ["relu0", "s0", "z0"], ["q0"],
                                          name="Quant_0"))
    graph.node.insert(3, helper.make_node("DequantizeLinear", ["q0", "s0", "z0"], ["deq0"]))
    graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s0"),
                              numpy_helper.from_array(np.array(0, np.uint8), "z0")])
    onnx.save(model, path)
    summary = explain_shard(model_dir, manifest, "saliency", tmp_path / "q", {}, device="cpu")
    assert len(summary["maps"]) == 3
    rows, maps = read_shard_maps(tmp_path / "q")
    assert np.abs(maps).max() > 0
    assert rows[0]["approximate"] is True
    note = rows[0]["notes"][0]
    assert "straight-through" in note and "QuantizeLinear Quant_0" in note


def test_an_unknown_class_is_recorded_not_fatal(shard, tmp_path: Path) -> None:
    model_dir, manifest = shard
    summary = explain_shard(model_dir, manifest, "gradcam", tmp_path / "g",
                            {"target": ["no such class", 1]}, device="cpu")
    assert [m["target"] for m in summary["maps"]] == [1, 1, 1]  # the known class still runs
    assert len(summary["failed"]) == 2  # one staging failure + the unknown class, named once
    assert summary["failed"][-1]["image"] == "all 3 images"
    assert "no such class" in summary["failed"][-1]["error"]


def test_ops_without_rules_names_the_softsign(shard) -> None:
    from cnnviz.autodiff import ops_without_rules

    model_dir, _ = shard
    model = with_softsign(onnx.load(str(model_dir / "model.onnx")))
    assert ops_without_rules(model) == ["Softsign Softsign_0"]
