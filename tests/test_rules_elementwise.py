"""Backward rules of rules_elementwise.py and the PRelu/ThresholdedRelu policy rules, against
central finite differences and numpy references.

ONNX Runtime's CPU provider runs most of these activations in float32 only (Erf, Gelu, Softplus,
Elu, Selu, Celu, Softsign), so the smooth ones are checked in float32 with eps = 1e-2: the
central-difference error eps^2 * f'''/6 and the rounding 1e-7 / eps both stay under 1e-4.
Piecewise inputs are kept away from the kinks.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.autodiff import POLICIES, RULES, UnsupportedOpError, vjp
from onnx import TensorProto, helper, numpy_helper
from test_autodiff_rules import (
    F32,
    F64,
    away_from,
    build,
    check,
    conv_np,
    conv_np_backward,
    engine_grad,
    rand,
    run,
)


# ---- smooth activations, Abs, Reciprocal -------------------------------------------------------
@pytest.mark.parametrize(
    "op,attrs,opset,kinks",
    [
        ("Erf", {}, 17, []),
        ("Gelu", {}, 20, []),
        ("Gelu", {"approximate": "tanh"}, 20, []),
        ("Softplus", {}, 17, []),
        ("Elu", {"alpha": 0.7}, 17, [0]),
        ("Selu", {}, 17, [0]),
        ("Selu", {"alpha": 1.5, "gamma": 0.8}, 17, [0]),
        ("Celu", {"alpha": 2.0}, 17, [0]),
        ("Mish", {}, 18, []),
        ("Abs", {}, 17, [0]),
        ("Reciprocal", {}, 17, [0]),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_smooth_activations_match_finite_differences(op, attrs, opset, kinks):
    model = build([helper.make_node(op, ["x"], ["y"], **attrs)], (1, 80), opset=opset)
    x = np.linspace(-4, 4, 80, dtype=F32)[None] * 1.013
    if op == "Reciprocal":  # 1/x: keep |x| >= 0.5 so the slope stays moderate
        x = away_from(x, kinks, gap=0.5)
    x = away_from(x, kinks, gap=0.05)
    check(model, x, eps=1e-2, rtol=1e-3)


@pytest.mark.parametrize("op", ["Abs", "Reciprocal", "Mish"])
def test_float64_where_ort_runs_the_op_in_double(op):
    model = build([helper.make_node(op, ["x"], ["y"])], (1, 40), dtype=F64, opset=18)
    x = away_from(rand((1, 40), F64, seed=3, scale=2.0), [0], gap=0.3)
    check(model, x, eps=1e-6, rtol=1e-7)


def test_known_values_at_zero():
    """Abs has slope 0 at 0 (its sign); Elu/Selu/Celu take the x <= 0 branch there (torch)."""
    x = np.zeros((1, 1), F32)
    g = np.ones((1, 1), F32)
    cases = {
        ("Abs", ()): 0.0,
        ("Elu", (("alpha", 0.7),)): 0.7,
        ("Selu", (("alpha", 1.5), ("gamma", 2.0))): 3.0,
        ("Celu", (("alpha", 2.0),)): 1.0,
        ("Erf", ()): 2 / np.sqrt(np.pi),
        ("Gelu", ()): 0.5,
        ("Mish", ()): np.tanh(np.log(2.0)),
        ("Softplus", ()): 0.5,
    }
    for (op, attrs), want in cases.items():
        model = build([helper.make_node(op, ["x"], ["y"], **dict(attrs))], (1, 1), opset=20)
        got = engine_grad(model, x, g)
        np.testing.assert_allclose(got, [[want]], rtol=1e-6, err_msg=op)


def test_unknown_gelu_approximation_is_refused():
    model = build([helper.make_node("Gelu", ["x"], ["y"], approximate="cubic")], (1, 3), opset=20)
    with pytest.raises(UnsupportedOpError, match="approximate='cubic'"):
        vjp(model, ["x"])


def test_softsign_keeps_having_no_rule():
    """Softsign stands for "an elementwise op without a rule" in other tests."""
    assert "Softsign" not in RULES
    assert all("Softsign" not in rules for rules in POLICIES.values())


# ---- Max, Min, Where ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_broadcasting_with_every_operand_active(op):
    """Three operands [1,3,4], [1,3,1], [4] (all functions of x), distinct values: each element's
    gradient goes to the operand that attains it, summed over its broadcast axes."""
    nodes = [
        helper.make_node("ReduceMean", ["x", "ax2"], ["m"], keepdims=1),  # [1,3,1]
        helper.make_node("Mul", ["m", "k"], ["a"]),
        helper.make_node("ReduceSum", ["x", "ax1"], ["s"], keepdims=0),  # [1,4]
        helper.make_node("Reshape", ["s", "shape4"], ["b"]),  # [4]
        helper.make_node("Tanh", ["b"], ["c"]),
        helper.make_node(op, ["x", "a", "c"], ["y"]),
    ]
    inits = {
        "ax2": np.array([2], np.int64), "ax1": np.array([1], np.int64),
        "k": np.array(1.7), "shape4": np.array([4], np.int64),
    }  # fmt: skip
    model = build(nodes, (1, 3, 4), inits, dtype=F64, opset=18)
    x = rand((1, 3, 4), F64, seed=4)
    y = run(model, {"x": x})["y"]
    winners = [
        np.isclose(y, x).sum(),
        np.isclose(y, np.broadcast_to(1.7 * x.mean(2, keepdims=True), y.shape)).sum(),
        np.isclose(y, np.broadcast_to(np.tanh(x.sum(1)).reshape(4), y.shape)).sum(),
    ]
    assert all(w > 0 for w in winners), winners  # every operand wins somewhere
    check(model, x, eps=1e-6, rtol=1e-6, stacked=False)  # the [4] operand mixes the batch


@pytest.mark.parametrize("op,fn", [("Max", np.maximum), ("Min", np.minimum)])
def test_max_min_ties_go_to_the_first_input_that_attains_them(op, fn):
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["a"]),
        helper.make_node("Mul", ["x", "k"], ["b"]),  # b == a where k == 1
        helper.make_node(op, ["c", "a", "b"], ["y"]),
    ]
    k = np.array([[1.0, 2.0, 1.0, 0.5, 1.0]], F32)
    c = np.array([[0.0, 0.0, 9.0, 0.0, -9.0]], F32)
    x = np.array([[1.0, 1.0, 1.0, 1.0, 1.0]], F32)
    model = build(nodes, (1, 5), {"one": np.array(1.0, F32), "k": k, "c": c})
    g = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]], F32)
    ys = fn(c, fn(x, k * x))
    ga = g * ((x == ys) & (c != ys))  # a wins unless the constant c got there first
    gb = g * ((k * x == ys) & (c != ys) & (x != ys))
    want = ga + gb * k
    np.testing.assert_allclose(engine_grad(model, x, g), want, rtol=1e-6)
    assert want[0, 0 if op == "Max" else 2] == g[0, 0 if op == "Max" else 2]  # a tie, once


def test_where_masks_and_unbroadcasts_both_branches():
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["cond"]),  # [1,3,4] bool
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=1),  # [1,3,1]
        helper.make_node("Exp", ["s"], ["e"]),
        helper.make_node("Where", ["cond", "sq", "e"], ["y"]),
    ]
    inits = {"zero": np.array(0.0), "ax": np.array([2], np.int64)}
    model = build(nodes, (1, 3, 4), inits, dtype=F64)
    x = away_from(rand((1, 3, 4), F64, seed=5, scale=0.5), [0], gap=0.05)
    g = check(model, x, eps=1e-6, rtol=1e-6)
    seed = np.random.default_rng(1).standard_normal(x.shape)
    pos = x > 0
    want = np.where(pos, seed * 2 * x, 0) + np.exp(x.sum(2, keepdims=True)) * np.where(
        pos, 0, seed
    ).sum(2, keepdims=True)
    np.testing.assert_allclose(g, want, rtol=1e-9)


# ---- PRelu and ThresholdedRelu under each policy ----------------------------------------------
def test_prelu_gradient_matches_finite_differences_with_per_channel_slopes():
    slope = np.array([0.25, -0.5, 1.5], F32).reshape(3, 1, 1)  # broadcast over H, W
    prelu = helper.make_node("PRelu", ["x", "slope"], ["y"])
    model = build([prelu], (1, 3, 4, 4), {"slope": slope})
    x = away_from(rand((1, 3, 4, 4), seed=7), [0], gap=0.05)
    g = check(model, x, eps=1e-2, rtol=1e-4)
    seed = np.random.default_rng(1).standard_normal(x.shape).astype(F32)
    np.testing.assert_allclose(g, seed * np.where(x > 0, 1, slope), rtol=1e-6)


def test_prelu_under_each_policy_against_numpy():
    """Conv -> PRelu. gradient: the true derivative; deconvnet: relu(g); guided: relu(g) * (c > 0)
    on PRelu's input c (a negative slope makes its output positive where c < 0 too)."""
    w = rand((3, 2, 3, 3), seed=6)
    slope = np.array([0.2, -0.7, 0.0], F32).reshape(3, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c", "slope"], ["y"]),
    ]
    model = build(nodes, (1, 2, 5, 5), {"w": w, "slope": slope})
    x = rand((1, 2, 5, 5), seed=8)
    c = conv_np(x[0].astype(F64), w, 1, 1)
    g = rand(c.shape, seed=9).astype(F64)
    through = {
        "gradient": g * np.where(c > 0, 1, slope),
        "deconvnet": np.maximum(g, 0),
        "guided": np.maximum(g, 0) * (c > 0),
    }
    grads = {}
    for policy, gc in through.items():
        want = conv_np_backward(gc, w, x.shape[1:], 1, 1)
        got = engine_grad(model, x, g[None].astype(F32), policy=policy)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=policy)
        grads[policy] = got
    assert not np.allclose(grads["gradient"], grads["guided"])
    assert not np.allclose(grads["deconvnet"], grads["guided"])
    # where an output mask (y > 0) would differ from the input mask
    assert ((c < 0) & (slope < 0) & (g > 0)).any()


def test_prelu_with_a_slope_that_depends_on_the_input_is_refused():
    nodes = [
        helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=1),
        helper.make_node("PRelu", ["x", "m"], ["y"]),
    ]
    model = build(nodes, (1, 4), {"ax": np.array([1], np.int64)}, opset=18)
    with pytest.raises(UnsupportedOpError, match="slope"):
        vjp(model, ["x"])


def test_thresholded_relu_under_each_policy():
    model = build([helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.5)], (1, 40))
    x = away_from(rand((1, 40), seed=10, scale=2.0), [0.5], gap=0.05)
    check(model, x, eps=1e-2, rtol=1e-4)
    g = rand((1, 40), seed=11)
    want = {
        "gradient": g * (x > 0.5),
        "deconvnet": np.maximum(g, 0),
        "guided": np.maximum(g, 0) * (x > 0.5),
    }
    for policy, w in want.items():
        np.testing.assert_allclose(engine_grad(model, x, g, policy=policy), w, err_msg=policy)


# ---- QuantizeLinear / DequantizeLinear: straight-through --------------------------------------
def qdq_conv(quantized: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> [Q -> DQ] -> Conv(int8 per-channel weights, dequantized) -> [Q -> DQ per channel] -> y,
    or the same float model without the activation Q/DQ pairs (weights already dequantized)."""
    rng = np.random.default_rng(12)
    w_q = rng.integers(-100, 100, (4, 2, 3, 3)).astype(np.int8)
    w_scale = np.array([0.01, 0.02, 0.005, 0.015], F32)
    w = w_q.astype(F32) * w_scale.reshape(4, 1, 1, 1)
    conv_pads = {"pads": [1, 1, 1, 1]}
    if not quantized:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **conv_pads)]
        return build(nodes, (1, 2, 6, 6), {"w": w}, opset=19), w
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0, name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], **conv_pads),
        helper.make_node("QuantizeLinear", ["c", "sc", "zc"], ["cq"], axis=1, name="q_out"),
        helper.make_node("DequantizeLinear", ["cq", "sc", "zc"], ["y"], axis=1, name="dq_out"),
    ]
    inits = {
        "sx": np.array(0.03, F32), "zx": np.array(128, np.uint8),
        "wq": w_q, "sw": w_scale,
        "sc": np.array([0.06, 0.1, 0.03, 0.07], F32), "zc": np.zeros(4, np.int8),
    }  # fmt: skip
    return build(nodes, (1, 2, 6, 6), inits, opset=19), w


def test_qdq_conv_is_straight_through_and_marked_approximate():
    quantized, _ = qdq_conv(True)
    plain, _ = qdq_conv(False)
    x = rand((1, 2, 6, 6), seed=13)  # |x| < 3.1 and |conv| < 10: no saturation
    y_q, y_f = run(quantized, {"x": x})["y"], run(plain, {"x": x})["y"]
    assert 0.01 < np.abs(y_q - y_f).max() < 0.1 * np.abs(y_f).max()  # rounded, a little
    g = rand(y_f.shape, seed=14)
    grad_model = vjp(quantized, ["x"], ["y"])
    meta = {p.key: p.value for p in grad_model.metadata_props}
    assert meta["cnnviz.approximate"].split(",") == ["q_out", "q_in"]  # not the DQ nodes
    got = run(grad_model, {"x": x, "seed:y": g})["grad:x"]
    want = engine_grad(plain, x, g)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # the float model's gradient is exact: no approximate mark
    assert "cnnviz.approximate" not in {p.key for p in vjp(plain, ["x"]).metadata_props}


def test_dequantize_linear_alone_is_exact():
    """DequantizeLinear is linear in its input: d/dq ((q - zp) * scale) = scale, per channel."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.FLOAT),  # keeps x the wrt input
        helper.make_node("QuantizeLinear", ["xi", "s1"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1, name="dq"),
    ]
    s = np.array([0.5, 2.0, 3.0], F32)
    model = build(nodes, (1, 3, 2), {"s": s, "s1": np.array(1.0, F32)}, opset=19)
    x = rand((1, 3, 2), seed=15)
    g = rand((1, 3, 2), seed=16)
    np.testing.assert_allclose(engine_grad(model, x, g), g * s.reshape(1, 3, 1), rtol=1e-6)


def test_blocked_quantization_is_refused():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=1, block_size=2),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1, block_size=2),
    ]
    model = build(nodes, (1, 4), {"s": np.ones((1, 2), F32)}, opset=21)
    with pytest.raises(UnsupportedOpError, match="block_size"):
        vjp(model, ["x"])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_gradcheck_per_op_rows_pass_on_the_new_ops(tmp_path, policy):
    """`cnnviz gradcheck`'s per-op check: finite differences for the true derivatives, the numpy
    statement of the rule for PRelu/ThresholdedRelu under deconvnet/guided."""
    from cnnviz.autodiff.gradcheck import gradcheck

    rng = np.random.default_rng(17)
    chain = [
        ("PRelu", ["slope"], {}), ("ThresholdedRelu", [], {"alpha": 0.3}), ("Gelu", [], {}),
        ("Mish", [], {}), ("Elu", [], {"alpha": 0.5}), ("Erf", [], {}),
    ]  # fmt: skip
    nodes, t = [helper.make_node("Conv", ["input", "w"], ["c0"], pads=[1, 1, 1, 1])], "c0"
    for k, (op, extra, attrs) in enumerate(chain):
        nodes.append(helper.make_node(op, [t, *extra], [f"a{k}"], name=f"{op}_{k}", **attrs))
        t = f"a{k}"
    nodes += [
        helper.make_node("Max", [t, "c0"], ["m"]),
        helper.make_node("GlobalAveragePool", ["m"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    inits = {"w": rng.standard_normal((3, 2, 3, 3)).astype(F32) * 0.5,
             "slope": np.array([0.2, -0.4, 0.1], F32).reshape(3, 1, 1)}  # fmt: skip
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = gradcheck(tmp_path / "m.onnx", policy=policy, samples=10)
    rows = {row["op_type"]: row for row in result["ops"]}
    assert {op for op, _, _ in chain} | {"Max"} <= set(rows)
    assert all(row["status"] == "ok" for row in rows.values()), rows
    modified = {op for op, row in rows.items() if "rule vs numpy" in row.get("note", "")}
    assert modified == (set() if policy == "gradient" else {"PRelu", "ThresholdedRelu"})
