"""Finite differences through ONNX Runtime against analytic gradients of tiny models (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.autodiff.finite_diff import (
    central_differences,
    gradcam_weights_fd,
    random_coordinates,
    tail_session,
    tensor_values,
)
from cnnviz.autodiff.tail import tail_model
from cnnviz.errors import ModelError
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(6, 8)).astype(np.float32) * 0.5
W2 = RNG.normal(size=(8, 3)).astype(np.float32) * 0.5


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp() -> onnx.ModelProto:
    """y = tanh(x W1) W2, input [batch, 6], output [batch, 3]."""
    return _model(
        [
            helper.make_node("MatMul", ["input", "W1"], ["h0"]),
            helper.make_node("Tanh", ["h0"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["logits"]),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")],
    )


def mlp_gradient(x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    h = np.tanh(x64 @ W1)
    return ((1 - h**2) * (seed @ W2.T)) @ W1.T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_coordinate_fd_matches_analytic_gradient():
    session = make_session(mlp(), device="cpu")
    x = RNG.normal(size=(1, 6)).astype(np.float32)
    seed = RNG.normal(size=(1, 3))
    fd = central_differences(session, "input", x, seed=seed, eps=1e-2, batch_size=4)
    assert fd.shape == (6,)
    assert rel_err(fd, mlp_gradient(x, seed).ravel()) < 1e-3
    # a subset of coordinates gives the same numbers at those coordinates, in their order
    coords = np.array([4, 1])
    sub = central_differences(session, "input", x, seed=seed, eps=1e-2, coordinates=coords)
    np.testing.assert_allclose(sub, fd[coords], rtol=1e-6)


def test_fd_notices_a_wrong_gradient():
    """The check must be able to fail: a gradient with one wrong entry is visibly off."""
    session = make_session(mlp(), device="cpu")
    x = RNG.normal(size=(1, 6)).astype(np.float32)
    seed = np.eye(3)[[1]]
    wrong = mlp_gradient(x, seed).ravel()
    wrong[2] += 0.2 * np.abs(wrong).max()
    fd = central_differences(session, "input", x, seed=seed, eps=1e-2)
    assert rel_err(fd, wrong) > 0.1


def test_directional_fd_and_output_fn():
    session = make_session(mlp(), device="cpu")
    x = RNG.normal(size=(1, 6)).astype(np.float32)
    seed = RNG.normal(size=(1, 3))
    dirs = RNG.normal(size=(5, 6)).astype(np.float32)
    fd = central_differences(session, "input", x, seed=seed, directions=dirs, eps=1e-2)
    expected = dirs.astype(np.float64) @ mlp_gradient(x, seed).ravel()
    assert rel_err(fd, expected) < 1e-3

    def score(outputs):  # the same scalar, computed from the whole batch of outputs
        return outputs["logits"].astype(np.float64) @ seed.ravel()

    by_fn = central_differences(session, "input", x, output_fn=score, directions=dirs, eps=1e-2)
    np.testing.assert_allclose(by_fn, fd, rtol=1e-4, atol=1e-6)


def test_argument_errors():
    session = make_session(mlp(), device="cpu")
    x = np.zeros((1, 6), np.float32)
    with pytest.raises(ValueError, match="exactly one"):
        central_differences(session, "input", x)
    with pytest.raises(ValueError, match="one sample"):
        central_differences(session, "input", np.zeros((2, 6), np.float32), seed=np.ones(3))
    with pytest.raises(ValueError, match="do not match"):
        central_differences(session, "input", x, seed=np.ones(3), directions=np.ones((2, 5)))


def test_random_coordinates():
    rng = np.random.default_rng(1)
    picked = random_coordinates(100, 10, rng)
    assert len(set(picked.tolist())) == 10 and list(picked) == sorted(picked)
    assert list(random_coordinates(5, 10, rng)) == [0, 1, 2, 3, 4]


C, H, W, K = 4, 3, 3, 5
CONV_W = RNG.normal(size=(C, 2, 3, 3)).astype(np.float32)
FC_W = RNG.normal(size=(K, C)).astype(np.float32)


def cnn(baked_reshape: bool) -> onnx.ModelProto:
    """input [batch,2,3,3] -> Conv -> Relu ("feature") -> GAP -> Reshape -> Gemm -> logits.

    The Reshape's target is either a baked [1, -1] (a batch-1 export) or computed from
    Shape(input) like `x.view(x.size(0), -1)` in a dynamic-batch export.
    """
    nodes = [
        helper.make_node("Conv", ["input", "cw"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["feature"]),
        helper.make_node("GlobalAveragePool", ["feature"], ["pooled"]),
    ]
    inits = [numpy_helper.from_array(CONV_W, "cw"), numpy_helper.from_array(FC_W, "fw")]
    if baked_reshape:
        inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"))
    else:
        inits += [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        ]
        nodes += [
            helper.make_node("Shape", ["input"], ["in_shape"]),
            helper.make_node("Gather", ["in_shape", "zero"], ["bs"], axis=0),
            helper.make_node("Unsqueeze", ["bs", "axis0"], ["bs1"]),
            helper.make_node("Concat", ["bs1", "minus1"], ["flat_shape"], axis=0),
        ]
    nodes += [
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw"], ["logits"], transB=1),
    ]
    batch = 1 if baked_reshape else "batch"
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 2, H, W])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, K])],
        inits,
    )


@pytest.mark.parametrize("baked_reshape", [True, False])
def test_tail_model_is_batchable_and_exact(baked_reshape):
    model = cnn(baked_reshape)
    tail = tail_model(model, "feature")
    assert tail.graph.input[0].name == "feature"
    assert [i.name for i in tail.graph.input] == ["feature"]  # no dependence on "input" left
    assert {n.op_type for n in tail.graph.node} == {"GlobalAveragePool", "Reshape", "Gemm"}
    x = RNG.normal(size=(1, 2, H, W)).astype(np.float32)
    feature, logits = tensor_values(model, {"input": x}, ["feature", "logits"])
    session = make_session(tail, device="cpu")
    many = np.concatenate([feature, 2 * feature, feature])  # a batch of 3 through the tail
    out = session.run(["logits"], {"feature": many})[0]
    np.testing.assert_allclose(out[0], logits[0], rtol=1e-6)
    np.testing.assert_allclose(out[2], logits[0], rtol=1e-6)


def test_gradcam_weights_fd_on_linear_tail():
    model = cnn(baked_reshape=True)
    x = RNG.normal(size=(1, 2, H, W)).astype(np.float32)
    (feature,) = tensor_values(model, {"input": x}, ["feature"])
    seed = np.eye(K)[[2]]
    session, name = tail_session(model, "feature")
    alpha = gradcam_weights_fd(session, name, feature, seed=seed, eps=1e-2, batch_size=4)
    expected = (seed @ FC_W).ravel() / (H * W)  # d logit / dA[k,h,w] = FC_W[c,k] / (H W)
    assert rel_err(alpha, expected) < 1e-4
    # coordinate FD w.r.t. the intermediate tensor: channel k's mean gradient is alpha_k
    grad = central_differences(session, name, feature, seed=seed, eps=1e-2).reshape(C, H, W)
    assert rel_err(grad.mean(axis=(1, 2)), expected) < 1e-3


def test_tail_rejects_unknown_or_unrelated_tensor():
    model = cnn(baked_reshape=True)
    with pytest.raises(ModelError, match="not in the model"):
        tail_model(model, "no_such_tensor")
    with pytest.raises(ModelError, match="does not feed"):
        tail_model(model, "logits", outputs=["feature"])


def test_one_sided_differences_expose_a_kink():
    """Relu at x = 0.0005, eps = 1e-3: forward slope 1, backward 0.5, central 0.75."""
    model = _model(
        [helper.make_node("Relu", ["input"], ["y"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [],
    )
    session = make_session(model, device="cpu")
    x = np.array([[0.0005, 1.0]], np.float32)
    fd = central_differences(session, "input", x, seed=np.ones(2), eps=1e-3, one_sided=True)
    assert fd.shape == (2, 3)
    np.testing.assert_allclose(fd[1], [1, 1, 1], rtol=1e-3)  # smooth: all three agree
    central, forward, backward = fd[0]
    assert forward == pytest.approx(1.0, rel=1e-3) and backward == pytest.approx(0.5, rel=1e-2)
    assert central == pytest.approx(0.75, rel=1e-2)


# ---------------------------------------------------------------------------- gradcheck


@pytest.fixture
def cnn_dir(tmp_path):
    """A model folder like `cnnviz export` writes (dynamic batch; card with a layer table)."""
    import json

    model = cnn(baked_reshape=False)
    onnx.save(model, str(tmp_path / "model.onnx"))
    card = {"name": "tiny", "onnx": "model.onnx",
            "layers": [{"name": "conv", "tensor": "feature", "activation": "Relu"}]}  # fmt: skip
    (tmp_path / "model.json").write_text(json.dumps(card))
    return tmp_path


def test_gradcheck_passes_on_a_correct_engine(cnn_dir, capsys):
    from cnnviz.autodiff.gradcheck import gradcheck, main

    result = gradcheck(cnn_dir, samples=18, layer="conv")
    ops = {row["op_type"]: row for row in result["ops"]}
    assert set(ops) == {"Conv", "Relu", "GlobalAveragePool", "Reshape", "Gemm"}
    assert all(row["status"] == "ok" for row in ops.values()), ops
    assert ops["Conv"]["max_rel_err"] < 1e-3 and ops["Conv"]["cosine"] > 0.9999
    assert result["end_to_end"]["n"] == 18 and result["end_to_end"]["cosine"] > 0.999
    layer = result["layer"]
    assert layer["tensor"] == "feature" and layer["alpha_max_rel_err"] < 1e-3
    assert result["passed"]
    # the command: a table and exit status 0; --json keeps the numbers
    out_json = cnn_dir / "check.json"
    assert main(["--model", str(cnn_dir / "model.onnx"), "--samples", "10",
                 "--json", str(out_json)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "GlobalAveragePool" in printed and "PASSED" in printed
    assert out_json.is_file()


def test_gradcheck_catches_a_wrong_rule(cnn_dir, monkeypatch):
    from cnnviz.autodiff import RULES
    from cnnviz.autodiff.gradcheck import format_report, gradcheck

    right = RULES["GlobalAveragePool"]

    def doubled(ctx, node, gys):  # a plausible bug: the 1/(H W) applied once too few
        two = ctx.scalar(2.0, node.input[0])
        return [ctx.op("Mul", [g, two]) if g else g for g in right(ctx, node, gys)]

    monkeypatch.setitem(RULES, "GlobalAveragePool", doubled)
    result = gradcheck(cnn_dir, samples=18, layer="conv")
    ops = {row["op_type"]: row for row in result["ops"]}
    assert ops["GlobalAveragePool"]["status"] == "fail"
    assert ops["GlobalAveragePool"]["max_rel_err"] > 0.5
    assert ops["Conv"]["status"] == "ok"
    assert result["layer"]["status"] == "fail"  # the Grad-CAM weights are off by 2x
    # end to end, the retry at eps / 10 (for kinks) does not rescue a wrong gradient
    e2e = result["end_to_end"]
    assert e2e["status"] == "fail" and e2e["eps"] == pytest.approx(1e-3) and e2e["scale"] > 1.5
    assert not result["passed"]
    assert "FAILED: GlobalAveragePool" in format_report(result)


def test_gradcheck_under_guided_checks_relu_against_its_rule(cnn_dir):
    from cnnviz.autodiff.gradcheck import gradcheck

    result = gradcheck(cnn_dir, policy="guided", samples=10, layer="conv")
    relu = next(row for row in result["ops"] if row["op_type"] == "Relu")
    assert relu["status"] == "ok" and "guided" in relu["note"]
    assert result["end_to_end"]["status"] == "skipped"
    assert result["layer"]["status"] == "ok"  # GAP + Gemm tail: no policy op, still checked
    assert result["passed"]


def test_gradcheck_errors_name_the_problem(tmp_path):
    from cnnviz.autodiff.gradcheck import main

    assert main(["--model", str(tmp_path / "missing.onnx")]) == 2
    onnx.save(cnn(baked_reshape=False), str(tmp_path / "m.onnx"))
    assert main(["--model", str(tmp_path / "m.onnx"), "--layer", "nope", "--no-per-op"]) == 2


def test_gradcheck_seeds_the_logits_of_a_softmax_model(tmp_path):
    from cnnviz.autodiff.gradcheck import gradcheck

    model = cnn(baked_reshape=False)
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = gradcheck(tmp_path / "m.onnx", samples=10, per_op=False, layer="feature")
    assert result["end_to_end"]["status"] == "ok", result["end_to_end"]
    assert result["layer"]["alpha_max_rel_err"] < 1e-3  # the logits' GAP + Gemm tail: exact
    assert result["passed"]


def test_gradcheck_catches_a_clip_rule_that_ignores_the_upper_bound(tmp_path, monkeypatch):
    """Per-op inputs span Clip's bounds, so a ReLU6 backward that forgets x < 6 is caught."""
    from cnnviz.autodiff import POLICIES
    from cnnviz.autodiff.gradcheck import gradcheck
    from cnnviz.autodiff.policies import relu_gradient

    model = _model(
        [
            helper.make_node("Clip", ["input", "lo", "hi"], ["clipped"]),
            helper.make_node("GlobalAveragePool", ["clipped"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6, np.float32), "hi")],
    )  # fmt: skip
    onnx.save(model, str(tmp_path / "relu6.onnx"))
    assert gradcheck(tmp_path / "relu6.onnx", samples=10)["passed"]

    def relu6_without_top(ctx, node, gys):
        return relu_gradient(ctx, node, gys) + [None, None]

    monkeypatch.setitem(POLICIES["gradient"], "Clip", relu6_without_top)
    result = gradcheck(tmp_path / "relu6.onnx", samples=10)
    clip = next(row for row in result["ops"] if row["op_type"] == "Clip")
    assert clip["status"] == "fail" and clip["max_rel_err"] > 0.5


def test_gradcheck_per_op_where_the_batch_axis_moves(tmp_path, monkeypatch):
    """dynamo's AdaptiveAvgPool2d to a larger grid (torchvision's VGG and AlexNet below 224 px):
    Transpose to [H, W, B, C], GatherND of constant positions, Transpose back, ReduceMean. The
    one-node models of the nodes whose leading axis is not the batch get one of their own; each
    is checked against finite differences (the GatherND rule too), and a wrong GatherND rule
    fails its row."""
    from cnnviz.autodiff import RULES
    from cnnviz.autodiff.gradcheck import gradcheck

    positions = np.random.default_rng(0).integers(0, 2, (3, 2, 3, 2, 2)).astype(np.int64)
    model = _model(
        [
            helper.make_node("Transpose", ["input"], ["hwbc"], perm=[2, 3, 0, 1]),
            helper.make_node("GatherND", ["hwbc", "positions"], ["picked"], name="gather"),
            helper.make_node("Transpose", ["picked"], ["bc"], perm=[4, 5, 0, 1, 2, 3]),
            helper.make_node("ReduceMean", ["bc"], ["pooled"], axes=[3, 5], keepdims=0),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 36])],
        [numpy_helper.from_array(positions, "positions")],
    )  # fmt: skip
    onnx.save(model, str(tmp_path / "adaptive.onnx"))
    result = gradcheck(tmp_path / "adaptive.onnx", samples=12, op_samples=24)
    rows = {row["node"] or row["op_type"]: row for row in result["ops"]}
    assert rows["gather"]["status"] == "ok", rows["gather"]
    assert rows["gather"]["shapes"].startswith("[1, 2, 2, 1, 4]")  # its own batch axis in front
    assert all(row["status"] == "ok" for row in result["ops"]), result["ops"]
    assert result["end_to_end"]["status"] == "ok" and result["passed"]

    right = RULES["GatherND"]

    def last_read_only(ctx, node, gys):  # a plausible bug: half of every read lost
        grad, _ = right(ctx, node, gys)
        return [ctx.op("Mul", [grad, ctx.scalar(0.5, node.input[0])]), None]

    monkeypatch.setitem(RULES, "GatherND", last_read_only)
    wrong = gradcheck(tmp_path / "adaptive.onnx", samples=12, op_samples=24)
    gather = next(row for row in wrong["ops"] if row["node"] == "gather")
    assert gather["status"] == "fail" and not wrong["passed"]
