"""Projections that depend on the image: `auto` keeps Zeiler & Fergus's deconvnet where max
pooling switches lie below the layer and uses guided backprop elsewhere, because a deconvnet
projection without switches is the same picture for every image (shown here, not assumed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.methods import projection_policy as policy
from cnnviz.methods.projections import ProjectionRunner, unit_projection_graph
from cnnviz.runner import Runner
from onnx import TensorProto, helper
from onnx_build import finish_model
from test_projections import tiny_model

RNG = np.random.default_rng(5)
FLAT = {
    "w1": RNG.normal(0, 0.5, size=(4, 3, 3, 3)).astype(np.float32),
    "w2": RNG.normal(0, 0.5, size=(6, 4, 3, 3)).astype(np.float32),
    "wf": RNG.normal(size=(5, 6)).astype(np.float32),
}


def pooling_free_model() -> onnx.ModelProto:
    """conv-relu-conv(stride 2)-relu-GAP-gemm: the EfficientNet kind, no max pooling."""
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 24, 24])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])
    return finish_model(nodes, FLAT, [x], [y])


def project_one_unit(model: onnx.ModelProto, rule: str, images: np.ndarray) -> np.ndarray:
    """Every image's projection of the same unit of conv2 (channel 1, value 1, at a position
    where it fires in every image, so that guided backprop's mask lets it through)."""
    from cnnviz.graph import cut_at
    from cnnviz.runtime import make_session

    acts = make_session(cut_at(model, ["a2"]), "cpu", 1).run(None, {"input": images})[0][:, 1]
    active = np.flatnonzero((acts > 0).all(axis=0).ravel())
    assert active.size, "no unit of channel 1 fires in every image"
    n = len(images)
    runner = Runner(unit_projection_graph(model, "a2", n, rule), "cpu", 1)
    out = runner.run({
        "images": images, "channels": np.full(n, 1, np.int64),
        "positions": np.full(n, active[0], np.int64), "values": np.ones(n, np.float32),
    })  # fmt: skip
    return out["projections"]


def test_without_switches_the_deconvnet_ignores_the_image_and_guided_does_not() -> None:
    images = RNG.normal(size=(3, 3, 24, 24)).astype(np.float32)
    flat = pooling_free_model()
    deconv = project_one_unit(flat, "deconvnet", images)
    assert np.abs(deconv[0]).max() > 0
    np.testing.assert_allclose(deconv[1], deconv[0], atol=1e-6)  # the same picture
    np.testing.assert_allclose(deconv[2], deconv[0], atol=1e-6)
    guided = project_one_unit(flat, "guided", images)
    assert np.abs(guided[0] - guided[1]).max() > 0.1 * np.abs(guided[0]).max()
    # with max pooling below the layer the switches make the deconvnet depend on the image
    pooled = project_one_unit(tiny_model(), "deconvnet", images)
    assert np.abs(pooled[0] - pooled[1]).max() > 0.1 * np.abs(pooled[0]).max()


def test_auto_picks_the_rule_by_what_lies_below_the_layer() -> None:
    pooled = tiny_model()
    assert policy.switches_below(pooled, "a1") == []
    assert len(policy.switches_below(pooled, "a2")) == 1  # the MaxPool between the convs
    rule, why = policy.resolve(pooled, "a1", "auto")
    assert rule == "guided" and "no max pooling below this layer" in why
    rule, why = policy.resolve(pooled, "a2", "auto")
    assert rule == "deconvnet" and why.startswith("auto: max pooling below this layer (")
    rule, why = policy.resolve(pooling_free_model(), "a2", "deconvnet")
    assert rule == "deconvnet" and "the same picture for every image" in why
    assert policy.resolve(pooled, "a2", "gradient") == ("gradient", "set in the config")
    with pytest.raises(Exception, match="projection policy 'deconv'"):
        policy.resolve(pooled, "a2", "deconv")


def test_the_runner_uses_and_records_each_layers_rule() -> None:
    from test_activations import batch
    from test_activations import tiny_model as blocks

    model, card = blocks([[], []])  # two conv-relu blocks, no max pooling
    x = batch(2)
    auto = ProjectionRunner(model, card, ["block0", "block1"], 2, 2, "cpu", 1)
    assert {layer: rule for layer, (rule, _) in auto.policies.items()} == {
        "block0": "guided", "block1": "guided"}
    forced = ProjectionRunner(model, card, ["block0", "block1"], 2, 2, "cpu", 1,
                              policy="deconvnet")
    got, want = auto.project_layers(x), forced.project_layers(x)
    # one conv below block0: the two rules agree there (the seeded unit fires)
    for a, b in zip(got["block0"][0], want["block0"][0], strict=True):
        np.testing.assert_allclose(a["projection"], b["projection"], atol=1e-5)
    # block1: guided backprop also masks by block0's forward pass
    differs = [np.abs(a["projection"] - b["projection"]).max() > 1e-3
               for a, b in zip(got["block1"][0], want["block1"][0], strict=True)]
    assert all(differs)


def test_explain_records_the_rule_and_the_caption_names_it(tmp_path: Path) -> None:
    from cnnviz.methods.explain import explain_shard
    from cnnviz.report.captions import explanation_caption
    from test_activations import _staged, write_model_dir
    from test_activations import tiny_model as blocks

    model, card = blocks([[], []])
    model_dir = write_model_dir(tmp_path / "m", model, card)
    summary = explain_shard(model_dir, _staged(tmp_path), ["projections", "deconvnet"],
                            [tmp_path / "p", tmp_path / "d"],
                            {"layers": ["block1"], "top_k": 2}, device="cpu", batch_size=2)
    rows = json.loads((tmp_path / "p" / "index.json").read_text())["rows"]
    assert rows and all(r["policy"] == "guided" for r in rows)
    caption = explanation_caption("projections", rows[0], "")
    assert "projected by guided backprop (auto: no max pooling below this layer" in caption
    deconv = json.loads((tmp_path / "d" / "index.json").read_text())["rows"]
    assert summary["deconvnet"]["maps"] and all(r["image_independent"] for r in deconv)
    assert "the same map for every image" in deconv[0]["notes"][0]


def test_saturated_relu6_units_still_project_under_guided_backprop() -> None:
    """conv -> ReLU6 with large weights: the strongest units sit at the ceiling 6, where the
    activation's slope is 0. Seeded at the conv output (as the atlas is), guided backprop still
    projects them (seeded at the ReLU6 output, every projection was a flat picture)."""
    from test_projections import relu6_model  # the ties-at-6 model

    model, card = relu6_model()
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    runner = ProjectionRunner(model, card, ["conv"], 4, 2, "cpu", 1, policy="guided")
    got = runner.project_layers(x)["conv"]
    saturated = [item for image in got for item in image if item["value"] == 6.0]
    assert len(saturated) >= 2
    assert all(np.abs(item["projection"]).max() > 0 for item in saturated)
