"""Receptive fields from the ONNX graph: textbook values, padding, branches, and the data agrees."""

from __future__ import annotations

import numpy as np
import pytest
from cnnviz.errors import ModelError
from cnnviz.receptive import Field, receptive_field, tensor_extent, unit_box
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inits, side=None, outputs=("y",), channels=3):
    shape = ["batch", channels, side or "h", side or "w"]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    ys = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    arrays = [numpy_helper.from_array(_typed(v), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "rf", [x], ys, arrays)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _typed(value):
    value = np.asarray(value)
    return value if value.dtype.kind == "i" else value.astype(np.float32)


def conv(name, src, k=3, pad=1, stride=1, cin=3, cout=3, **attrs):
    """A Conv node and its weight (all ones: every input pixel in the window counts)."""
    pads = [pad] * 4 if isinstance(pad, int) else list(pad)
    node = helper.make_node("Conv", [src, f"{name}.w"], [name], kernel_shape=[k, k],
                            pads=pads, strides=[stride, stride], **attrs)
    return node, {f"{name}.w": np.ones((cout, cin, k, k), np.float32)}


def vgg_stack():
    """VGG16's 13 conv3x3/pad 1 layers and 5 maxpool 2x2/stride 2, in order."""
    plan = [2, "p", 2, "p", 3, "p", 3, "p", 3, "p"]
    nodes, inits, names, src = [], {}, [], "input"
    for step in plan:
        if step == "p":
            name = f"pool{len([n for n in names if n.startswith('pool')]) + 1}"
            nodes.append(helper.make_node("MaxPool", [src], [name], kernel_shape=[2, 2],
                                          strides=[2, 2]))
            names.append(name)
            src = name
            continue
        for _ in range(step):
            name = f"conv{len(names)}"
            node, w = conv(name, src)
            relu = helper.make_node("Relu", [name], [name + ".relu"])
            nodes += [node, relu]
            inits.update(w)
            names.append(name + ".relu")
            src = name + ".relu"
    return make_model(nodes, inits, 224, outputs=(src,)), names


# Textbook VGG16 receptive fields (conv1_1 ... pool5) and strides.
VGG_SIZES = [3, 5, 6, 10, 14, 16, 24, 32, 40, 44, 60, 76, 92, 100, 132, 164, 196, 212]
VGG_STRIDES = [1, 1, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32]


def test_vgg16_receptive_fields_match_the_textbook():
    model, names = vgg_stack()
    fields = [receptive_field(model, name) for name in names]
    assert [f[0].size for f in fields] == VGG_SIZES
    assert [f[1].size for f in fields] == VGG_SIZES
    assert [f[0].stride for f in fields] == VGG_STRIDES
    # Symmetric padding: unit 0 is centred on the centre of the first stride-sized input block.
    for f in fields:
        assert f[0].offset + (f[0].size - 1) / 2 == (f[0].stride - 1) / 2
    assert fields[-1][0] == Field(212, 32, -90)
    assert tensor_extent(model, names[-1]) == (7, 7)


@pytest.mark.parametrize(
    ("pads", "auto_pad", "offset", "extent"),
    [
        ([0, 0, 1, 1], None, 0, 112),  # EfficientNet's stem: TF "SAME" as explicit end pads
        ([1, 1, 0, 0], None, -1, 112),
        ([1, 0, 0, 0], None, -1, 112),  # top pad only: y offset -1 ...
        (None, "SAME_UPPER", 0, 112),  # even input, k 3, s 2: total pad 1, at the end
        (None, "SAME_LOWER", -1, 112),
        (None, "VALID", 0, 111),
    ],
)
def test_stride2_conv_with_asymmetric_padding(pads, auto_pad, offset, extent):
    attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": pads}
    node = helper.make_node("Conv", ["input", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                            **attrs)
    model = make_model([node], {"w": np.ones((2, 3, 3, 3))}, 224)
    (fy, fx) = receptive_field(model, "y")
    assert fy == Field(3, 2, offset)
    assert tensor_extent(model, "y")[0] == extent
    if pads == [1, 0, 0, 0]:
        assert fx == Field(3, 2, 0) and tensor_extent(model, "y")[1] == 111  # ... x unpadded


def test_dilation_pooling_and_a_symbolic_input():
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["a"], kernel_shape=[3, 3], dilations=[2, 2],
                         pads=[2, 2, 2, 2]),
        helper.make_node("AveragePool", ["a"], ["b"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["b", "pads"], ["c"]),
        helper.make_node("Conv", ["c", "w2"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = {"w": np.ones((2, 3, 3, 3)), "w2": np.ones((2, 2, 2, 2)),
             "pads": np.array([0, 0, 1, 3, 0, 0, 0, 0], np.int64)}
    model = make_model(nodes, inits)  # symbolic [n, 3, h, w]: explicit pads need no size
    assert receptive_field(model, "a")[0] == Field(5, 1, -2)
    assert receptive_field(model, "b")[0] == Field(7, 2, -3)
    assert receptive_field(model, "c") == (Field(7, 2, -5), Field(7, 2, -9))
    assert receptive_field(model, "y") == (Field(9, 4, -5), Field(9, 4, -9))


def test_branches_take_the_union_and_gates_are_left_out():
    a, wa = conv("a", "input", k=5, pad=[0, 2, 4, 2])  # y: [0, 5); x: [-2, 3)
    b, wb = conv("b", "input", k=3, pad=[2, 1, 0, 1])  # y: [-2, 1); x: [-1, 2)
    nodes = [
        a, b,
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        # squeeze-and-excitation: a global gate multiplies the map
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"]),
        helper.make_node("Sigmoid", ["gap"], ["gate"]),
        helper.make_node("Mul", ["sum", "gate"], ["gated"]),
        helper.make_node("Relu", ["gated"], ["y"]),
    ]  # fmt: skip
    model = make_model(nodes, {**wa, **wb}, 32, outputs=("y", "cat", "gap"))
    union = (Field(7, 1, -2), Field(5, 1, -2))  # y: [-2, 5); x: [-2, 3)
    assert receptive_field(model, "sum") == union
    assert receptive_field(model, "cat") == union
    assert receptive_field(model, "gap") == (Field(32, 0, 0), Field(32, 0, 0))
    assert receptive_field(model, "y") == union
    assert unit_box(receptive_field(model, "gap"), (0, 0), (32, 32)) == [0, 32, 0, 32]


def test_unsupported_ops_and_unknown_tensors_are_named():
    nodes = [
        helper.make_node("Resize", ["input", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Relu", ["up"], ["y"]),
    ]
    model = make_model(nodes, {"scales": np.array([1, 1, 2, 2])}, 8)
    with pytest.raises(ModelError, match="Resize"):
        receptive_field(model, "y")
    with pytest.raises(ModelError, match="not in ONNX graph"):
        receptive_field(model, "nope")


def test_unit_box_is_clipped_to_the_image():
    fields = (Field(10, 4, -3), Field(10, 4, -3))
    assert unit_box(fields, (0, 1), (20, 20)) == [0, 7, 1, 11]
    assert unit_box(fields, (5, 2), (20, 20)) == [17, 20, 5, 15]


# --------------------------------------------------------------------------- the data agrees


def _gradient_support(model, tensor, shape, units):
    """|d unit / d input| > 0 for each (channel, y, x) unit, by the gradient engine."""
    from cnnviz.methods.atlas import project_units
    from cnnviz.methods.projections import unit_projection_graph
    from cnnviz.runner import Runner

    runner = Runner(unit_projection_graph(model, tensor, len(units), "gradient"), "cpu", 1)
    x = np.random.default_rng(0).normal(size=(len(units), *shape)).astype(np.float32)
    return project_units(runner, x, [(c, y, xx, 1.0) for c, y, xx in units])


def test_a_linear_units_gradient_is_non_zero_exactly_on_its_receptive_field():
    """Positive weights, no ReLU: the input gradient of a unit covers its (clipped) field."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["a"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[0, 1, 1, 0]),
        helper.make_node("AveragePool", ["a"], ["b"], kernel_shape=[3, 3], strides=[1, 1],
                         pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Conv", ["b", "w2"], ["y"], kernel_shape=[3, 3], dilations=[2, 2],
                         pads=[2, 2, 2, 2]),
    ]
    inits = {"w1": rng.uniform(0.5, 1, (2, 3, 3, 3)), "w2": rng.uniform(0.5, 1, (2, 2, 3, 3))}
    model = make_model(nodes, inits, 20, outputs=("y",))
    fields = receptive_field(model, "y")
    units = [(0, 0, 0), (1, 4, 7), (0, 9, 9), (1, 9, 0)]
    grads = _gradient_support(model, "y", (3, 20, 20), units)
    for (_, y, x), grad in zip(units, grads, strict=True):
        y0, y1, x0, x1 = unit_box(fields, (y, x), (20, 20))
        support = np.abs(grad).max(axis=0) > 0
        expected = np.zeros_like(support)
        expected[y0:y1, x0:x1] = True
        assert np.array_equal(support, expected), (y, x)


def test_a_deconvnet_projection_is_zero_outside_the_receptive_field():
    """Tiny conv-relu-maxpool-conv-relu net, random weights: every unit of every channel."""
    from cnnviz.methods.atlas import project_units
    from cnnviz.methods.projections import unit_projection_graph
    from cnnviz.runner import Runner

    rng = np.random.default_rng(5)
    c1, _ = conv("c1", "input", k=3, pad=1, cout=4)
    c2, _ = conv("c2", "p1", k=3, pad=[0, 1, 2, 1], cin=4, cout=3)
    nodes = [c1, helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             c2, helper.make_node("Relu", ["c2"], ["a2"])]  # fmt: skip
    inits = {"c1.w": rng.normal(size=(4, 3, 3, 3)), "c2.w": rng.normal(size=(3, 4, 3, 3))}
    model = make_model(nodes, inits, 16, outputs=("a2",))
    fields = receptive_field(model, "a2")
    assert fields == (Field(8, 2, -1), Field(8, 2, -3))
    runner = Runner(unit_projection_graph(model, "a2", 16), "cpu", 1)
    image = rng.normal(size=(1, 3, 16, 16)).astype(np.float32)
    units = [(c, y, x, 1.0) for c in range(3) for y in range(8) for x in range(8)]
    grads = project_units(runner, np.repeat(image, len(units), 0), units)
    inside_nonzero = 0
    for (_, y, x, _), grad in zip(units, grads, strict=True):
        y0, y1, x0, x1 = unit_box(fields, (y, x), (16, 16))
        outside = np.abs(grad).max(axis=0)
        inside_nonzero += bool(outside[y0:y1, x0:x1].any())
        outside[y0:y1, x0:x1] = 0
        assert not outside.any(), (y, x)
    assert inside_nonzero > len(units) // 2  # and the projections are not simply all zero
