"""FullGrad (cnnviz.methods.fullgrad): the full-gradient decomposition it rests on, BatchNorm
folding, and the maps against pytorch-grad-cam 1.5.7's FullGrad and the authors' reference code.

Fast tests use a hand-built ReLU network (Conv+bias, MaxPool, Conv+BatchNormalization, global
average pool, Gemm); the peer tests (slow) run torch on VGG16 (random, 64 px, every conv biased,
no BatchNorm) and the pretrained EfficientNet-Lite0 (bias-free convs + BatchNorm in torch, folded
into the convs' biases in our export).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from cnnviz import registry
from cnnviz.autodiff import vjp
from cnnviz.methods.fullgrad import bias_layers, fullgrad_graph
from cnnviz.runner import Runner
from cnnviz.runtime import make_session
from onnx import TensorProto, helper
from onnx_build import finish_model

BN_EPS = 1e-3


def _tiny(folded: bool, seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv(4, 3x3, bias) -> Relu -> MaxPool 2 -> Conv(6, 3x3) -> BatchNorm
    (or, `folded`, the same as one Conv with the BatchNorm folded into its weights and bias) ->
    Relu -> GlobalAveragePool -> Flatten -> Gemm(5, bias)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    w2 = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 6), rng.normal(size=6)
    mean, var = rng.normal(size=6), rng.uniform(0.5, 2, 6)
    wg = rng.normal(size=(5, 6)).astype(np.float32)
    bg = rng.normal(size=5).astype(np.float32)
    inits = {"w1": w1, "b1": b1, "wg": wg, "bg": bg}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["z1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["z1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    if folded:
        s = gamma / np.sqrt(var + BN_EPS)
        inits["w2"] = (w2 * s[:, None, None, None]).astype(np.float32)
        inits["b2"] = (beta - mean * s).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["p1", "w2", "b2"], ["z2"], pads=[1, 1, 1, 1]))
    else:
        inits.update(w2=w2, gamma=gamma.astype(np.float32), beta=beta.astype(np.float32),
                     mean=mean.astype(np.float32), var=var.astype(np.float32))
        nodes += [
            helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["z2"],
                             epsilon=BN_EPS),
        ]
    nodes += [
        helper.make_node("Relu", ["z2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    return finish_model(nodes, inits, [x], [y])


def _maps(model: onnx.ModelProto, x: np.ndarray, targets: list[int], norm: str) -> np.ndarray:
    graph = fullgrad_graph(model, 2, norm)
    return Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets)})["map"]


def test_options_declare_the_normalizations():
    spec = registry.METHODS["fullgrad"].options["normalization"]
    assert spec.default in spec.schema["enum"] == ["channel", "layer"]


def test_bias_layers_take_conv_biases_and_batchnorm_effective_biases():
    unfolded, folded = _tiny(False), _tiny(True)
    got, want = bias_layers(unfolded), bias_layers(folded)
    assert [z for z, _ in got] == [z for z, _ in want] == ["z1", "z2"]
    for (_, b), (_, c) in zip(got, want, strict=True):
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)


def test_full_gradient_completeness():
    """The decomposition FullGrad visualises (Srinivas & Fleuret, eq. 3): for a piecewise-linear
    network, y = <x, dy/dx> + sum over biased layers of <b, dy/dz>, where the Gemm's term is its
    bias at the target. The one vjp with wrt = input and both biased conv outputs gives it."""
    model = _tiny(False)
    layers = bias_layers(model)
    core = vjp(model, wrt=["x", *(z for z, _ in layers)], batch=3)
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    targets = [0, 3, 4]
    seed = np.eye(5, dtype=np.float32)[targets]
    out = dict(zip([o.name for o in core.graph.output],
                   make_session(core, "cpu", 1).run(None, {"x": x, "seed:logits": seed}),
                   strict=True))
    total = (x * out["grad:x"]).sum((1, 2, 3)).astype(np.float64)
    for z, bias in layers:
        total += (bias[None, :, None, None] * out[f"grad:{z}"]).sum((1, 2, 3))
    bg = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "bg")
    total += bg[targets]
    logits = out["logits"][np.arange(3), targets]
    np.testing.assert_allclose(total, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())


@pytest.mark.parametrize("norm", ["channel", "layer"])
def test_folded_batchnorm_gives_the_unfolded_map(norm):
    """A bias-free Conv + BatchNormalization and the export's folded Conv give one map: the
    folded bias is BatchNorm's effective bias and dy/dz is taken at the same tensor."""
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    a, b = _maps(_tiny(False), x, [1, 2], norm), _maps(_tiny(True), x, [1, 2], norm)
    assert a.shape == (2, 8, 8) and 0 <= a.min() and abs(a.max() - 1) < 1e-5
    np.testing.assert_allclose(a, b, atol=1e-4)
    other = _maps(_tiny(False), x, [1, 2], "layer" if norm == "channel" else "channel")
    assert np.abs(other - a).max() > 1e-2  # the two normalizations are different maps


def test_a_model_without_biases_gives_the_input_term_alone():
    """dynamo drops all-zero biases (a freshly initialised BatchNorm folded into its conv): the
    map is then FullGrad's input-gradient term alone, which is also what zero biases give."""
    from cnnviz.methods.explain import Job
    from cnnviz.methods.fullgrad import run_fullgrad

    with_zero = _tiny(True)
    for init in with_zero.graph.initializer:
        if init.name in ("b1", "b2"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(init.dims, np.float32), init.name))
    without = onnx.ModelProto.FromString(with_zero.SerializeToString())
    for node in without.graph.node:
        if node.op_type == "Conv":
            del node.input[2:]
    assert len(bias_layers(with_zero)) == 2 and bias_layers(without) == []
    x = np.random.default_rng(4).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_maps(without, x, [1, 3], "channel"),
                               _maps(with_zero, x, [1, 3], "channel"), atol=1e-6)
    job = Job(without, {"name": "tiny"}, ["a", "b"], x, [], [(0, 1)],
              {"normalization": "channel"}, "cpu", 1, 2)
    (_, raw, _, info), = run_fullgrad(job)
    assert info["bias_layers"] == 0 and "input-gradient term alone" in info["notes"][0]
    assert np.isfinite(raw).all() and raw.max() > 0


def test_run_fullgrad_yields_a_map_per_row():
    """The method interface: run_fullgrad(job) over a job's rows (an image twice, two classes;
    three rows at two per call)."""
    from cnnviz.methods.explain import Job
    from cnnviz.methods.fullgrad import run_fullgrad

    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    rows = [(0, 1), (1, 2), (0, 4)]
    options = registry.defaults("fullgrad")
    job = Job(_tiny(True), {"name": "tiny"}, ["a", "b"], x, [], rows, options, "cpu", 1, 2)
    results = list(run_fullgrad(job))
    assert [r[0] for r in results] == [0, 1, 0]
    want = _maps(_tiny(True), x[[0, 1, 0]][:2], [1, 2], "channel")
    np.testing.assert_allclose(results[0][1], want[0], atol=1e-6)
    assert results[2][1].shape == (8, 8) and results[2][2] is None
    assert results[0][3] == {"bias_layers": 2, "normalization": "channel"}
    assert np.abs(results[0][1] - results[2][1]).max() > 1e-2  # the class matters


# ---- against pytorch-grad-cam and the reference code (torch) --------------------------------
@pytest.fixture(scope="module")
def vgg():
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from cam_peer_models import vgg16_case

    return vgg16_case()


@pytest.fixture(scope="module")
def resnet():
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from cam_peer_models import resnet50_case

    return resnet50_case()


@pytest.fixture(scope="module")
def effnet(effnet_dir):
    from cam_peer_models import effnet_case

    return effnet_case(effnet_dir, images=1)  # the peer takes ~5 s an image (cv2 per channel)


def _peer(case) -> tuple[np.ndarray, float]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(2)
    peer = FullGrad(case["net"], [])
    try:
        started = time.perf_counter()
        maps = peer(torch.from_numpy(case["x"]),
                    [ClassifierOutputTarget(t) for t in case["targets"]])
        return maps, time.perf_counter() - started
    finally:
        peer.activations_and_grads.release()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet", "effnet"])
def test_fullgrad_matches_pytorch_grad_cam(name, request):
    """VGG16: the same network on both sides. ResNet-50 and EfficientNet-Lite0: the peer takes
    the BatchNorm layers' effective biases (53 and 49) and the gradients at their outputs; our
    exports folded them into the bias-free convs, whose outputs are the BatchNorms' outputs: the
    same terms."""
    from cam_peer_models import pearson

    case = request.getfixturevalue(name)
    x, targets = case["x"], case["targets"]
    runner = Runner(fullgrad_graph(case["model"], len(x), "channel"), "cpu", 2)
    feeds = {"images": x, "targets": np.asarray(targets)}
    runner.run(feeds)  # warm-up: the peer's modules are warm too after the fixture's forward
    started = time.perf_counter()
    ours = runner.run(feeds)["map"]
    seconds = time.perf_counter() - started
    theirs, peer_seconds = _peer(case)
    for i in range(len(x)):
        assert pearson(ours[i], theirs[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], theirs[i], atol=5e-3)
    print(f"{name}: ours {seconds:.3f} s, pytorch-grad-cam {peer_seconds:.3f} s, {len(x)} images")


@pytest.mark.slow
def test_fullgrad_of_a_folded_conv_bias_and_batchnorm():
    """VGG16-BN: each biased conv is followed by a BatchNorm. The peer on the torch model takes
    26 terms (the conv's bias at the conv's output, BatchNorm's effective bias at its output),
    our folded export 13; the peer on the torch model folded the same way
    (torch.nn.utils.fusion.fuse_conv_bn_eval) takes our 13. Per-channel scaling makes a conv's
    term and its BatchNorm's the same picture (dy/dz differs per channel by the constant
    w_bn / s), so the unfolded peer only weighs the input term half as much: both agree."""
    import copy

    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from cam_peer_models import pearson, vgg16_bn_case
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    case = vgg16_bn_case()
    assert len(bias_layers(case["model"])) == 13
    ours = _maps(case["model"], case["x"], case["targets"], "channel")
    folded = copy.deepcopy(case["net"])
    for i, module in enumerate(folded.features):
        if isinstance(module, torch.nn.BatchNorm2d):
            folded.features[i - 1] = fuse_conv_bn_eval(folded.features[i - 1], module)
            folded.features[i] = torch.nn.Identity()
    for net in (folded, case["net"]):
        theirs, _ = _peer(dict(case, net=net))
        for i in range(len(ours)):
            assert pearson(ours[i], theirs[i]) >= 0.99, i
            np.testing.assert_allclose(ours[i], theirs[i], atol=5e-3)


@pytest.mark.slow
def test_fullgrad_layer_normalization_is_the_reference_code(vgg):
    """normalization: layer against the authors' code (idiap/fullgrad-saliency, FullGrad.saliency
    and _postProcess) written with torch autograd: abs, min-max over each term's [C, h, w] (eps
    1e-6), channel sum, bilinear upsampling with corners aligned, summed; then scaled to [0, 1]."""
    torch = pytest.importorskip("torch")
    from cam_peer_models import pearson

    net, x = vgg["net"], torch.from_numpy(vgg["x"]).requires_grad_(True)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    outs: list = []
    hooks = [c.register_forward_hook(lambda _m, _i, o: outs.append(o)) for c in convs]
    try:
        logits = net(x)
    finally:
        for h in hooks:
            h.remove()
    picked = logits[torch.arange(len(x)), torch.tensor(vgg["targets"])].sum()
    grads = torch.autograd.grad(picked, [x, *outs])

    def post(t):
        t = t.abs()
        t = t - t.flatten(1).min(1).values[:, None, None, None]
        return t / (t.flatten(1).max(1).values[:, None, None, None] + 1e-6)

    cam = post(grads[0] * x).sum(1, keepdim=True)
    for conv, g in zip(convs, grads[1:], strict=True):
        term = post(g * conv.bias[None, :, None, None])
        cam = cam + torch.nn.functional.interpolate(
            term, size=x.shape[-2:], mode="bilinear", align_corners=True).sum(1, keepdim=True)
    cam = cam[:, 0].detach().numpy()
    cam = (cam - cam.min((1, 2), keepdims=True))
    cam = cam / (cam.max((1, 2), keepdims=True) + 1e-7)
    ours = _maps(vgg["model"], vgg["x"], vgg["targets"], "layer")
    for i in range(len(cam)):
        assert pearson(ours[i], cam[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], cam[i], atol=2e-3)
