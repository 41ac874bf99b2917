"""LRP (cnnviz.autodiff.rules_lrp, cnnviz.methods.lrp) on hand-built ONNX models.

Known values: each rule of a dense layer against its definition written out in numpy (zennit
0.5.1's rules: stabilizer z + 1e-6 sign(z), sign(0) = +1); the Norm rule at a sum; conservation
(the relevance at the input sums to the target logit) on bias-free networks with convolutions
(grouped too), max pooling, a residual sum and global average pooling; a BatchNormalization that
is not folded gives the relevance of its folded twin, MatMul + Add that of Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz import registry
from cnnviz.autodiff.rules_lrp import COMPOSITES, Composite, LrpSettings
from cnnviz.methods.lrp import (
    bounds_at_first_conv,
    lrp_graph,
    lrp_model,
    pixel_bounds,
    run_lrp,
)
from cnnviz.runner import Runner
from cnnviz.runtime import make_session
from onnx import TensorProto, helper
from onnx_build import finish_model

EPS = 1e-6
RNG = np.random.default_rng(7)


def _stab(z: np.ndarray, eps: float = EPS) -> np.ndarray:
    return z + eps * np.where(z < 0, -1.0, 1.0)


def _relevance(model, x, target, composite, settings=None) -> tuple[np.ndarray, float]:
    """(relevance at the input of row 0 seeded with one-hot * logit, the logit)."""
    g = lrp_model(model, composite, settings or LrpSettings(), batch=len(x))
    session = make_session(g, "cpu", 1)
    seed = next(i for i in g.graph.input if i.name.startswith("seed:"))
    onehot = np.zeros((len(x), int(seed.type.tensor_type.shape.dim[1].dim_value)), np.float32)
    onehot[:, target] = 1.0
    grad, logits = session.run(["grad:input", seed.name[5:]], {"input": x, seed.name: onehot})
    return grad * logits[:, target].reshape(-1, *[1] * (x.ndim - 1)), logits[:, target]


# ---- dense rules against their definitions -----------------------------------------------------
def _dense(w: np.ndarray, b: np.ndarray | None) -> onnx.ModelProto:
    inits = {"W": w.astype(np.float32)}
    ins = ["input", "W"]
    if b is not None:
        inits["B"] = b.astype(np.float32)
        ins.append("B")
    node = helper.make_node("Gemm", ins, ["logits"], transB=1)
    return finish_model(
        [node], inits,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[0]])],
    )  # fmt: skip


def _reference(rule: str, x, w, b, r, low, high) -> np.ndarray:
    """One dense layer's input relevance by the rule's definition (float64)."""
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    if rule == "epsilon":
        return x * ((r / _stab(x @ w.T + b)) @ w)
    if rule in ("zplus", "alpha_beta"):
        gp = r / _stab(xp @ wp.T + xn @ wn.T + bp)
        pos = xp * (gp @ wp) + xn * (gp @ wn)
        if rule == "zplus":
            return pos
        gn = r / _stab(xp @ wn.T + xn @ wp.T + bn)
        return 2 * pos - (xp * (gn @ wn) + xn * (gn @ wp))
    if rule == "gamma":
        gam = 0.25
        wgp, wgn = w + gam * wp, w + gam * wn
        z = x @ w.T + b
        gp = (z > 0) * r / _stab(xp @ wgp.T + xn @ wgn.T + b + gam * bp)
        gn = (z < 0) * r / _stab(xp @ wgn.T + xn @ wgp.T + b + gam * bn)
        return xp * (gp @ wgp + gn @ wgn) + xn * (gp @ wgn + gn @ wgp)
    if rule == "zbox":
        g = r / _stab(x @ w.T - low @ wp.T - high @ wn.T)
        return x * (g @ w) - low * (g @ wp) - high * (g @ wn)
    if rule == "flat":
        ones = np.ones_like(w)
        return (r / _stab(np.ones_like(x) @ ones.T)) @ ones
    if rule == "wsquare":
        return (r / _stab(np.ones_like(x) @ (w * w).T + b * b)) @ (w * w)
    raise ValueError(rule)


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat",
                                  "wsquare"])
def test_dense_rule_known_values(rule):
    w = RNG.normal(size=(3, 5))
    b = RNG.normal(size=3) * 0.5
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    low, high = np.full((1, 5), -2.0), np.full((1, 5), 3.0)
    target = 1
    ours, logit = _relevance(_dense(w, b), x, target, Composite(rule, rule),
                             LrpSettings(low=low, high=high))
    r = np.zeros((2, 3))
    r[:, target] = x.astype(np.float64) @ w[target] + b[target]
    want = _reference(rule, x.astype(np.float64), w, b, r, low, high)
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    assert np.abs(want).max() > 1e-3  # the rule assigned something


def test_norm_rule_at_a_sum_known_values():
    """x -> (Gemm h1, Gemm h2) -> Add -> Gemm, epsilon everywhere, Norm at the Add."""
    w1, w2, w3 = (RNG.normal(size=s) for s in [(4, 5), (4, 5), (3, 4)])
    b1, b3 = RNG.normal(size=4), RNG.normal(size=3)
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "B1"], ["h1"], transB=1),
        helper.make_node("Gemm", ["input", "W2"], ["h2"], transB=1),
        helper.make_node("Add", ["h1", "h2"], ["s"]),
        helper.make_node("Gemm", ["s", "W3", "B3"], ["logits"], transB=1),
    ]
    inits = {k: v.astype(np.float32) for k, v in
             {"W1": w1, "W2": w2, "W3": w3, "B1": b1, "B3": b3}.items()}
    model = finish_model(
        nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    x = RNG.normal(size=(1, 5)).astype(np.float32)
    ours, _ = _relevance(model, x, 2, "epsilon")
    xd = x.astype(np.float64)
    h1, h2 = xd @ w1.T + b1, xd @ w2.T
    s = h1 + h2
    y = s @ w3.T + b3
    r = np.zeros((1, 3))
    r[0, 2] = y[0, 2]
    r_s = s * ((r / _stab(y)) @ w3)
    r_h1, r_h2 = h1 * r_s / _stab(s), h2 * r_s / _stab(s)
    want = xd * ((r_h1 / _stab(h1)) @ w1) + xd * ((r_h2 / _stab(h2)) @ w2)
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())


def test_norm_rule_at_average_pooling_known_values():
    """x [1, 1, 2, 3] -> AveragePool(1x2, stride 1) -> Flatten -> Gemm, epsilon at the Gemm:
    the pool hands each input x_i * sum_j R_j / stab(y_j) / 2 over the windows j holding it
    (the gradient would hand R_j / 2, whatever x_i)."""
    w = RNG.normal(size=(2, 4))
    nodes = [
        helper.make_node("AveragePool", ["input"], ["y"], kernel_shape=[1, 2]),
        helper.make_node("Flatten", ["y"], ["f"]),
        helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1),
    ]
    model = finish_model(
        nodes, {"W": w.astype("f4")},
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
    )  # fmt: skip
    x = RNG.random(size=(1, 1, 2, 3)).astype(np.float32) + 0.1
    ours, _ = _relevance(model, x, 1, "epsilon")
    xd = x.astype(np.float64)[0, 0]
    y = (xd[:, :-1] + xd[:, 1:]) / 2
    logit = y.ravel() @ w[1]
    r_y = (y.ravel() * w[1] * logit / _stab(logit)).reshape(2, 2)
    share = r_y / _stab(y) / 2
    want = xd * (np.pad(share, [(0, 0), (0, 1)]) + np.pad(share, [(0, 0), (1, 0)]))
    np.testing.assert_allclose(ours[0, 0], want, rtol=2e-4, atol=1e-6)


# ---- conservation on convolutional networks ----------------------------------------------------
def _cnn(bias: bool, batchnorm: bool = False) -> onnx.ModelProto:
    """Conv(3->6) [BN] - Relu - AveragePool(3x3, stride 1, pads 1) - Conv(6->6, 2 groups) - Relu
    - MaxPool - Conv(6->6, depthwise) + residual - Relu - GlobalAveragePool - Flatten - Gemm(4)."""
    def conv(name, cin, cout, group=1, k=3):
        inits[f"{name}.w"] = (RNG.normal(size=(cout, cin // group, k, k)) * 0.4).astype("f4")
        ins = ["", f"{name}.w"]
        if bias:
            inits[f"{name}.b"] = (RNG.normal(size=cout) * 0.2).astype("f4")
            ins.append(f"{name}.b")
        return ins

    inits: dict[str, np.ndarray] = {}
    c1 = conv("c1", 3, 6)
    c2 = conv("c2", 6, 6, 2)
    c3 = conv("c3", 6, 6, 6)
    nodes = [helper.make_node("Conv", ["input", *c1[1:]], ["a1"], pads=[1] * 4)]
    last = "a1"
    if batchnorm:
        for k, v in {"scale": 1 + 0.3 * RNG.normal(size=6), "shift": 0.2 * RNG.normal(size=6),
                     "mean": 0.3 * RNG.normal(size=6), "var": 0.5 + RNG.random(6)}.items():
            inits[f"bn.{k}"] = v.astype("f4")
        nodes.append(helper.make_node(
            "BatchNormalization", ["a1", "bn.scale", "bn.shift", "bn.mean", "bn.var"], ["bn"],
            epsilon=1e-3))
        last = "bn"
    nodes += [
        helper.make_node("Relu", [last], ["r1"]),
        helper.make_node("AveragePool", ["r1"], ["ap"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["ap", *c2[1:]], ["a2"], pads=[1] * 4, group=2),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", *c3[1:]], ["a3"], pads=[1] * 4, group=6),
        helper.make_node("Add", ["a3", "p"], ["s"]),
        helper.make_node("Relu", ["s"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", *(["fc.b"] if bias else [])], ["logits"],
                         transB=1),
    ]  # fmt: skip
    inits["fc.w"] = RNG.normal(size=(4, 6)).astype("f4")
    if bias:
        inits["fc.b"] = (RNG.normal(size=4) * 0.2).astype("f4")
    return finish_model(
        nodes, inits,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip


def _run_graph(model, x, targets, composite, settings):
    graph = lrp_graph(model, 2, composite, settings)
    return Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets, np.int64)})


@pytest.mark.parametrize("composite", [c for c in COMPOSITES if "alpha" not in c])
def test_relevance_sums_to_the_logit_on_a_bias_free_network(composite):
    """Every rule but alpha-beta conserves on a bias-free net (alpha-beta does only where both
    the positive and the negative contributions are non-zero), up to the 1e-6 stabilizers.
    z+ loses the relevance of an output whose positive contributions are all 0: the depthwise
    conv before the residual sum (whose Norm rule hands it relevance also where its output is
    negative) gets positive weights, so that this cannot happen here."""
    model = _cnn(bias=False)
    for t in model.graph.initializer:
        if t.name == "c3.w":
            t.CopyFrom(onnx.numpy_helper.from_array(np.abs(onnx.numpy_helper.to_array(t)), t.name))
    x = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)
    settings = LrpSettings(low=np.full((1, 3, 1, 1), -3.0), high=np.full((1, 3, 1, 1), 3.0))
    out = _run_graph(model, x, [0, 3, 1], composite, settings)  # 2 images per call
    totals = out["signed"].reshape(3, -1).sum(1)
    np.testing.assert_allclose(totals, out["logit"], rtol=1e-4)
    np.testing.assert_allclose(out["map"], out["signed"].sum(1), rtol=1e-5, atol=1e-7)
    assert np.abs(out["logit"]).min() > 1e-2


def test_biases_absorb_relevance():
    model = _cnn(bias=True)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = _run_graph(model, x, [0, 1], "epsilon_plus_flat", LrpSettings())
    totals = out["signed"].reshape(2, -1).sum(1)
    assert np.all(np.abs(totals - out["logit"]) > 1e-3 * np.abs(out["logit"]))


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus_flat", "zplus"])
def test_unfolded_batchnorm_gives_the_folded_relevance(composite):
    """zennit merges BatchNorm into the preceding layer (its canonizer); so does the rule."""
    model = _cnn(bias=True, batchnorm=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    s = inits["bn.scale"] / np.sqrt(inits["bn.var"] + 1e-3)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    nodes = [n for n in folded.graph.node if n.op_type != "BatchNormalization"]
    for n in nodes:
        n.input[:] = ["a1" if i == "bn" else i for i in n.input]
    folded.graph.ClearField("node")
    folded.graph.node.extend(nodes)
    for t in folded.graph.initializer:
        if t.name == "c1.w":
            t.CopyFrom(onnx.numpy_helper.from_array(inits["c1.w"] * s[:, None, None, None], t.name))
        if t.name == "c1.b":
            b = (inits["c1.b"] - inits["bn.mean"]) * s + inits["bn.shift"]
            t.CopyFrom(onnx.numpy_helper.from_array(b.astype("f4"), t.name))
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    settings = LrpSettings(low=np.full((1, 3, 1, 1), -3.0), high=np.full((1, 3, 1, 1), 3.0))
    ours = _run_graph(model, x, [1, 2], composite, settings)["signed"]
    twin = _run_graph(folded, x, [1, 2], composite, settings)["signed"]
    np.testing.assert_allclose(ours, twin, rtol=1e-3, atol=1e-5 * np.abs(twin).max())


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box",
                                       "epsilon_plus_wsquare"])
def test_a_zero_pad_node_before_the_first_conv_is_its_padding(composite):
    """TorchScript writes TF "same" padding as Pad + Conv: flat / w-square / z-box see ones and
    bounds only inside (zennit pads its modified inputs), the border gets no relevance."""
    model = _cnn(bias=True)
    split = onnx.ModelProto()
    split.CopyFrom(model)
    first = split.graph.node[0]
    first.input[0] = "padded"
    first.ClearField("attribute")
    split.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    split.graph.node.insert(0, helper.make_node("Pad", ["input", "pads"], ["padded"]))
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    settings = LrpSettings(low=np.full((1, 3, 1, 1), -3.0), high=np.full((1, 3, 1, 1), 3.0))
    ours = _run_graph(split, x, [1, 2], composite, settings)["signed"]
    want = _run_graph(model, x, [1, 2], composite, settings)["signed"]
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("composite", ["epsilon", "zplus", "gamma"])
def test_matmul_and_bias_add_give_the_gemm_relevance(composite):
    w, b = RNG.normal(size=(3, 5)), RNG.normal(size=3)
    nodes = [helper.make_node("MatMul", ["input", "Wt"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["logits"])]
    split = finish_model(
        nodes, {"Wt": w.T.astype("f4").copy(), "B": b.astype("f4")},
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    ours, _ = _relevance(split, x, 0, composite)
    gemm, _ = _relevance(_dense(w, b), x, 0, composite)
    np.testing.assert_allclose(ours, gemm, rtol=1e-4, atol=1e-6)


# ---- the method ---------------------------------------------------------------------------------
def test_zbox_bounds_follow_a_channel_reversal_before_the_first_conv():
    model = _cnn(bias=False)
    graph = model.graph
    first = graph.node[0]
    first.input[0] = "bgr"
    graph.node.insert(0, helper.make_node("Gather", ["input", "rev"], ["bgr"], axis=1))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 1, 0], np.int64), "rev"))
    pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 255.0}
    low, high = pixel_bounds(pre)
    np.testing.assert_allclose(low.ravel(), (0 - np.array(pre["mean"])) / pre["std"], rtol=1e-6)
    np.testing.assert_allclose(high.ravel(), (1 - np.array(pre["mean"])) / pre["std"], rtol=1e-6)
    lo, hi = bounds_at_first_conv(model, low, high, (3, 8, 8))
    np.testing.assert_allclose(lo[0, :, 0, 0], low.ravel()[::-1], rtol=1e-6)
    np.testing.assert_allclose(hi[0, :, 3, 5], high.ravel()[::-1], rtol=1e-6)
    same, _ = bounds_at_first_conv(_cnn(bias=False), low, high, (3, 8, 8))
    assert same is low


def test_run_lrp_yields_signed_maps():
    from cnnviz.methods.explain import Job

    model = _cnn(bias=False)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    card = {"preprocess": {"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 255.0}}
    options = registry.defaults("lrp")
    options["composite"] = "epsilon_gamma_box"
    job = Job(model, card, ["a", "b"], x, [], [(0, 1), (1, 3), (0, 2)], options, "cpu", 1, 2)
    results = list(run_lrp(job))
    assert [r[0] for r in results] == [0, 1, 0]
    for _, raw, signed, info in results:
        assert raw.shape == (8, 8) and signed.shape == (3, 8, 8) and raw.dtype == np.float32
        np.testing.assert_allclose(raw, signed.sum(0), rtol=1e-5, atol=1e-7)
        assert info["signed"] and info["composite"] == "epsilon_gamma_box"
        assert info["relevance_sum"] == pytest.approx(info["logit"], rel=1e-4)
    assert not np.allclose(results[0][2], results[2][2])  # two targets of one image differ


def test_run_lrp_names_a_bad_option():
    from cnnviz.errors import ConfigError
    from cnnviz.methods.explain import Job

    model = _cnn(bias=False)
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    card = {"preprocess": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    for bad in ({"composite": "epsilon_plus_flatt"}, {"gamma": -1.0}):
        options = registry.defaults("lrp") | bad
        job = Job(model, card, ["a"], x, [], [(0, 1)], options, "cpu", 1, 2)
        with pytest.raises(ConfigError, match="composite|gamma"):
            list(run_lrp(job))


def test_the_registry_offers_every_composite_and_runs_run_lrp():
    """The registry (the one place options are declared) names exactly the composites the
    rules table has; the pipeline runs run_lrp."""
    from cnnviz import registry

    entry = registry.METHODS["lrp"]
    assert entry.run == "cnnviz.methods.lrp:run_lrp"
    assert entry.options["composite"].schema["enum"] == list(COMPOSITES)
    assert entry.options["composite"].default in COMPOSITES
