"""Multi-layer LayerCAM (cnnviz.methods.layercam_fusion): the layer choice, both fusions against
their definitions on a hand-built network, and against pytorch-grad-cam 1.5.7's LayerCAM with the
same target layers (mean) and the paper's / TorchCAM's fusion written in torch (max).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from cnnviz import registry
from cnnviz.autodiff import vjp
from cnnviz.errors import ConfigError
from cnnviz.graph import conv_layers
from cnnviz.methods import cam
from cnnviz.methods.layercam_fusion import (
    fusion_layers,
    layercam_fusion_graph,
    stage_layers,
)
from cnnviz.runner import Runner
from cnnviz.runtime import make_session
from onnx import TensorProto, helper
from onnx_build import finish_model


def _tiny() -> onnx.ModelProto:
    """x [N, 3, 16, 16] -> Conv 4 (3x3) Relu -> Conv 6 Relu -> MaxPool 2 -> Conv 8 Relu ->
    MaxPool 2 -> Conv 8 Relu -> GlobalAveragePool -> Gemm 5: stages 16, 8 and 4 px."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, channels = {}, [], "x", 3
    for k, (out, pool) in enumerate([(4, False), (6, True), (8, True), (8, False)]):
        inits[f"w{k}"] = rng.normal(size=(out, channels, 3, 3)).astype(np.float32) / 3
        inits[f"b{k}"] = rng.normal(size=out).astype(np.float32) * 0.1
        nodes += [helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"z{k}"], pads=[1] * 4,
                                   name=f"conv{k}"),
                  helper.make_node("Relu", [f"z{k}"], [f"r{k}"], name=f"relu{k}")]
        prev, channels = f"r{k}", out
        if pool:
            nodes.append(helper.make_node("MaxPool", [prev], [f"p{k}"], kernel_shape=[2, 2],
                                          strides=[2, 2]))
            prev = f"p{k}"
    inits["wg"] = rng.normal(size=(5, channels)).astype(np.float32)
    inits["bg"] = np.zeros(5, np.float32)
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    return finish_model(nodes, inits, [x], [y])


@pytest.fixture(scope="module")
def tiny():
    model = _tiny()
    card = {"name": "tiny", "input": {"name": "x"}, "layers": conv_layers(model),
            "output": {"name": "logits", "num_classes": 5}}
    x = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    return model, card, x, [0, 2, 4]


def _run(model, tensors, x, targets, fusion, images=2) -> np.ndarray:
    graph = layercam_fusion_graph(model, tensors, images, fusion)
    return Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets)})["map"]


def test_options():
    spec = registry.METHODS["layercam_fusion"].options
    assert spec["fusion"].default in spec["fusion"].schema["enum"] == ["mean", "max"]
    assert spec["layers"].default == "auto" and spec["stages"].default >= 1


def test_auto_layers_are_the_stage_ends(tiny):
    _, card, _, _ = tiny
    assert [r["shape"][-1] for r in card["layers"]] == [16, 16, 8, 4]
    assert [r["tensor"] for r in stage_layers(card, 4)] == ["r1", "r2", "r3"]
    assert fusion_layers(card, "auto", 2) == ["r2", "r3"]
    assert fusion_layers(card, " w0 , r3", 9) == ["r0", "r3"]  # names or tensors, in order
    model = tiny[0]
    assert fusion_layers(card, "p1,r3", 1, model) == ["p1", "r3"]  # any tensor of the model
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        fusion_layers(card, "r3,nope", 1, model)


def test_one_layer_is_layercam(tiny):
    model, card, x, targets = tiny
    ours = _run(model, ["r3"], x, targets, "mean")
    graph = cam.cam_graph(model, card, "r3", 3, ("layercam",))
    theirs = Runner(graph, "cpu", 1).run({"images": x, "targets": np.asarray(targets)})
    np.testing.assert_allclose(ours, theirs["layercam"], atol=1e-4)


def _reference(model, tensors, x, targets, fusion) -> np.ndarray:
    """The fusions step by step in numpy from the engine's A and G (one vjp, several wrt)."""
    core = vjp(model, wrt=tensors, batch=len(x))
    seed = np.eye(5, dtype=np.float32)[targets]
    out = dict(zip([o.name for o in core.graph.output],
                   make_session(core, "cpu", 1).run(None, {"x": x, "seed:logits": seed}),
                   strict=True))

    def scale(m):
        m = m - m.min((-2, -1), keepdims=True)
        return m / (m.max((-2, -1), keepdims=True) + 1e-7)

    def up(m, size):
        rows = cam.interpolation_matrix(size[0], m.shape[-2])
        cols = cam.interpolation_matrix(size[1], m.shape[-1])
        return rows @ m @ cols.T

    maps = [scale(np.maximum((np.maximum(out[f"grad:{t}"], 0) * out[t]).sum(1), 0))
            for t in tensors]
    if fusion == "mean":
        return scale(np.mean([up(m, x.shape[-2:]) for m in maps], axis=0))
    big = max(m.shape[-2:] for m in maps)
    fused = np.max([up(np.tanh(2 * m), big) for m in maps], axis=0)
    return scale(up(fused, x.shape[-2:]))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_fusions_are_their_definitions(tiny, fusion):
    model, _, x, targets = tiny
    tensors = ["r0", "r2", "r3"]
    ours = _run(model, tensors, x, targets, fusion)  # two images per call: a padded chunk
    want = _reference(model, tensors, x, targets, fusion)
    assert ours.shape == (3, 16, 16)
    np.testing.assert_allclose(ours, want, atol=1e-4)
    other = _run(model, tensors, x, targets, "max" if fusion == "mean" else "mean")
    assert np.abs(other - ours).max() > 1e-2


def test_run_layercam_fusion_yields_a_map_per_row(tiny):
    """The method interface: run_layercam_fusion(job) with the declared defaults."""
    from cnnviz.methods.explain import Job
    from cnnviz.methods.layercam_fusion import run_layercam_fusion

    model, card, x, _ = tiny
    rows = [(0, 1), (2, 3), (0, 4)]
    options = registry.defaults("layercam_fusion")
    job = Job(model, card, ["a", "b", "c"], x, [], rows, options, "cpu", 1, 2)
    results = list(run_layercam_fusion(job))
    assert [r[0] for r in results] == [0, 2, 0]
    want = _reference(model, ["r1", "r2", "r3"], x[[0, 2, 0]], [1, 3, 4], "mean")
    for r, (_, raw, signed, info) in enumerate(results):
        np.testing.assert_allclose(raw, want[r], atol=1e-4)
        assert signed is None and info == {"layers": "r1,r2,r3", "fusion": "mean"}


# ---- against pytorch-grad-cam (torch) --------------------------------------------------------
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

    return effnet_case(effnet_dir)


def _peer_layercam(net, layers, x, targets) -> tuple[np.ndarray, float]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(2)
    peer = LayerCAM(model=net, target_layers=layers)
    try:
        started = time.perf_counter()
        maps = peer(input_tensor=torch.from_numpy(x),
                    targets=[ClassifierOutputTarget(t) for t in targets])
        return maps, time.perf_counter() - started
    finally:
        peer.activations_and_grads.release()


def _timed(model, tensors, x, targets, fusion) -> tuple[np.ndarray, float]:
    runner = Runner(layercam_fusion_graph(model, tensors, len(x), fusion), "cpu", 2)
    feeds = {"images": x, "targets": np.asarray(targets)}
    runner.run(feeds)
    started = time.perf_counter()
    return runner.run(feeds)["map"], time.perf_counter() - started


@pytest.mark.slow
def test_mean_fusion_matches_pytorch_grad_cam_on_vgg(vgg):
    """layers: auto on VGG16 at 64 px: the ReLUs ending the 32, 16, 8 and 4 px stages
    (features 8, 15, 22, 29), handed to the peer as its target_layers."""
    from cam_peer_models import pearson

    tensors = fusion_layers(vgg["card"], "auto", 4)
    net = vgg["net"]
    modules = [net.features[i] for i in (8, 15, 22, 29)]
    assert [row["shape"][-1] for row in stage_layers(vgg["card"], 4)] == [32, 16, 8, 4]
    ours, seconds = _timed(vgg["model"], tensors, vgg["x"], vgg["targets"], "mean")
    theirs, peer_seconds = _peer_layercam(net, modules, vgg["x"], vgg["targets"])
    for i in range(len(ours)):
        assert pearson(ours[i], theirs[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], theirs[i], atol=2e-3)
    print(f"vgg mean: ours {seconds:.3f} s, pytorch-grad-cam {peer_seconds:.3f} s")


@pytest.mark.slow
def test_mean_fusion_matches_pytorch_grad_cam_on_resnet(resnet):
    """ResNet-50 at 64 px: each stage's output (16, 8, 4, 2 px), the last bottleneck's final
    ReLU, a tensor of the model that is no conv layer of the card. (Not bn3: torchvision adds
    the shortcut into bn3's output in place, which the peer's saved activation then holds.)"""
    from cam_peer_models import pearson

    net = resnet["net"]
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    names = [f"/layer{k}/layer{k}.{len(s) - 1}/relu_2/Relu_output_0"
             for k, s in enumerate(stages, 1)]
    tensors = fusion_layers(resnet["card"], ",".join(names), 4, resnet["model"])
    assert tensors == names
    ours, seconds = _timed(resnet["model"], tensors, resnet["x"], resnet["targets"], "mean")
    theirs, peer_seconds = _peer_layercam(net, [s[-1] for s in stages], resnet["x"],
                                          resnet["targets"])
    for i in range(len(ours)):
        assert pearson(ours[i], theirs[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], theirs[i], atol=2e-3)
    print(f"resnet mean: ours {seconds:.3f} s, pytorch-grad-cam {peer_seconds:.3f} s")


@pytest.mark.slow
def test_mean_fusion_matches_pytorch_grad_cam_on_effnet(effnet):
    """Four layers of EfficientNet-Lite0 at 56, 28, 14 and 7 px: three blocks' projection
    (their BatchNorm's output in torch, the folded conv's in ours; signed maps) and the head."""
    from cam_peer_models import pearson

    net = effnet["net"]
    names = ["blocks.2.project_conv", "blocks.4.project_conv", "blocks.10.project_conv",
             "conv_head"]
    tensors = fusion_layers(effnet["card"], ",".join(names), 4)
    modules = [net._blocks[2]._bn2, net._blocks[4]._bn2, net._blocks[10]._bn2, net.head_act]
    ours, seconds = _timed(effnet["model"], tensors, effnet["x"], effnet["targets"], "mean")
    theirs, peer_seconds = _peer_layercam(net, modules, effnet["x"], effnet["targets"])
    for i in range(len(ours)):
        assert pearson(ours[i], theirs[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], theirs[i], atol=5e-3)
    print(f"effnet mean: ours {seconds:.3f} s, pytorch-grad-cam {peer_seconds:.3f} s")


@pytest.mark.slow
def test_max_fusion_is_torchcams_on_vgg(vgg):
    """fusion: max against TorchCAM 0.5's LayerCAM.fuse_cams written in torch (normalise each
    layer's map, tanh(2 m), bilinear to the largest map, element-wise max); then ours goes to
    the input size and is scaled. With torchcam installed, against torchcam itself too."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    from cam_peer_models import pearson

    net, x = vgg["net"], torch.from_numpy(vgg["x"])
    idx = (8, 15, 22, 29)
    acts: list = []
    hooks = [net.features[i].register_forward_hook(lambda _m, _i, o: acts.append(o))
             for i in idx]
    try:
        logits = net(x)
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(logits[torch.arange(len(x)), torch.tensor(vgg["targets"])].sum(),
                                acts)
    cams = []
    for a, g in zip(acts, grads, strict=True):
        m = torch.relu((torch.relu(g) * a).sum(1)).detach()
        m = m - m.flatten(1).min(1).values[:, None, None]
        cams.append(m / (m.flatten(1).max(1).values[:, None, None] + 1e-8))
    big = cams[0].shape[-2:]
    fused = torch.stack([F.interpolate(torch.tanh(2 * m)[:, None], big, mode="bilinear",
                                       align_corners=False) for m in cams]).amax(0)
    fused = F.interpolate(fused, x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    fused = fused - fused.flatten(1).min(1).values[:, None, None]
    want = (fused / (fused.flatten(1).max(1).values[:, None, None] + 1e-7)).numpy()
    tensors = fusion_layers(vgg["card"], "auto", 4)
    ours, _ = _timed(vgg["model"], tensors, vgg["x"], vgg["targets"], "max")
    for i in range(len(ours)):
        assert pearson(ours[i], want[i]) >= 0.99, i
        np.testing.assert_allclose(ours[i], want[i], atol=2e-3)
    try:
        from torchcam.methods import LayerCAM
    except ImportError:  # not a test dependency; measured with torchcam 0.5.0: Pearson 1.00000
        return
    for i in range(len(ours)):
        extractor = LayerCAM(net, target_layer=[net.features[k] for k in idx],
                             input_shape=(3, *x.shape[-2:]))
        try:
            fused = extractor.fuse_cams(extractor(vgg["targets"][i], net(x[i : i + 1])))
        finally:
            extractor.remove_hooks()
        theirs = F.interpolate(fused[:, None], x.shape[-2:], mode="bilinear",
                               align_corners=False)[0, 0].detach().numpy()
        theirs = (theirs - theirs.min()) / (theirs.max() - theirs.min() + 1e-7)
        assert pearson(ours[i], theirs) >= 0.99, i
        np.testing.assert_allclose(ours[i], theirs, atol=2e-3)
