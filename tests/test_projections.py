"""Deconvnet projections, as cnnviz explain runs them (`projections.projection_graph` through
`ProjectionRunner`), on a tiny conv-relu-maxpool-conv-relu net against a numpy deconvnet."""

from __future__ import annotations

import numpy as np
import onnx
import reference_methods as ref
from cnnviz.methods import projections as pj
from cnnviz.methods.shard_maps import ProjectionWriter
from numpy_conv import conv3x3, conv3x3_transpose
from onnx import TensorProto, helper
from onnx_build import finish_model

S = 24  # input side; conv1 3x3 pad 1 -> maxpool 2x2 stride 2 -> conv2 3x3 pad 1: 12x12 maps
RNG = np.random.default_rng(11)
P = {
    "w1": RNG.normal(0, 0.5, size=(4, 3, 3, 3)).astype(np.float32),
    "b1": RNG.normal(0, 0.1, size=4).astype(np.float32),
    "w2": RNG.normal(0, 0.5, size=(6, 4, 3, 3)).astype(np.float32),
    "b2": RNG.normal(0, 0.1, size=6).astype(np.float32),
    "wf": RNG.normal(size=(5, 6)).astype(np.float32),
    "bf": RNG.normal(size=5).astype(np.float32),
}
CARD = {
    "name": "tiny",
    "input": {"name": "input"},
    "layers": [
        {"name": "conv1", "tensor": "a1", "conv_output": "c1"},
        {"name": "conv2", "tensor": "a2", "conv_output": "c2"},
    ],
}


def tiny_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, S, S])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])
    return finish_model(nodes, P, [x], [y])


def forward(x):
    a1 = np.maximum(conv3x3(x.astype(np.float64), P["w1"], P["b1"]), 0)
    c, h, w = a1.shape
    blocks = a1.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(c, h // 2, w // 2, 4)
    switches = blocks.argmax(axis=-1)  # the Zeiler-Fergus switches
    a2 = np.maximum(conv3x3(blocks.max(axis=-1), P["w2"], P["b2"]), 0)
    return a1, switches, a2


def deconvnet(x, channel):
    """Numpy reference: seed the max, transposed conv2, switch unpooling, relu, transposed conv1."""
    a1, switches, a2 = forward(x)
    y, xx = np.unravel_index(np.argmax(a2[channel]), a2.shape[1:])
    seed = np.zeros_like(a2)
    seed[channel, y, xx] = a2[channel, y, xx]
    g = conv3x3_transpose(seed, P["w2"])  # [4, 12, 12] at the pooled map
    unpooled = np.zeros((g.shape[0], g.shape[1], g.shape[2], 4))
    np.put_along_axis(unpooled, switches[..., None], g[..., None], axis=-1)
    c, h, w = g.shape
    up = unpooled.reshape(c, h, w, 2, 2).transpose(0, 1, 3, 2, 4).reshape(a1.shape)
    return conv3x3_transpose(np.maximum(up, 0), P["w1"]), (int(y), int(xx))


def test_projection_equals_numpy_deconvnet_and_stays_in_receptive_field():
    x = RNG.normal(size=(3, S, S)).astype(np.float32)
    runner = pj.ProjectionRunner(tiny_model(), CARD, ["conv2"], 6, 1, device="cpu", threads=1,
                                  policy="deconvnet")
    items = runner.project_layers(x[None])["conv2"][0]  # all six channels, strongest first
    _, _, a2 = forward(x)
    assert [it["channel"] for it in items] == list(np.argsort(-a2.reshape(6, -1).max(axis=1)))
    for it in items:
        ref_proj, pos = deconvnet(x, it["channel"])
        assert tuple(it["position"]) == pos
        assert abs(it["value"] - a2[it["channel"]][pos]) < 1e-4
        proj = it["projection"]
        assert proj.shape == (3, S, S)
        np.testing.assert_allclose(proj, ref_proj, rtol=1e-4, atol=1e-5 * np.abs(ref_proj).max())
        # receptive field by hand: conv2 (3x3) covers pooled rows y-1..y+1 = conv1 rows
        # 2y-2..2y+3; conv1 (3x3) adds one each side: input rows 2y-3..2y+4 (same for columns)
        lo = [max(0, 2 * p - 3) for p in pos]
        hi = [min(S, 2 * p + 5) for p in pos]
        inside = np.zeros((S, S), bool)
        inside[lo[0] : hi[0], lo[1] : hi[1]] = True
        assert np.abs(proj[:, ~inside]).max() == 0.0
        assert np.abs(proj[:, inside]).max() > 0.0
        y0, y1, x0, x1 = it["bbox"]
        assert lo[0] <= y0 < y1 <= hi[0] and lo[1] <= x0 < x1 <= hi[1]


def test_top_k_are_the_strongest_channels_for_each_image(tmp_path):
    images = RNG.normal(size=(3, 3, S, S)).astype(np.float32)
    runner = pj.ProjectionRunner(tiny_model(), CARD, ["conv1", "conv2"], 3, 2, "cpu", 1,
                                  policy="deconvnet")
    projected = runner.project_layers(images)  # 3 images in calls of 2, the last one padded
    results = projected["conv2"]
    for image, items in zip(images, results, strict=True):
        peaks = forward(image)[2].reshape(6, -1).max(axis=1)
        assert [it["channel"] for it in items] == list(np.argsort(-peaks)[:3])
        assert [it["value"] for it in items] == sorted((it["value"] for it in items), reverse=True)
        for it in items:  # batched projections equal the numpy reference, image by image
            want, _ = deconvnet(image, it["channel"])
            np.testing.assert_allclose(
                it["projection"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max()
            )
    display = RNG.integers(0, 256, size=(S, S, 3), dtype=np.uint8)
    writer = ProjectionWriter(tmp_path, "tiny", 1, 3, (S, S))
    writer.add("img", "conv2", results[0], {})
    (row,) = writer.close()
    stack = np.load(tmp_path / "projections.npy")
    assert stack.shape == (1, 3, 3, S, S)
    restored = stack[0, 0].astype(np.float32) * row["channels"][0]["scale"]
    np.testing.assert_allclose(
        restored, results[0][0]["projection"], atol=1e-3 * np.abs(results[0][0]["projection"]).max()
    )
    assert pj.projection_grid(display, results[0]).shape[1] == 2 * 112 + 4
    first = projected["conv1"][0]
    assert len(first) == 3 and first[0]["value"] >= first[1]["value"] >= first[2]["value"]


def test_ties_at_a_relu6_ceiling_are_broken_by_the_pre_activation():
    act = np.zeros((3, 2, 2), np.float32)
    act[:, 0, 0] = 6.0  # all three channels saturate
    act[0, 1, 1] = 6.0
    pre = act.copy()
    pre[0, 1, 1], pre[2, 0, 0] = 9.0, 7.0
    assert ref.top_channels(act, 3) == [0, 1, 2]
    assert ref.top_channels(act, 2, pre) == [0, 2]
    _, info = ref.unit_seeds(act, [0], pre)
    assert info[0]["position"] == [1, 1] and info[0]["value"] == 6.0


def relu6_model() -> tuple[onnx.ModelProto, dict]:
    """conv 3x3 (8 channels, large weights) -> ReLU6 -> GAP -> Gemm: most channels peak at 6."""
    rng = np.random.default_rng(2)
    p = {
        "w": rng.normal(0, 2.0, size=(8, 3, 3, 3)).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "wf": rng.normal(size=(5, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1),
    ]
    x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])
    model = finish_model(nodes, p, [x_info], [y_info])
    card = {
        "name": "relu6",
        "input": {"name": "input"},
        "layers": [{"name": "conv", "tensor": "a", "conv_output": "c"}],
    }
    return model, card


def test_the_graph_breaks_relu6_ties_as_the_definition():
    """conv -> ReLU6 with large weights: most channels peak at exactly 6; the graph picks the
    channels and positions the step-by-step reference picks from the pre-activation."""
    model, card = relu6_model()
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    runner = pj.ProjectionRunner(model, card, ["conv"], 4, 2, "cpu", 1, policy="deconvnet")
    got = runner.project_layers(x)["conv"]
    want = ref.Projector(model, card, ["conv"], 4).project(x, "conv", 4)
    for g, w in zip(got, want, strict=True):
        assert sum(it["value"] == 6.0 for it in w) >= 2  # ties at the ceiling are really there
        assert [(it["channel"], it["position"]) for it in g] == [
            (it["channel"], it["position"]) for it in w
        ]
        for a, b in zip(g, w, strict=True):
            np.testing.assert_allclose(a["projection"], b["projection"], atol=1e-5)
