"""Eigen-CAM and Ablation-CAM against pytorch-grad-cam 1.5.7 on the same torch models and inputs.

cnnviz's side is what `cnnviz explain` runs: the graphs of `cnnviz.methods.gradient_free`
through the one runner. Models: the pretrained EfficientNet-Lite0 and the seeded random VGG16 at
64x64 of test_cam_peers (its fixtures), and a seeded random ResNet-50 at 64x64 (torch_oracle's
export; layer4's output, 2048 x 2 x 2). torch and pytorch_grad_cam are oracles only.

Eigen-CAM's singular vector has an arbitrary sign in the peer (LAPACK's); our sign rule is the
peer's own `get_2d_projection_with_sign_correction`, so our map equals the peer's EigenCAM with
that projection, and the plain EigenCAM up to the sign.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")
oracle = pytest.importorskip("torch_oracle")

from cnnviz.methods import cam  # noqa: E402
from cnnviz.methods import gradient_free as gf  # noqa: E402
from cnnviz.runner import Runner  # noqa: E402
from cnnviz.runtime import make_session  # noqa: E402
from test_cam_peers import _pearson, _peer_maps, effnet, vgg  # noqa: E402, F401 - fixtures


@pytest.fixture(scope="module")
def resnet():
    from cnnviz.graph import conv_layers

    torch.set_num_threads(2)
    net = oracle.build("resnet50", seed=0, size=64)
    model = onnx.load(str(oracle.export("resnet50", model=net)))
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        feature = net.layer4(
            net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(
                torch.from_numpy(x[:1])))))))))
    tensor = oracle.onnx_tensor_matching(model, x[:1], feature.numpy())
    layers = conv_layers(model)
    layers.append({**layers[-1], "name": "layer4", "tensor": tensor, "shape": [2048, 2, 2]})
    card = {
        "name": "resnet50-random",
        "input": {"name": "input"},
        "output": {"name": "logits", "kind": "logits", "num_classes": 1000},
        "labels": [str(i) for i in range(1000)],
        "layers": layers,
    }
    logits = make_session(model, "cpu", 2).run(None, {"input": x})[0]
    return {"card": card, "model": model, "net": net, "layer": net.layer4, "x": x,
            "targets": [int(t) for t in logits.argmax(1)], "cam_layer": "layer4"}


CASES = ["effnet", "vgg", "resnet"]


def _finish_numpy(projection: np.ndarray, size) -> np.ndarray:
    """cam._finish_in_graph in numpy (ReLU, normalise, upsample, normalise)."""

    def minmax(m):
        return (m - m.min()) / max(m.max() - m.min(), 1e-30)

    low = minmax(np.maximum(projection, 0))
    mh = cam.interpolation_matrix(size[0], low.shape[0])
    mw = cam.interpolation_matrix(size[1], low.shape[1])
    return minmax(mh @ low @ mw.T)


@pytest.mark.parametrize("name", CASES)
def test_eigencam_matches_pytorch_grad_cam(name, request):
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import (
        get_2d_projection_with_sign_correction,
    )

    class SignedEigenCAM(EigenCAM):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations,
                          grads, eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    case = request.getfixturevalue(name)
    x, targets = case["x"][:2], case["targets"][:2]
    graph = gf.eigencam_graph(case["model"], case["card"], case.get("cam_layer"), 1)  # 2 calls
    ours = Runner(graph, "cpu", 2).run({"images": x})
    signed = _peer_maps(case, SignedEigenCAM, x, targets)
    plain = _peer_maps(case, EigenCAM, x, targets)
    for i in range(len(x)):
        assert _pearson(ours["map"][i], signed[i]) >= 0.99, i
        # the plain peer: our map or the one of the opposite sign, whichever LAPACK chose
        flipped = _finish_numpy(-ours["projection"][i], x.shape[-2:])
        best = max(_pearson(ours["map"][i], plain[i]), _pearson(flipped, plain[i]))
        assert best >= 0.99, i


@pytest.mark.parametrize("name", CASES)
def test_ablationcam_matches_pytorch_grad_cam(name, request):
    """On every 8th channel of the layer (one forward pass of the whole torch network per
    ablated channel is slow): the peer's AblationLayer is handed the same channel subset, and
    scores the other channels as unablated (weight 0), as ours does."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer

    subset = slice(0, None, 8)

    class SubsetLayer(AblationLayer):
        def activations_to_be_ablated(self, activations, ratio_channels_to_ablate=1.0):
            self.indices = np.arange(activations.shape[0], dtype=np.int32)[subset]
            return self.indices

    case = request.getfixturevalue(name)
    x, target = case["x"][:1], case["targets"][0]
    graphs = gf.ablation_graphs(case["model"], case["card"], case.get("cam_layer"), 1, 32)
    acts_runner, scorer, finisher = (Runner(g, "cpu", 2) for g in graphs[:3])
    acts = acts_runner.run({"images": x})["acts"]
    channels = np.arange(acts.shape[1])[subset]
    live = np.intersect1d(channels, gf.ablation_plan(acts[0]))
    weights, _ = gf.ablation_weights(scorer, x, acts, target, live)
    ours = finisher.run({"acts": acts, "weights": weights[None]})["map"][0]
    theirs = _peer_maps(case, AblationCAM, x, [target], batch_size=32,
                        ablation_layer=SubsetLayer())[0]
    assert _pearson(ours, theirs) >= 0.99, (len(channels), len(live))


def test_rise_coverage_estimator_reproduces_across_mask_sets(request):
    """RISE has no installed peer; its definition is tested exactly in
    test_gradient_free_cams. Here the estimator choice on a real model: two independent sets of
    400 masks on the cat give nearly the same map with the coverage estimator and unrelated ones
    with the paper's N p (the uneven coverage times the mean score, ~0.7, drowns the signal)."""
    case = request.getfixturevalue("effnet")
    x, target = case["x"][:1], case["targets"][0]
    graph = gf.rise_graph(case["model"], case["card"], 1, 50, 7)
    runner = Runner(graph, "cpu", 2)
    maps = {"paper": [], "coverage": []}
    for seed in (1, 2):
        grids, shifts = gf.rise_masks(400, 7, 0.5, seed, x.shape[-2:])
        out = runner.run({"images": x, "targets": np.array([target])},
                         {"grids": grids, "shifts": shifts})
        for estimator, found in maps.items():
            found.append(gf.rise_finish(out["map"][0], out["coverage"][0], estimator, 400, 0.5))
    coverage, paper = _pearson(*maps["coverage"]), _pearson(*maps["paper"])
    assert coverage >= 0.8 and paper < 0.5, (coverage, paper)  # measured 0.85 and -0.21
