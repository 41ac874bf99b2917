"""cnnviz.graph on tiny ONNX models built here (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz import graph
from cnnviz.errors import ConfigError
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _init(name: str, shape: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.5, name)


def _model(nodes, inits, output="logits", out_shape=("batch", 5), extra_inputs=()):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))
    g = helper.make_graph(nodes, "tiny", [x, *extra_inputs], [y], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny(softmax: bool = False) -> onnx.ModelProto:
    """Four convs in the naming styles cnnviz meets, each with a different activation pattern.

    c0 TorchScript scope name -> Relu; c1 EfficientNet scope name, grouped stride 2 -> BN -> Clip;
    c2 dynamo-style node name with a named weight, no activation; c3 nameless -> x * sigmoid(x).
    """
    inits = [
        _init("w0", [4, 3, 3, 3]),
        _init("b0", [4]),
        _init("w1", [4, 2, 3, 3]),
        numpy_helper.from_array(np.ones(4, np.float32) * 1.5, "bn_scale"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "bn_bias"),
        numpy_helper.from_array(np.full(4, 0.2, np.float32), "bn_mean"),
        numpy_helper.from_array(np.full(4, 2.0, np.float32), "bn_var"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        _init("_blocks.3._project_conv.weight", [6, 4, 1, 1]),
        _init("onnx::Conv_9", [5, 6, 1, 1]),
        _init("fc_w", [5, 5]),
        _init("fc_b", [5]),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "w0", "b0"], ["c0"], name="/features/features.0/Conv", pads=[1] * 4
        ),
        helper.make_node("Relu", ["c0"], ["r0"], name="/features/features.1/Relu"),
        helper.make_node(
            "Conv",
            ["r0", "w1"],
            ["c1"],
            name="/_blocks.3/_depthwise_conv/Conv",
            pads=[1] * 4,
            strides=[2, 2],
            group=2,
        ),
        helper.make_node(
            "BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"]
        ),
        helper.make_node("Clip", ["n1", "lo", "hi"], ["a1"]),
        helper.make_node("Conv", ["a1", "_blocks.3._project_conv.weight"], ["c2"], name="node_c"),
        helper.make_node("Conv", ["c2", "onnx::Conv_9"], ["c3"]),
        helper.make_node("Sigmoid", ["c3"], ["s3"]),
        helper.make_node("Mul", ["c3", "s3"], ["m3"]),
        helper.make_node("GlobalAveragePool", ["m3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["fc"], ["probs"], axis=1))
        return _model(nodes, inits, output="probs")
    nodes[-1].output[0] = "logits"
    return _model(nodes, inits)


def test_layer_table_rows():
    rows = graph.conv_layers(tiny())
    assert [r["name"] for r in rows] == [
        "features.0",
        "blocks.3.depthwise_conv",
        "blocks.3.project_conv",
        "conv3",
    ]
    assert [r["activation"] for r in rows] == ["Relu", "Clip", None, graph.SWISH]
    assert [r["tensor"] for r in rows] == ["r0", "a1", "c2", "m3"]
    assert [r["conv_output"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert [r["shape"] for r in rows] == [[4, 8, 8], [4, 4, 4], [6, 4, 4], [5, 4, 4]]
    assert rows[1]["kernel"] == [3, 3] and rows[1]["stride"] == [2, 2] and rows[1]["groups"] == 2
    assert rows[2]["kernel"] == [1, 1] and rows[2]["stride"] == [1, 1]
    assert [r["depth"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["conv_node"] == "/features/features.0/Conv"


def test_scope_paths_merge_prefixed_components():
    assert graph._scope_path("/features/features.1/conv/conv.0/conv.0.0/Conv") == (
        "features.1.conv.0.0"
    )
    assert graph._scope_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert graph._scope_path("/Conv") == ""


def test_names_are_unique_and_file_safe():
    model = tiny()
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.name = "/feat ures/x:y/Conv"
    names = [r["name"] for r in graph.conv_layers(model)]
    assert len(set(names)) == len(names) == 4
    # c2 keeps its weight-derived name; the other three share the scope and get suffixes
    assert names == ["feat_ures.x_y", "feat_ures.x_y_2", "feat_ures.x_y_3", "feat_ures.x_y_4"]
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
               for n in names)  # fmt: skip


def test_conv_feeding_two_ops_keeps_conv_output():
    model = tiny()
    # r0 feeds Conv c1 only; make c0 also feed an Add so it has two consumers: no activation
    model.graph.node.insert(2, helper.make_node("Add", ["c0", "c0"], ["twice"]))
    model.graph.output.append(helper.make_tensor_value_info("twice", TensorProto.FLOAT, None))
    row = graph.conv_layers(model)[0]
    assert row["activation"] is None and row["tensor"] == "c0"


def test_weight_name_used_for_dynamo_style_nodes():
    model = tiny()
    model.graph.node[0].name = "node_conv2d_0"
    for init in model.graph.initializer:
        if init.name == "w0":
            init.name = "_features.0.weight"
    model.graph.node[0].input[1] = "_features.0.weight"
    assert graph.conv_layers(model)[0]["name"] == "features.0"


def _conv(x, w, b=None, stride=1, pad=0, groups=1):
    """Reference NCHW convolution in numpy."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    per = o // groups
    for oc in range(o):
        g = oc // per
        xs = x[:, g * cg : (g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                patch = xs[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
                out[:, oc, i, j] = np.sum(patch * w[oc], axis=(1, 2, 3))
    return out if b is None else out + b[None, :, None, None]


def test_expose_returns_reference_values():
    model = tiny()
    arr = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    r0 = np.maximum(_conv(x, arr["w0"], arr["b0"], pad=1), 0)
    c1 = _conv(r0, arr["w1"], stride=2, pad=1, groups=2)
    bn = (c1 - 0.2) / np.sqrt(2.0 + 1e-5) * 1.5 + 0.1
    a1 = np.clip(bn, 0, 6)

    exposed = graph.expose(model, ["r0", "a1", "logits"])
    assert [o.name for o in exposed.graph.output] == ["logits", "r0", "a1"]
    assert [o.name for o in model.graph.output] == ["logits"]  # the input model is unchanged
    got_r0, got_a1, logits = make_session(exposed, device="cpu").run(
        ["r0", "a1", "logits"], {"input": x}
    )
    np.testing.assert_allclose(got_r0, r0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_a1, a1, rtol=1e-4, atol=1e-5)
    plain = make_session(model, device="cpu").run(["logits"], {"input": x})[0]
    np.testing.assert_array_equal(logits, plain)
    shape = exposed.graph.output[2].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape[1:]] == [4, 4, 4]


def test_expose_unknown_tensor_names_it():
    with pytest.raises(ConfigError, match="no_such_tensor"):
        graph.expose(tiny(), ["no_such_tensor"])


def test_find_logits_without_and_with_softmax():
    assert graph.find_logits(tiny()) == "logits"
    with_softmax = tiny(softmax=True)
    assert graph.find_logits(with_softmax) == "fc"

    stripped, changed = graph.strip_softmax(with_softmax)
    assert changed and stripped.graph.output[0].name == "fc"
    assert all(n.op_type != "Softmax" for n in stripped.graph.node)
    x = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    probs = make_session(with_softmax, device="cpu").run(None, {"input": x})[0]
    logits = make_session(stripped, device="cpu").run(None, {"input": x})[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-5)
    assert graph.strip_softmax(tiny())[1] is False


def test_fix_batch_sets_inputs_outputs_and_inferred_shapes():
    model = tiny()
    fixed = graph.fix_batch(model, 3)
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(fixed.graph.input[0]) == [3, 3, 8, 8]
    assert dims(fixed.graph.output[0]) == [3, 5]
    inferred = {v.name: dims(v) for v in fixed.graph.value_info}
    assert inferred["a1"] == [3, 4, 4, 4] and inferred["m3"] == [3, 5, 4, 4]
    assert dims(model.graph.input[0]) == ["batch", 3, 8, 8]  # the input model is unchanged
    x = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert make_session(fixed, device="cpu").run(None, {"input": x})[0].shape == (3, 5)


def test_input_name_skips_initializers_listed_as_inputs():
    model = tiny()
    w0 = helper.make_tensor_value_info("w0", TensorProto.FLOAT, [4, 3, 3, 3])
    model.graph.input.insert(0, w0)
    assert graph.input_name(model) == "input"


def test_shapes_with_large_weights_and_weights_listed_as_inputs():
    """Shape inference leaves big weights out; their leading dim must not become the batch."""
    w = numpy_helper.from_array(np.zeros((64, 3, 5, 5), np.float32), "big_w")  # > 4096 values
    small = numpy_helper.from_array(np.zeros((2, 64, 1, 1), np.float32), "small_w")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 9, 9])
    as_input = helper.make_tensor_value_info("small_w", TensorProto.FLOAT, [2, 64, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3, 3])
    nodes = [
        helper.make_node("Conv", ["input", "big_w"], ["c"], name="/a/Conv", strides=[2, 2]),
        helper.make_node("Conv", ["c", "small_w"], ["y"], name="/b/Conv"),
    ]
    g = helper.make_graph(nodes, "big", [x, as_input], [y], initializer=[w, small])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert [r["shape"] for r in graph.conv_layers(model)] == [[64, 3, 3], [2, 3, 3]]
    fixed = graph.fix_batch(model, 4)
    assert [d.dim_value for d in fixed.graph.input[1].type.tensor_type.shape.dim] == [2, 64, 1, 1]
    c = next(v for v in fixed.graph.value_info if v.name == "c")
    assert [d.dim_value for d in c.type.tensor_type.shape.dim] == [4, 64, 3, 3]
