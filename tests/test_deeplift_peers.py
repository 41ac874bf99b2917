"""DeepLIFT (rescale) and Input × Gradient against captum 0.9.0 on the same torch models and inputs
(slow: torch, real models).

Ours are what `cnnviz explain` runs: `attribution.deeplift_graph` / `input_x_gradient_graph`
through the one runner. Models: the pretrained EfficientNet-Lite0 (the project's export) on two
photos with the "black" baseline; seeded random-weight VGG16 (64 px, avgpool dropped, as in
test_cam_peers) and ResNet-50 (64 px, torch_oracle.build: BatchNorm calibrated) on random inputs
with the "zero" baseline. Each map (the channel sum, and the signed [3, H, W] attribution) must
have Pearson >= 0.99 with captum's, and ours must sum to f(x) - f(x0).

How captum is run, and the definitional differences:

- captum's DeepLift keeps state on the module (its forward hooks store the module's input and
  output, its backward hook deletes them): a module applied twice (ResNet's Bottleneck.relu,
  EfficientNet's `_swish` in every block) raises. One module per call gives each call its own
  copy (same function, torch_oracle.one_module_per_call), which is what the ONNX graph has
  anyway (one node per call).
- captum rescales only nn.ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool and Softmax
  (exact type): EfficientNet-Lite0's ReLU6 keeps its gradient there, so captum's attributions do
  not sum to f(x) - f(x0) (measured and asserted below). Ours rescale ReLU6 (Clip) like every
  activation (cnnviz.autodiff.reference); compared with captum given nn.ReLU6 its `nonlinear`
  rule (the rescale rule it applies to nn.ReLU).
- A product of two computed tensors (SiLU, squeeze-excitation) splits its change by the means
  of the operands (exact); captum takes autograd's gradient there. None of the three models has
  one (tests/test_deeplift.py tests ours).
"""

from __future__ import annotations

import io
import time

import numpy as np
import onnx
import pytest
from cnnviz.methods import attribution
from cnnviz.methods.backprop import make_baseline
from cnnviz.runner import Runner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
oracle = pytest.importorskip("torch_oracle")

MIN_CORRELATION = 0.99


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _export(net: torch.nn.Module, x: np.ndarray) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        net, torch.from_numpy(x[:1]), buf, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def effnet(effnet_dir):
    from cnnviz.images import preprocess
    from cnnviz.modelcard import load_card
    from PIL import Image
    from skimage import data

    card = load_card(effnet_dir)
    x = np.stack([preprocess(Image.fromarray(p), card["preprocess"])
                  for p in (data.chelsea(), data.coffee())]).astype(np.float32)
    baseline = make_baseline("black", x[0], card["preprocess"])
    return {"name": "efficientnet_lite0", "net": oracle.pretrained_effnet(),
            "model": onnx.load(str(effnet_dir / card["onnx"])), "x": x, "baseline": baseline}


@pytest.fixture(scope="module")
def vgg16():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    net.avgpool = torch.nn.Identity()
    net.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    net.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    return {"name": "vgg16", "net": net, "model": _export(net, x), "x": x,
            "baseline": np.zeros_like(x[0])}


@pytest.fixture(scope="module")
def resnet50():
    net = oracle.build("resnet50", size=64)
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    model = onnx.load(str(oracle.export("resnet50", model=net, size=64)))
    return {"name": "resnet50", "net": net, "model": model, "x": x,
            "baseline": np.zeros_like(x[0])}


def _ours(case, targets, method: str) -> tuple[dict[str, np.ndarray], float, float]:
    """(outputs, build seconds, run seconds): all images in one call, 2 threads."""
    x = case["x"]
    feeds = {"images": x, "targets": np.asarray(targets, np.int64)}
    started = time.perf_counter()
    if method == "deeplift":
        runner = Runner(attribution.deeplift_graph(case["model"], len(x)), "cpu", 2)
        built = time.perf_counter()
        out = runner.run(feeds, None, {"baseline": case["baseline"][None]})
    else:
        runner = Runner(attribution.input_x_gradient_graph(case["model"], len(x)), "cpu", 2)
        built = time.perf_counter()
        out = runner.run(feeds)
    return out, built - started, time.perf_counter() - built


def _captum_deeplift(net, x, targets, baseline):
    from captum.attr._core import deep_lift

    rules = deep_lift.SUPPORTED_NON_LINEAR
    added = torch.nn.ReLU6 not in rules
    rules[torch.nn.ReLU6] = deep_lift.nonlinear  # the rescale rule captum gives nn.ReLU
    try:
        xt = torch.from_numpy(x)
        net = oracle.one_module_per_call(net, xt)
        started = time.perf_counter()
        attr, delta = captum_attr.DeepLift(net).attribute(
            xt, baselines=torch.from_numpy(np.ascontiguousarray(baseline[None])), target=targets,
            return_convergence_delta=True,
        )  # fmt: skip
        return attr.detach().numpy(), delta.detach().numpy(), time.perf_counter() - started
    finally:
        if added:
            del rules[torch.nn.ReLU6]


@pytest.mark.parametrize("name", ["effnet", "vgg16", "resnet50"])
def test_deeplift_matches_captum(name, request):
    torch.set_num_threads(2)
    case = request.getfixturevalue(name)
    x = case["x"]
    with torch.no_grad():
        targets = [int(t) for t in case["net"](torch.from_numpy(x)).argmax(1)]
    ours, build_s, run_s = _ours(case, targets, "deeplift")
    theirs, their_delta, their_s = _captum_deeplift(case["net"], x, targets, case["baseline"])
    maps = [pearson(ours["map"][i], theirs[i].sum(0)) for i in range(len(x))]
    signed = [pearson(ours["signed"][i], theirs[i]) for i in range(len(x))]
    errors = [attribution.delta_error(ours["signed"][i], ours["values"][i]) for i in range(len(x))]
    change = ours["values"][:, 0] - ours["values"][:, 1]
    print(f"\n{case['name']} deeplift: pearson map {maps} signed {signed}; our relative "
          f"summation-to-delta error {errors}; captum's delta {their_delta} of {change}; "
          f"ours {run_s:.3f} s (+{build_s:.2f} s graph and session), captum {their_s:.3f} s")
    assert min(maps) >= MIN_CORRELATION and min(signed) >= MIN_CORRELATION
    assert max(errors) < 1e-3
    assert np.all(np.abs(their_delta) < 1e-3 * np.abs(change))  # captum's sums too, with ReLU6


def test_captum_without_a_relu6_rule_misses_the_delta(effnet):
    """The definitional difference: stock captum keeps ReLU6's gradient, so on EfficientNet-Lite0
    its attributions do not sum to f(x) - f(x0); ours (ReLU6 rescaled) do."""
    torch.set_num_threads(2)
    x = effnet["x"][:1]
    xt = torch.from_numpy(x)
    net = oracle.one_module_per_call(effnet["net"], xt)
    x0 = torch.from_numpy(np.ascontiguousarray(effnet["baseline"][None]))
    with torch.no_grad():
        target = int(net(xt).argmax(1)[0])
        change = float(net(xt)[0, target] - net(x0)[0, target])
    _, delta = captum_attr.DeepLift(net).attribute(
        xt, baselines=x0, target=target, return_convergence_delta=True,
    )  # fmt: skip
    print(f"\nstock captum: summation-to-delta off by {float(delta[0]):.3f} of {change:.3f}")
    assert abs(float(delta[0])) > 0.05 * abs(change)


@pytest.mark.parametrize("name", ["effnet", "vgg16", "resnet50"])
def test_input_x_gradient_matches_captum(name, request):
    torch.set_num_threads(2)
    case = request.getfixturevalue(name)
    x = case["x"]
    with torch.no_grad():
        targets = [int(t) for t in case["net"](torch.from_numpy(x)).argmax(1)]
    ours, build_s, run_s = _ours(case, targets, "input_x_gradient")
    started = time.perf_counter()
    theirs = captum_attr.InputXGradient(case["net"]).attribute(
        torch.from_numpy(x), target=targets
    ).detach().numpy()
    their_s = time.perf_counter() - started
    maps = [pearson(ours["map"][i], theirs[i].sum(0)) for i in range(len(x))]
    signed = [pearson(ours["signed"][i], theirs[i]) for i in range(len(x))]
    print(f"\n{case['name']} input_x_gradient: pearson map {maps} signed {signed}; ours "
          f"{run_s:.3f} s (+{build_s:.2f} s graph and session), captum {their_s:.3f} s")
    assert min(maps) >= MIN_CORRELATION and min(signed) >= MIN_CORRELATION
