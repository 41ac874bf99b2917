"""LRP against zennit 0.5.1 on the same torch models and inputs (EpsilonPlusFlat, EpsilonGammaBox).

cnnviz's side is what `cnnviz explain` runs: `lrp.lrp_graph` through the one runner, on the
ONNX export (TorchScript folds every BatchNorm into its Conv). zennit's side gets the canonizers
that make the torch model the same network: BatchNorm merged into the preceding layer (zennit's
MergeBatchNorm; ResNetCanonizer for ResNet-50, the named pairs for EfficientNet-Lite0, whose
"same"-padding convs hide their order from SequentialMergeBatchNorm) and residual sums as a
`zennit.layer.Sum` (ResNetCanonizer; for EfficientNet-Lite0 the block's forward below), so that
its Norm rule applies where ours applies to the ONNX Add. zennit's seed is one-hot times the
output, as ours.

Models: the pretrained EfficientNet-Lite0 at 224 px on two photos; random-weight VGG16 at 64 px
(avgpool dropped, the first Linear resized, as in test_cam_peers) and ResNet-50 at 64 px
(tests/torch_oracle, BatchNorm statistics calibrated), on seeded normal inputs. Times: the same
batch, 2 threads both, the fastest of three (ours) and two (zennit) calls: ours after a warm-up
call (graph and session are built once per job; printed apart), zennit's with its composite
registered per call, as its Attributor does; asserted: ours is faster.
"""

from __future__ import annotations

import io
import time

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow
oracle = pytest.importorskip("torch_oracle")  # first: it sets torch's OpenMP wait policy
torch = pytest.importorskip("torch")
pytest.importorskip("zennit")

from cnnviz.autodiff.rules_lrp import LrpSettings  # noqa: E402
from cnnviz.methods.lrp import lrp_graph, pixel_bounds  # noqa: E402
from cnnviz.runner import Runner  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.torchvision import ResNetCanonizer  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 255.0}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _onnx(net: torch.nn.Module, x: np.ndarray) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        net, torch.from_numpy(x[:1]), buf, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


# EfficientNet-Lite0 as zennit needs it: torch_oracle.zennit_effnet_canonizers


@pytest.fixture(scope="module")
def effnet(effnet_dir):
    from cnnviz.images import preprocess
    from cnnviz.modelcard import load_card
    from PIL import Image
    from skimage import data

    torch.set_num_threads(2)
    card = load_card(effnet_dir)
    model = onnx.load(str(effnet_dir / card["onnx"]))
    photos = [data.chelsea(), data.coffee()]
    x = np.stack([preprocess(Image.fromarray(p), card["preprocess"]) for p in photos])
    net = oracle.pretrained_effnet(own_head_relu6=True)
    return {"model": model, "net": net, "x": x, "pre": card["preprocess"],
            "canonizers": lambda: oracle.zennit_effnet_canonizers(net)}


@pytest.fixture(scope="module")
def vgg():
    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    net.avgpool = torch.nn.Identity()
    net.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    net.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    return {"model": _onnx(net, x), "net": net, "x": x, "pre": IMAGENET,
            "canonizers": lambda: []}


@pytest.fixture(scope="module")
def resnet():
    torch.set_num_threads(2)
    net = oracle.build("resnet50")
    model = onnx.load(str(oracle.export("resnet50", model=net)))
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    return {"model": model, "net": net, "x": x, "pre": IMAGENET,
            "canonizers": lambda: [ResNetCanonizer()]}


def _zennit(case, composite: str, targets, low, high) -> tuple[np.ndarray, float]:
    """(zennit's relevance [N, 3, H, W], the faster of two calls' seconds)."""
    x = torch.from_numpy(case["x"])
    times = []
    for _ in range(2):
        if composite == "epsilon_plus_flat":
            comp = EpsilonPlusFlat(canonizers=case["canonizers"]())
        else:
            bounds = [torch.from_numpy(np.broadcast_to(b, x.shape).copy()) for b in (low, high)]
            comp = EpsilonGammaBox(low=bounds[0], high=bounds[1],
                                   canonizers=case["canonizers"]())
        started = time.perf_counter()
        with Gradient(case["net"], comp) as attributor:
            _, relevance = attributor(x, lambda out: torch.eye(out.shape[1])[targets] * out)
        times.append(time.perf_counter() - started)
    return relevance.numpy(), min(times)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
@pytest.mark.parametrize("name", ["effnet", "vgg", "resnet"])
def test_lrp_matches_zennit(name, composite, request):
    case = request.getfixturevalue(name)
    x = case["x"]
    with torch.no_grad():
        targets = case["net"](torch.from_numpy(x)).argmax(1)
    low, high = pixel_bounds(case["pre"])  # the models' inputs are their first convs' inputs
    started = time.perf_counter()
    graph = lrp_graph(case["model"], len(x), composite, LrpSettings(low=low, high=high))
    runner = Runner(graph, "cpu", 2)
    build_seconds = time.perf_counter() - started
    feeds = {"images": x, "targets": targets.numpy().astype(np.int64)}
    runner.run(feeds)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        ours = runner.run(feeds)
        times.append(time.perf_counter() - started)
    seconds = min(times)
    theirs, their_seconds = _zennit(case, composite, targets, low, high)
    agreement, gaps = [], []
    for i in range(len(x)):
        agreement.append(_pearson(ours["map"][i], theirs[i].sum(0)))
        assert _pearson(ours["signed"][i], theirs[i]) >= 0.99, (i, "signed")
        assert agreement[-1] >= 0.99, (i, "map")
        # the scale too (Pearson is blind to it): the largest difference of the relevance
        gaps.append(float(np.abs(ours["signed"][i] - theirs[i]).max() / np.abs(theirs[i]).max()))
        assert gaps[-1] <= 0.02, (i, gaps[-1])
        total, their_total = ours["signed"][i].sum(), theirs[i].sum()
        assert abs(total - their_total) <= 0.02 * abs(their_total) + 1e-3 * abs(ours["logit"][i])
    print(f"{name} {composite}: Pearson of the maps {min(agreement):.6f} (lowest), largest "
          f"difference {max(gaps):.1e} of the largest relevance; "
          f"ours {seconds:.3f} s (+{build_seconds:.2f} s graph and session once per job), "
          f"zennit {their_seconds:.3f} s ({len(x)} images, 2 threads)")
    # the target is <= 0.5x (met in the measurements of the commit message); on shared,
    # loaded cores only "faster" is asserted, which no load makes flaky
    assert seconds < their_seconds


def _uniform(rule) -> LayerMapComposite:  # noqa: ANN001 - a zennit rule
    from zennit.types import Convolution

    return LayerMapComposite(layer_map_base() + [(Convolution, rule),
                                                 (torch.nn.Linear, rule.copy())])


def test_every_composite_matches_zennit_on_a_small_cnn():
    """Strided, grouped and depthwise convs with biases, max and average pooling, a Linear head:
    every composite (and the epsilon / gamma parameters) against zennit, float32 round-off."""
    from zennit.rules import Epsilon, Gamma, ZPlus

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 16, 1), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 2 * 2, 10),
    ).eval()  # fmt: skip
    x = np.random.default_rng(3).normal(size=(3, 3, 16, 16)).astype(np.float32)
    model = _onnx(net, x)
    low, high = np.full((1, 3, 1, 1), -2.5, np.float32), np.full((1, 3, 1, 1), 2.5, np.float32)
    bounds = [torch.from_numpy(np.broadcast_to(b, x.shape).copy()) for b in (low, high)]
    cases = [
        ("epsilon_plus_flat", {}, EpsilonPlusFlat()),
        ("epsilon_gamma_box", {"gamma": 0.5},
         EpsilonGammaBox(low=bounds[0], high=bounds[1], gamma=0.5)),
        ("epsilon_plus", {}, EpsilonPlus()),
        ("epsilon_alpha2_beta1", {}, EpsilonAlpha2Beta1()),
        ("epsilon_alpha2_beta1_flat", {}, EpsilonAlpha2Beta1Flat()),
        ("epsilon", {"epsilon": 0.25}, _uniform(Epsilon(epsilon=0.25))),
        ("zplus", {}, _uniform(ZPlus())),
        ("gamma", {"gamma": 0.25}, _uniform(Gamma(gamma=0.25))),
    ]  # fmt: skip
    with torch.no_grad():
        targets = net(torch.from_numpy(x)).argmax(1)
    feeds = {"images": x, "targets": targets.numpy().astype(np.int64)}
    for composite, params, theirs_composite in cases:
        settings = LrpSettings(low=low, high=high, **params)
        ours = Runner(lrp_graph(model, 2, composite, settings), "cpu", 2).run(feeds)["signed"]
        with Gradient(net, theirs_composite) as attributor:
            _, theirs = attributor(torch.from_numpy(x),
                                   lambda out: torch.eye(10)[targets] * out)
        theirs = theirs.numpy()
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * scale, err_msg=composite)
