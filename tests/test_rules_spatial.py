"""Backward rules of rules_spatial (Pad modes, Resize/Upsample, max-like and norm reductions,
Tile, Einsum, Layer/Instance/Group normalization) against central finite differences.

Linear ops (Pad, Resize, Tile, Einsum) are checked with eps=1, where central differences are
exact up to rounding; float64 where ONNX Runtime's CPU provider runs the op in double.
"""

from __future__ import annotations

import numpy as np
import pytest
from cnnviz.autodiff import UnsupportedOpError, vjp
from onnx import helper
from test_autodiff_rules import F32, F64, away_from, build, check, engine_grad, rand, run


# ---- Pad -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
@pytest.mark.parametrize(
    "pads",
    [
        [0, 0, 1, 2, 0, 0, 2, 1],  # both spatial axes, uneven
        [0, 0, 0, 3, 0, 0, 0, 0],  # one side only
        [0, 1, 2, 0, 0, 0, 3, 4],  # channels too; wrap past a whole period (W=5 + 4)
    ],
)
def test_pad_modes(mode, pads):
    if mode == "reflect" and max(pads) >= 4:
        pads = [min(p, 3) for p in pads]  # reflect needs pads < axis length
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    model = build([node], (1, 2, 4, 5), {"pads": np.array(pads, np.int64)}, dtype=F64, opset=19)
    check(model, rand((1, 2, 4, 5), F64), eps=1.0, rtol=1e-9)


def test_pad_edge_with_axes_input():
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="edge")
    inits = {"pads": np.array([3, 1, 0, 2], np.int64), "axes": np.array([-1, 2], np.int64)}
    model = build([node], (1, 2, 4, 5), inits, dtype=F64, opset=19)
    check(model, rand((1, 2, 4, 5), F64), eps=1.0, rtol=1e-9)


def test_pad_reflect_old_opset_attribute():
    node = helper.make_node("Pad", ["x"], ["y"], mode="reflect", pads=[0, 0, 2, 1, 0, 0, 1, 2])
    model = build([node], (1, 2, 4, 5), dtype=F32, opset=9)
    check(model, rand((1, 2, 4, 5)), eps=1.0, rtol=1e-5)


# ---- Resize and Upsample -------------------------------------------------------------------------
TRANSFORMS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
# half_pixel_symmetric with nearest is refused (test_resize_refusals)
PAIRS = [(t, m) for t in TRANSFORMS for m in ["linear", *NEAREST]] + [
    ("half_pixel_symmetric", "linear")
]
SIZES = [(10, 12), (3, 5), (2, 2), (7, 9), (1, 4)]  # from (5, 6): x2, down, down, non-integer


def _resize_model(mode, transform, nearest, out_hw=None, scales=None, opset=19):
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if mode == "nearest":
        attrs["nearest_mode"] = nearest
    if scales is not None:
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
        inits = {"scales": np.array([1, 1, *scales], np.float32)}
        return build([node], (1, 2, 5, 6), inits, opset=opset)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], axes=[2, 3], **attrs)
    sizes = np.array(out_hw, np.int64)  # not the batch: finite differences stack along it
    return build([node], (1, 2, 5, 6), {"sizes": sizes}, opset=opset)


@pytest.mark.parametrize("out_hw", SIZES)
@pytest.mark.parametrize("transform, mode", PAIRS)
def test_resize_by_sizes(out_hw, transform, mode):
    nearest = mode if mode in NEAREST else None
    model = _resize_model("linear" if nearest is None else "nearest", transform, nearest, out_hw)
    check(model, rand((1, 2, 5, 6)), eps=1.0, rtol=1e-5)


# Scales whose float32 product with the size is unambiguous: with 7/5 onnx's shape inference
# says 6 rows where ONNX Runtime makes 7 (float32 1.4 * 5): refused, see test_resize_refusals.
@pytest.mark.parametrize("scales", [(2.0, 2.0), (0.5, 0.5), (1.5, 0.75), (2.5, 1.25), (0.4, 1.75)])
@pytest.mark.parametrize("transform, mode", PAIRS)
def test_resize_by_scales(scales, transform, mode):
    nearest = mode if mode in NEAREST else None
    kind = "linear" if nearest is None else "nearest"
    model = _resize_model(kind, transform, nearest, scales=scales, opset=13)
    check(model, rand((1, 2, 5, 6)), eps=1.0, rtol=1e-5)


def test_resize_axes_and_aspect_ratio_policy():
    attrs = {"mode": "linear", "axes": [3, 2], "keep_aspect_ratio_policy": "not_larger"}
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)
    model = build([node], (1, 2, 5, 6), {"sizes": np.array([9, 20], np.int64)}, opset=19)
    check(model, rand((1, 2, 5, 6)), eps=1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("opset", [8, 9, 10])
def test_upsample_and_resize_10(mode, opset):
    scales = np.array([1, 1, 2, 3], np.float32)
    if opset == 8:
        node = helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=scales.tolist())
    else:
        op = "Upsample" if opset == 9 else "Resize"
        node = helper.make_node(op, ["x", "scales"], ["y"], mode=mode)
    model = build([node], (1, 2, 4, 3), {} if opset == 8 else {"scales": scales}, opset=opset)
    check(model, rand((1, 2, 4, 3)), eps=1.0, rtol=1e-5)


@pytest.mark.parametrize("scales", [(2.0, 3.0), (0.5, 0.75)])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_tf_half_pixel_for_nn(scales, mode):
    model = _resize_model(
        mode, "tf_half_pixel_for_nn", "round_prefer_ceil", scales=scales, opset=13
    )
    check(model, rand((1, 2, 5, 6)), eps=1.0, rtol=1e-5)


def test_resize_10_downsampling_and_a_leading_axis():
    """Resize-10's nearest rounds up when downsampling; the channel axis goes by a Transpose."""
    scales = np.array([1, 1.5, 0.5, 0.75], np.float32)
    node = helper.make_node("Resize", ["x", "scales"], ["y"], mode="nearest")
    model = build([node], (1, 2, 6, 5), {"scales": scales}, opset=10)
    check(model, rand((1, 2, 6, 5)), eps=1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "attrs, why",
    [
        ({"mode": "cubic"}, "cubic"),
        ({"mode": "linear", "antialias": 1}, "antialias"),
        ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric"}, "symm"),
        ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, "crop"),
        ({"mode": "linear", "scales": [1, 1, 1.4, 2]}, r"shape \[1, 2, 6, 10\].*\[1, 2, 7, 10\]"),
    ],
)
def test_resize_refusals(attrs, why):
    scales = np.array(attrs.pop("scales", [1, 1, 2, 2]), np.float32)
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    model = build([node], (1, 2, 5, 5), {"scales": scales}, opset=19)
    with pytest.raises(UnsupportedOpError, match=f"up.*{why}"):
        vjp(model, ["x"])


# ---- max-like and norm reductions ----------------------------------------------------------------
def _reduce_node(op, opset, axes, keepdims):
    if opset >= 18:
        return helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    return helper.make_node(op, ["x"], ["y"], axes=axes, keepdims=keepdims)


def _amax_vjp_numpy(x, g, axes, op):
    """torch's amax/amin backward: the gradient split evenly among the tied extrema."""
    y = (np.max if op == "ReduceMax" else np.min)(x, axis=tuple(axes), keepdims=True)
    mask = (x == y).astype(F64)
    return mask * g.reshape(y.shape) / mask.sum(axis=tuple(axes), keepdims=True)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 0), ([1], 1), ([-1], 0)])
def test_reduce_max_min_with_ties(op, opset, axes, keepdims):
    x = np.round(rand((2, 3, 4, 5), F64, seed=3) * 2) / 2  # many ties on a 0.5 grid
    inits = {"axes": np.array(axes, np.int64)} if opset >= 18 else {}
    model = build([_reduce_node(op, opset, axes, keepdims)], x.shape, inits, F64, opset=opset)
    y = run(model, {"x": x})["y"]
    g = rand(y.shape, F64, seed=4)
    want = _amax_vjp_numpy(x, g, [a % 4 for a in axes], op)
    assert want.astype(bool).sum() > g.size, "the case must have ties"
    np.testing.assert_allclose(engine_grad(model, x, g), want, rtol=1e-12)


def test_reduce_max_without_ties_matches_finite_differences():
    model = build([_reduce_node("ReduceMax", 18, [1, 3], 1)], (1, 3, 4, 5),
                  {"axes": np.array([1, 3], np.int64)}, F64, opset=18)  # fmt: skip
    check(model, rand((1, 3, 4, 5), F64, seed=5), eps=1e-6, rtol=1e-7)


def test_global_max_pool_splits_ties():
    x = np.zeros((2, 3, 4, 4), F32)
    x[0, 0, 1, 1] = x[0, 0, 2, 3] = 5.0  # two winners share
    x[1, 2] = 1.0  # sixteen winners share
    x[0, 1, 0, 0] = 2.0
    model = build([helper.make_node("GlobalMaxPool", ["x"], ["y"])], x.shape)
    g = rand((2, 3, 1, 1), seed=6)
    want = _amax_vjp_numpy(x.astype(F64), g.astype(F64), [2, 3], "ReduceMax")
    np.testing.assert_allclose(engine_grad(model, x, g), want, rtol=1e-6)


@pytest.mark.parametrize("op", ["ReduceL2", "ReduceSumSquare", "ReduceL1", "ReduceLogSumExp"])
@pytest.mark.parametrize("opset", [13, 18])
def test_smooth_reductions(op, opset):
    axes = [1, 3]
    inits = {"axes": np.array(axes, np.int64)} if opset >= 18 else {}
    model = build([_reduce_node(op, opset, axes, 0)], (1, 3, 4, 5), inits, F64, opset=opset)
    x = away_from(rand((1, 3, 4, 5), F64, seed=7), [0], gap=0.01)  # ReduceL1's kink
    check(model, x, eps=1e-6, rtol=1e-6)


def test_reduce_l2_of_zeros_is_zero_not_nan():
    model = build([_reduce_node("ReduceL2", 18, [1], 0)], (1, 3, 2),
                  {"axes": np.array([1], np.int64)}, F64, opset=18)  # fmt: skip
    x = np.zeros((1, 3, 2), F64)
    x[0, :, 1] = [3.0, 0.0, 4.0]
    g = engine_grad(model, x, np.array([[2.0, 10.0]]))
    np.testing.assert_allclose(g[0], [[0, 3 / 5 * 10], [0, 0], [0, 4 / 5 * 10]])  # 0/0 -> 0


# ---- Tile and Einsum -----------------------------------------------------------------------------
@pytest.mark.parametrize("repeats", [[1, 2, 3, 1], [1, 1, 1, 4], [1, 1, 1, 1]])
def test_tile(repeats):
    node = helper.make_node("Tile", ["x", "r"], ["y"])
    model = build([node], (1, 2, 3, 4), {"r": np.array(repeats, np.int64)}, F64)
    check(model, rand((1, 2, 3, 4), F64), eps=1.0, rtol=1e-9)


@pytest.mark.parametrize(
    "equation, w_shape",
    [
        ("bij,jk->bik", (4, 5)),  # matmul
        ("bij,kj->bki", (5, 4)),  # transposed operand and output
        ("bij,ij->b", (3, 4)),  # full contraction
        ("bij,k->bijk", (5,)),  # outer product
        ("bij,jk", (4, 5)),  # implicit output: bik
        ("bij,jk->bk", (4, 5)),  # i summed only in x: broadcast back
    ],
)
def test_einsum_with_a_constant(equation, w_shape):
    node = helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)
    model = build([node], (1, 3, 4), {"w": rand(w_shape, F64, seed=8)}, F64, opset=12)
    check(model, rand((1, 3, 4), F64), eps=1.0, rtol=1e-9)


def test_einsum_both_operands_active():
    """Attention-like scores: both operands depend on x (a product: quadratic in x)."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["q"]),
        helper.make_node("Einsum", ["q", "x"], ["y"], equation="bhqd,bhkd->bhqk"),
    ]
    model = build(nodes, (1, 2, 3, 4), {"k": rand((1, 2, 3, 4), F64, seed=9)}, F64, opset=12)
    check(model, rand((1, 2, 3, 4), F64), eps=1e-3, rtol=1e-8)


@pytest.mark.parametrize("equation", ["bij->bji", "bij->bj", "bij->b"])
def test_einsum_one_operand(equation):
    node = helper.make_node("Einsum", ["x"], ["y"], equation=equation)
    model = build([node], (1, 3, 4), dtype=F64, opset=12)
    check(model, rand((1, 3, 4), F64), eps=1.0, rtol=1e-9)


@pytest.mark.parametrize("equation", ["bii->bi", "b...->b"])
def test_einsum_refusals(equation):
    node = helper.make_node("Einsum", ["x"], ["y"], equation=equation, name="es")
    model = build([node], (1, 3, 3), dtype=F64, opset=12)
    with pytest.raises(UnsupportedOpError, match="es.*equation"):
        vjp(model, ["x"])


# ---- normalizations ------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 2, 1])
def test_layer_norm(axis):
    xs = (1, 3, 4, 5)
    norm_shape = xs[axis:]
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=0.1)]
    inits = {"s": rand(norm_shape, F64, seed=10), "b": rand(norm_shape, F64, seed=11)}
    model = build(nodes, xs, inits, F64, opset=17)
    check(model, rand(xs, F64), eps=1e-5, rtol=1e-6)


def test_instance_norm():
    """float32 only in ONNX Runtime: a larger step and tolerance."""
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=0.01)
    inits = {"s": rand((3,), seed=12), "b": rand((3,), seed=13)}
    model = build([node], (1, 3, 4, 5), inits, opset=17)
    check(model, rand((1, 3, 4, 5)), eps=1e-2, rtol=2e-3)


@pytest.mark.parametrize("opset, groups", [(18, 2), (21, 2), (21, 6), (21, 1)])
def test_group_norm(opset, groups):
    channels = 6
    scale_shape = (groups,) if opset < 21 else (channels,)
    attrs = {"num_groups": groups, "epsilon": 0.05}
    if opset >= 21:
        attrs["stash_type"] = 11  # statistics in double (the default is float32)
    nodes = [  # the Tanh's shape needs the one prepare gives GroupNormalization's output
        helper.make_node("GroupNormalization", ["x", "s", "b"], ["n"], **attrs),
        helper.make_node("Tanh", ["n"], ["y"]),
    ]
    inits = {"s": rand(scale_shape, F64, seed=14), "b": rand(scale_shape, F64, seed=15)}
    model = build(nodes, (1, channels, 3, 2), inits, F64, opset=opset)
    check(model, rand((1, channels, 3, 2), F64), eps=1e-5, rtol=1e-6)
