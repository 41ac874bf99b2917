"""Backward rules of cnnviz.autodiff against central finite differences and numpy references.

Every model is a few nodes built here with onnx.helper. Float64 where ONNX Runtime's CPU provider
runs the op in double; float32 otherwise (Conv, pooling, LRN, HardSwish...), with inputs kept away
from kinks so central differences are exact on the linear pieces up to rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.autodiff import POLICIES, UnsupportedOpError, vjp
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper

F32, F64 = np.float32, np.float64


# ---- helpers -------------------------------------------------------------------------------------
def build(nodes, x_shape, inits=None, dtype=F32, opset=17, x="x", y="y", extra_outputs=()):
    """A model with one input `x` (leading dim symbolic 'batch') and output `y`."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(x, et, ["batch", *x_shape[1:]])]
    outputs = [helper.make_tensor_value_info(n, et, None) for n in (y, *extra_outputs)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "t", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run(model, feeds, outputs=None):
    session = make_session(model, device="cpu", threads=1)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(outputs, feeds), strict=True))


def engine_grad(model, x, seed, wrt="x", out="y", **kw):
    grad_model = vjp(model, [wrt], [out], batch=x.shape[0], **kw)
    return run(grad_model, {"x": x, f"seed:{out}": seed})[f"grad:{wrt}"]


def fd_grad(model, x, seed, eps, out="y", stacked=True):
    """Central differences of sum(seed * f(x)) for a batch-1 x.

    stacked: all perturbed copies in one run along the batch axis (the model must treat samples
    independently); otherwise one run per perturbation.
    """
    n = x.size
    eye = np.eye(n, dtype=x.dtype).reshape(n, *x.shape[1:]) * eps
    points = np.concatenate([x + eye, x - eye]).astype(x.dtype)
    if stacked:
        y = run(model, {"x": points})[out].astype(F64).reshape(2 * n, -1)
    else:
        session = make_session(model, device="cpu", threads=1)
        y = np.stack([session.run([out], {"x": p[None]})[0].ravel() for p in points]).astype(F64)
    f = (y * seed.astype(F64).reshape(1, -1)).sum(1)
    return ((f[:n] - f[n:]) / (2 * eps)).reshape(x.shape)


def check(model, x, eps, rtol, seed=None, out="y", stacked=True, **kw):
    """Engine gradient vs central differences; returns the engine gradient."""
    y = run(model, {"x": x})[out]
    rng = np.random.default_rng(1)
    seed = rng.standard_normal(y.shape).astype(x.dtype) if seed is None else seed
    g = engine_grad(model, x, seed, out=out, **kw)
    ref = fd_grad(model, x, seed, eps, out=out, stacked=stacked)
    assert g.shape == x.shape
    err = np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err < rtol, f"relative error {err:.2e}"
    return g


def away_from(x, kinks, gap=0.05):
    """Move entries of x within `gap` of any kink to kink + gap."""
    x = x.copy()
    for k in kinks:
        close = np.abs(x - k) < gap
        x[close] = k + gap * np.sign(x[close] - k + 1e-12)
    return x


def rand(shape, dtype=F32, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ---- convolution ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2], "pads": [0, 0, 1, 1]},  # TF-SAME style, uneven
        {"strides": [2, 2], "pads": [1, 1, 2, 2]},
        {"strides": [2, 2], "pads": [1, 0, 0, 1]},
        {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [2, 2]},
        {"strides": [2, 2], "pads": [2, 2, 2, 2], "dilations": [2, 2]},
        {"strides": [1, 1], "pads": [3, 0, 3, 2]},  # pads beyond the kernel: ConvTranspose
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"strides": [3, 2], "auto_pad": "SAME_LOWER"},
    ],
)
def test_conv_geometry(attrs):
    w = rand((4, 3, 3, 3), seed=1)
    model = build(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
        (1, 3, 9, 8),
        {"w": w, "b": rand((4,), seed=2)},
    )
    check(model, rand((1, 3, 9, 8)), eps=1.0, rtol=1e-4)  # linear: eps=1 is exact


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mult", [1, 2])
def test_conv_depthwise_and_grouped(stride, mult):
    """group=C (depthwise, channel multiplier 1 or 2); stride 1 takes the flipped-kernel Conv."""
    w = rand((4 * mult, 1, 3, 3), seed=3)
    conv = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        group=4,
        strides=[stride] * 2,
        pads=[0, 1, 1, 1] if stride == 2 else [1, 1, 1, 1],
    )
    model = build([conv], (1, 4, 7, 7), {"w": w})
    check(model, rand((1, 4, 7, 7)), eps=1.0, rtol=1e-4)


@pytest.mark.parametrize(
    "attrs, side",
    [
        ({"strides": [2, 2], "pads": [0, 0, 1, 1], "kernel_shape": [3, 3]}, 8),  # TF-SAME
        ({"strides": [2, 2], "pads": [1, 2, 2, 1], "kernel_shape": [5, 5]}, 9),
        ({"strides": [3, 2], "pads": [0, 0, 0, 0], "kernel_shape": [3, 3]}, 10),  # cropped end
        ({"strides": [2, 2], "dilations": [2, 1], "pads": [2, 1, 2, 1], "kernel_shape": [3, 3]}, 9),
    ],
)
@pytest.mark.parametrize("group", [4, 1])
def test_conv_grouped_strided_is_zero_inserted_conv(attrs, side, group):
    """Grouped (and asymmetric dense) stride-s backward: zero insertion + stride-1 flipped
    Conv, no ConvTranspose (cuDNN's grouped dgrad is slow; ORT's CUDA provider runs an
    asymmetric ConvTranspose on the CPU); every geometry matches finite differences."""
    pads = attrs["pads"]
    if group == 1 and pads[:2] == pads[2:]:
        pytest.skip("dense with symmetric pads keeps its ConvTranspose")
    w = rand((8, 4 // group, *attrs["kernel_shape"]), seed=5)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    model = build([conv], (1, 4, side, side), {"w": w})
    grad_model = vjp(model, ["x"], batch=1)
    assert "ConvTranspose" not in [n.op_type for n in grad_model.graph.node]
    check(model, rand((1, 4, side, side)), eps=1.0, rtol=1e-4)


def test_conv_grouped_two_groups_dilated():
    w = rand((6, 2, 3, 3), seed=4)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=2, dilations=[2, 1], pads=[2, 1, 2, 1])
    model = build([conv], (1, 4, 7, 6), {"w": w})
    grad_model = vjp(model, ["x"], batch=1)
    ops = [n.op_type for n in grad_model.graph.node]
    assert "ConvTranspose" not in ops  # stride 1: flipped-kernel Conv
    check(model, rand((1, 4, 7, 6)), eps=1.0, rtol=1e-4)


# ---- pooling -----------------------------------------------------------------------------------
def maxpool_vjp_numpy(x, g, k, s, pads):
    """Route each output's gradient to its window's (first) maximum."""
    n, c, h, w = x.shape
    widths = ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))
    xp = np.pad(x, widths, constant_values=-np.inf)
    gx = np.zeros_like(xp)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            win = xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(n, c, -1)
            arg = win.argmax(-1)
            for b in range(n):
                for ch in range(c):
                    di, dj = divmod(arg[b, ch], k)
                    gx[b, ch, i * s + di, j * s + dj] += g[b, ch, i, j]
    return gx[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w]


@pytest.mark.parametrize(
    "k,s,pads,ceil",
    [
        (2, 2, [0, 0, 0, 0], 0),
        (3, 2, [1, 1, 1, 1], 0),
        (3, 2, [0, 0, 0, 0], 1),
        (3, 1, [1, 0, 1, 0], 0),
    ],
)
def test_maxpool_switch_unpooling(k, s, pads, ceil):
    x = rand((2, 3, 8, 8), seed=5)
    node = helper.make_node(
        "MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=ceil
    )
    model = build([node], x.shape)
    g_out = rand(run(model, {"x": x})["y"].shape, seed=6)
    if ceil:  # the ceil-mode windows past the edge: numpy sees them through extra -inf padding
        pads = [0, 0, 1, 1]
    ref = maxpool_vjp_numpy(x, g_out, k, s, pads)
    g = engine_grad(model, x, g_out)
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-6)
    for policy in ("deconvnet", "guided"):  # switch unpooling under every policy
        np.testing.assert_allclose(engine_grad(model, x, g_out, policy=policy), ref, atol=1e-6)


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 1, 0]},
    ],
)
def test_average_pool(attrs):
    model = build([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], (1, 2, 7, 6))
    check(model, rand((1, 2, 7, 6)), eps=1.0, rtol=1e-4)


def test_average_pool_ceil_mode_that_changes_the_size_is_refused():
    node = helper.make_node(
        "AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="pool1"
    )
    model = build([node], (1, 2, 7, 7))
    with pytest.raises(UnsupportedOpError, match="pool1.*ceil_mode"):
        vjp(model, ["x"])


@pytest.mark.parametrize("opset", [17, 18])
def test_global_pool_and_reduce_mean(opset):
    reduce = (
        helper.make_node("ReduceMean", ["g", "axes"], ["y"], keepdims=0)
        if opset >= 18
        else helper.make_node("ReduceMean", ["g"], ["y"], axes=[2, 3], keepdims=0)
    )
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("GlobalAveragePool", ["sq"], ["gp"]),
        helper.make_node("Add", ["sq", "gp"], ["g"]),
        reduce,
    ]
    model = build(nodes, (1, 2, 3, 4), {"axes": np.array([2, 3], dtype=np.int64)}, opset=opset)
    check(model, rand((1, 2, 3, 4)), eps=1e-2, rtol=1e-4)  # quadratic: central FD is exact


# ---- ReLU-like ops and policies ----------------------------------------------------------------
@pytest.mark.parametrize(
    "node,kinks",
    [
        (helper.make_node("Relu", ["x"], ["y"]), [0]),
        (helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), [0, 6]),
        (helper.make_node("Clip", ["x", "", "hi"], ["y"]), [6]),
        (helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1), [0]),
        (helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4), [-4 / 3, 2]),
        (helper.make_node("HardSwish", ["x"], ["y"]), [-3, 3]),
        (helper.make_node("Sigmoid", ["x"], ["y"]), []),
    ],
    ids=["relu", "clip", "clip-max-only", "leaky", "hardsigmoid", "hardswish", "sigmoid"],
)
def test_activation_gradients(node, kinks):
    inits = {"lo": np.array(0, F32), "hi": np.array(6, F32)}
    model = build([node], (1, 60), inits)
    x = away_from(np.linspace(-8, 8, 60, dtype=F32)[None], kinks, gap=0.05)
    check(model, x, eps=1e-2, rtol=2e-3)


def test_policies_on_clip_and_leaky_relu():
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
        helper.make_node("LeakyRelu", ["x"], ["l"], alpha=0.1),
        helper.make_node("Add", ["c", "l"], ["y"]),
    ]
    model = build(nodes, (1, 8), {"lo": np.array(0, F32), "hi": np.array(6, F32)})
    x = np.array([[-2, -0.5, 0.5, 3, 5.5, 6.5, 8, 1]], F32)
    g = np.array([[1, -1, 1, -1, 1, -1, 1, -2]], F32)
    clip_in, leaky_pos = (x > 0) & (x < 6), x > 0
    expected = {
        "gradient": g * clip_in + g * np.where(leaky_pos, 1, 0.1),
        "deconvnet": 2 * np.maximum(g, 0),
        "guided": np.maximum(g, 0) * clip_in + np.maximum(g, 0) * leaky_pos,
    }
    assert set(POLICIES) == set(expected)
    for policy, want in expected.items():
        np.testing.assert_allclose(engine_grad(model, x, g, policy=policy), want, rtol=1e-6)


def conv_np(x, w, stride, pad):
    c_out, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    size = (xp.shape[1] - k) // stride + 1
    y = np.zeros((c_out, size, size))
    for i in range(size):
        for j in range(size):
            patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
            y[:, i, j] = np.einsum("ocij,cij->o", w, patch)
    return y


def conv_np_backward(g, w, x_shape, stride, pad):
    _, _, k, _ = w.shape
    gx = np.zeros((x_shape[0], x_shape[1] + 2 * pad, x_shape[2] + 2 * pad))
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            gx[:, i * stride : i * stride + k, j * stride : j * stride + k] += np.einsum(
                "o,ocij->cij", g[:, i, j], w
            )
    return gx[:, pad : pad + x_shape[1], pad : pad + x_shape[2]]


def test_guided_and_deconvnet_on_conv_relu_maxpool_conv():
    """Reference in numpy: conv -> relu -> maxpool(2) -> conv, with each policy's ReLU rule."""
    w1, w2 = rand((4, 2, 3, 3), seed=7), rand((3, 4, 3, 3), seed=8)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    model = build(nodes, (1, 2, 8, 8), {"w1": w1, "w2": w2})
    x = rand((1, 2, 8, 8), seed=9)
    c1 = conv_np(x[0].astype(F64), w1, 1, 1)
    r1 = np.maximum(c1, 0)
    p1 = r1.reshape(4, 4, 2, 4, 2).max(axis=(2, 4))
    g = rand(conv_np(p1, w2, 2, 1).shape, seed=10)
    gp1 = conv_np_backward(g, w2, p1.shape, 2, 1)
    gr1 = maxpool_vjp_numpy(r1[None], gp1[None], 2, 2, [0, 0, 0, 0])[0]
    results = {}
    for policy, relu_back in {
        "gradient": lambda gr: gr * (c1 > 0),
        "deconvnet": lambda gr: np.maximum(gr, 0),
        "guided": lambda gr: np.maximum(gr, 0) * (c1 > 0),
    }.items():
        ref = conv_np_backward(relu_back(gr1), w1, x.shape[1:], 1, 1)
        got = engine_grad(model, x, g[None].astype(F32), policy=policy)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        results[policy] = got
    assert not np.allclose(results["gradient"], results["guided"])
    assert not np.allclose(results["deconvnet"], results["guided"])


# ---- arithmetic, linear algebra, smooth functions (float64) ------------------------------------
def test_broadcasting_arithmetic_with_both_operands_differentiated():
    c = rand((1, 3, 1), F64, seed=11)
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["a"]),  # [1,3,4] * [1,3,1]
        helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=1),  # [1,3,1]
        helper.make_node("Sigmoid", ["s"], ["sg"]),
        helper.make_node("Sub", ["a", "sg"], ["d"]),  # broadcast b operand
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Add", ["t", "two"], ["t2"]),
        helper.make_node("Div", ["d", "t2"], ["q"]),  # both operands active
        helper.make_node("Exp", ["q"], ["e"]),
        helper.make_node("Mul", ["e", "sg"], ["y"]),
    ]
    inits = {"c": c, "ax": np.array([2], np.int64), "two": np.array(2.0)}
    model = build(nodes, (1, 3, 4), inits, dtype=F64)
    check(model, rand((1, 3, 4), F64, scale=0.5), eps=1e-6, rtol=1e-7)


def test_pow_sqrt_log():
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Add", ["sq", "one"], ["p"]),
        helper.make_node("Sqrt", ["p"], ["r"]),
        helper.make_node("Log", ["p"], ["l"]),
        helper.make_node("Pow", ["p", "e"], ["pw"]),
        helper.make_node("Pow", ["r", "l"], ["pw2"]),  # both operands active
        helper.make_node("Sum", ["r", "l", "pw", "pw2"], ["y"]),
    ]
    model = build(nodes, (1, 5), {"one": np.array(1.0), "e": np.array(1.5)}, dtype=F64)
    check(model, rand((1, 5), F64), eps=1e-6, rtol=1e-7)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_both_operands(trans_a, trans_b):
    # y = Gemm(A, B, C) with A = x-derived [2,3] (or its transpose), B from x too.
    a_shape, b_shape = ((3, 2) if trans_a else (2, 3)), ((4, 3) if trans_b else (3, 4))
    nodes = [
        helper.make_node("MatMul", ["x", "pa"], ["a"]),
        helper.make_node("Reshape", ["a", "sa"], ["A"]),
        helper.make_node("MatMul", ["x", "pb"], ["b"]),
        helper.make_node("Reshape", ["b", "sb"], ["B"]),
        helper.make_node(
            "Gemm", ["A", "B", "C"], ["y"], alpha=0.7, beta=1.3, transA=trans_a, transB=trans_b
        ),
    ]
    inits = {
        "pa": rand((5, 6), F64, seed=12),
        "pb": rand((5, 12), F64, seed=13),
        "sa": np.array(a_shape, np.int64),
        "sb": np.array(b_shape, np.int64),
        "C": rand((4,), F64, seed=14),
    }
    model = build(nodes, (1, 5), inits, dtype=F64)
    check(model, rand((1, 5), F64), eps=1e-6, rtol=1e-7, stacked=False)


def test_gemm_with_active_bias():
    nodes = [helper.make_node("Gemm", ["x", "w", "x"], ["y"], transB=1, beta=0.5)]
    model = build(nodes, (1, 3), {"w": rand((3, 3), F64, seed=15)}, dtype=F64)
    check(model, rand((1, 3), F64), eps=1e-6, rtol=1e-7)


@pytest.mark.parametrize(
    "w_shape,x_shape,axes",
    [
        ((4, 3), (1, 2, 4), [0, 2]),  # 2-D right operand shared by the batch
        ((3, 4, 5), (1, 1, 2, 4), [0, 1, 3]),  # x's axis 1 broadcast to 3
        ((4,), (1, 3, 4), [0, 2]),  # 1-D right operand
    ],
)
def test_matmul_broadcasting(w_shape, x_shape, axes):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("ReduceSum", ["t", "ax"], ["s"], keepdims=0),  # 1-D, size x.shape[-2]
        helper.make_node("MatMul", ["s", "x"], ["v"]),  # 1-D left operand, both active
        helper.make_node("Flatten", ["m"], ["mf"]),
        helper.make_node("Flatten", ["v"], ["vf"]),
        helper.make_node("Concat", ["mf", "vf"], ["y"], axis=1),
    ]
    inits = {"w": rand(w_shape, F64, seed=16), "ax": np.array(axes, np.int64)}
    model = build(nodes, x_shape, inits, dtype=F64)
    check(model, rand(x_shape, F64), eps=1e-6, rtol=1e-7, stacked=False)


@pytest.mark.parametrize(
    "op,opset,axis", [("Softmax", 17, -1), ("Softmax", 11, 1), ("LogSoftmax", 17, 1)]
)
def test_softmax_rules(op, opset, axis):
    model = build(
        [helper.make_node(op, ["x"], ["y"], axis=axis)], (1, 3, 4), dtype=F64, opset=opset
    )
    check(model, rand((1, 3, 4), F64), eps=1e-6, rtol=1e-7)


def test_batchnorm_transpose_and_reshapes():
    c = 3
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("Transpose", ["bn"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Unsqueeze", ["t", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["sq"]),
        helper.make_node("Identity", ["sq"], ["i"]),
        helper.make_node("Dropout", ["i"], ["dr"]),
        helper.make_node("Cast", ["dr"], ["ca"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["ca"], ["y"]),
    ]
    inits = {
        "s": rand((c,), seed=17),
        "b": rand((c,), seed=18),
        "m": rand((c,), seed=19),
        "v": np.abs(rand((c,), seed=20)) + 0.5,
        "ax": np.array([2], np.int64),
    }
    model = build(nodes, (1, c, 2, 3), inits)
    check(model, rand((1, c, 2, 3)), eps=1.0, rtol=1e-4)


@pytest.mark.parametrize("size", [3, 5])  # ORT's LRN kernel takes odd sizes only
def test_lrn(size):
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=0.5, beta=0.75, bias=1.0)
    model = build([node], (1, 6, 2, 2))
    check(model, rand((1, 6, 2, 2)), eps=1e-2, rtol=2e-3)


# ---- slicing and joining ---------------------------------------------------------------------
def test_pad_concat_split_slice():
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"]),  # positive and negative (cropping) pads
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Concat", ["p", "t"], ["c"], axis=3),
        helper.make_node("Split", ["c", "split"], ["s1", "s2", "s3"], axis=3),
        helper.make_node("Slice", ["s3", "st", "en", "axes", "steps"], ["sl"]),  # step 2
        helper.make_node("Slice", ["s1", "st1", "en1", "axes1"], ["sl1"]),
        helper.make_node("Mul", ["sl1", "sl1"], ["q"]),
        helper.make_node("Flatten", ["q"], ["qf"]),
        helper.make_node("Flatten", ["sl"], ["slf"]),
        helper.make_node("Concat", ["qf", "slf"], ["y"], axis=1),  # s2 gets no gradient
    ]
    inits = {
        "pads": np.array([0, 0, 1, -1, 0, 0, -1, 2], np.int64),  # H: +1/-1, W: -1/+2 -> W 5
        "split": np.array([3, 2, 4], np.int64),  # W after concat: 5 + 4 = 9
        "st": np.array([-1, 4], np.int64),
        "en": np.array([-100, 0], np.int64),
        "axes": np.array([3, 2], np.int64),
        "steps": np.array([-2, -3], np.int64),
        "st1": np.array([1], np.int64),
        "en1": np.array([5], np.int64),
        "axes1": np.array([2], np.int64),
    }
    model = build(nodes, (1, 2, 3, 4), inits, dtype=F64)
    check(model, rand((1, 2, 3, 4), F64), eps=1e-6, rtol=1e-7)


def test_expand_and_constant_folded_shape_chain():
    """TorchScript-style Shape->Gather->Unsqueeze->Concat->Reshape folds away with a fixed batch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Expand", ["r", "big"], ["e"]),  # [B, 1, 6] -> [B, 3, 6]
        helper.make_node("Mul", ["e", "e"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, np.int64),
        "zero1": np.array([0], np.int64),
        "minus1": np.array([1, -1], np.int64),
        "big": np.array([1, 3, 6], np.int64),
    }
    model = build(nodes, (1, 2, 3), inits, dtype=F64)
    grad_model = vjp(model, ["x"], batch=1)
    assert not {"Shape", "Gather"} & {n.op_type for n in grad_model.graph.node}
    check(model, rand((1, 2, 3), F64), eps=1e-6, rtol=1e-7)


# ---- driver: intermediate wrt, seeds, outputs, errors, fallback ---------------------------------
def small_cnn(classes=5):
    rng = np.random.default_rng(21)
    inits = {
        "w1": rng.standard_normal((4, 2, 3, 3)).astype(F32),
        "w2": rng.standard_normal((6, 4, 3, 3)).astype(F32),
        "fc": rng.standard_normal((classes, 6)).astype(F32),
        "fb": rng.standard_normal(classes).astype(F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1),
    ]
    return nodes, inits


def test_wrt_intermediate_stops_there():
    nodes, inits = small_cnn()
    model = build(nodes, (1, 2, 6, 6), inits, y="logits")
    full = vjp(model, ["x"], batch=1)
    tail = vjp(model, ["feat"], batch=1)
    convt = [n for n in tail.graph.node if n.op_type in ("ConvTranspose", "Conv")]
    assert len(convt) == 2  # conv1 and conv2 forward only: nothing differentiated before feat
    assert len(tail.graph.node) < len(full.graph.node)
    assert [o.name for o in tail.graph.output] == ["logits", "feat", "grad:feat"]
    x = rand((1, 2, 6, 6), seed=22)
    seed = np.eye(5, dtype=F32)[[3]]
    out = run(tail, {"x": x, "seed:logits": seed})
    # d logit_3 / d feat = fc[3] / (H*W) broadcast over the map (GAP -> Gemm is linear)
    want = np.broadcast_to((inits["fc"][3] / 36)[None, :, None, None], out["feat"].shape)
    np.testing.assert_allclose(out["grad:feat"], want, rtol=1e-6)
    # both at once: grad:x equals the full-model gradient
    both = run(vjp(model, ["x", "feat"], batch=1), {"x": x, "seed:logits": seed})
    np.testing.assert_allclose(both["grad:feat"], want, rtol=1e-6)
    alone = run(full, {"x": x, "seed:logits": seed})["grad:x"]
    np.testing.assert_allclose(both["grad:x"], alone, rtol=1e-5, atol=1e-6)


def test_batch_of_one_hot_seeds_gives_each_sample_its_own_gradient():
    nodes, inits = small_cnn()
    model = build(nodes, (1, 2, 6, 6), inits, y="logits")
    x = rand((3, 2, 6, 6), seed=23)
    classes = [4, 0, 2]
    seeds = np.eye(5, dtype=F32)[classes]
    batched = run(vjp(model, ["x"], batch=3), {"x": x, "seed:logits": seeds})["grad:x"]
    single = vjp(model, ["x"], batch=1)
    for b, cls in enumerate(classes):
        alone = run(single, {"x": x[b : b + 1], "seed:logits": np.eye(5, dtype=F32)[[cls]]})
        np.testing.assert_allclose(batched[b], alone["grad:x"][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[1])


def test_several_seeded_outputs_sum():
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"]), helper.make_node("Sin", ["x"], ["z"])]
    model = build(nodes, (1, 3), dtype=F64, extra_outputs=("z",))
    with pytest.raises(Exception, match="several outputs"):
        vjp(model, ["x"])
    grad_model = vjp(model, ["x"], ["y", "x"])  # a seed on x itself adds to the gradient
    x = rand((1, 3), F64)
    sy, sx = rand((1, 3), F64, seed=2), rand((1, 3), F64, seed=3)
    g = run(grad_model, {"x": x, "seed:y": sy, "seed:x": sx})["grad:x"]
    np.testing.assert_allclose(g, 2 * x * sy + sx, rtol=1e-12)


def test_softmax_output_seeds_the_logits():
    nodes, inits = small_cnn()
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="final"))
    model = build(nodes, (1, 2, 6, 6), inits, y="probs")
    grad_model = vjp(model, ["x"], batch=1)
    inputs = [i.name for i in grad_model.graph.input]
    assert "seed:logits" in inputs and "seed:probs" not in inputs
    meta = {p.key: p.value for p in grad_model.metadata_props}
    assert "final" in meta["cnnviz.seed_note"] and "logits" in meta["cnnviz.seed_note"]
    x = rand((1, 2, 6, 6), seed=24)
    seed = np.eye(5, dtype=F32)[[1]]
    out = run(grad_model, {"x": x, "seed:logits": seed})
    assert out["probs"].sum() == pytest.approx(1.0, rel=1e-5)
    plain = build(small_cnn()[0], (1, 2, 6, 6), inits, y="logits")
    want = run(vjp(plain, ["x"]), {"x": x, "seed:logits": seed})["grad:x"]
    np.testing.assert_allclose(out["grad:x"], want, rtol=1e-6)


def test_result_keeps_opset_and_sets_ir_version():
    nodes, inits = small_cnn()
    model = build(nodes, (1, 2, 6, 6), inits, y="logits")
    model.ir_version = 10
    grad_model = vjp(model, ["x"], batch=2, policy="guided")
    onnx.checker.check_model(grad_model, full_check=True)
    assert grad_model.ir_version == 10
    assert [(o.domain, o.version) for o in grad_model.opset_import] == [("", 17)]
    shape = [d.dim_value for d in grad_model.graph.input[0].type.tensor_type.shape.dim]
    assert shape == [2, 2, 6, 6]
    seed = grad_model.graph.input[1]
    assert seed.name == "seed:logits"
    assert [d.dim_value for d in seed.type.tensor_type.shape.dim] == [2, 5]


def test_missing_rule_names_op_node_and_the_way_out():
    nodes = [helper.make_node("Softsign", ["x"], ["y"], name="ss1")]
    model = build(nodes, (1, 4))
    with pytest.raises(UnsupportedOpError, match=r"Softsign.*'ss1'.*fallback: finite-differences"):
        vjp(model, ["x"])


def test_fallback_refuses_non_elementwise_ops():
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")
    model = build([node], (1, 4), {"axis": np.array(1, np.int64)})
    with pytest.raises(UnsupportedOpError, match="only covers elementwise"):
        vjp(model, ["x"], fallback="finite-differences")
    with pytest.raises(UnsupportedOpError, match="only covers elementwise"):
        vjp(model, ["x"])


@pytest.mark.parametrize(
    "node,derivative",
    [
        (helper.make_node("Softsign", ["t"], ["y"], name="ss"), lambda t: 1 / (1 + np.abs(t)) ** 2),
        (helper.make_node("Sin", ["t"], ["y"], name="sin"), np.cos),
    ],
    ids=["softsign", "sin"],
)
def test_finite_difference_fallback_matches_the_derivative(node, derivative):
    scale = np.array(3.0, F32)
    model = build([helper.make_node("Mul", ["x", "k"], ["t"]), node], (1, 50), {"k": scale})
    x = away_from(np.linspace(-4, 4, 50, dtype=F32)[None] * 1.01, [0], gap=0.02)
    g = rand((1, 50), seed=25)
    grad_model = vjp(model, ["x"], fallback="finite-differences")
    meta = {p.key: p.value for p in grad_model.metadata_props}
    assert meta["cnnviz.approximate"] == node.name
    got = run(grad_model, {"x": x, "seed:y": g})["grad:x"]
    want = g * derivative(3.0 * x.astype(F64)) * 3.0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
