"""Our input-gradient maps against captum's, on the same inputs (slow: torch, real models).

Ours are what `cnnviz explain` runs: `backprop.gradient_graph` per policy and
`backprop.integrated_gradients_graph` (path points from `explain.ig_points`, chunked by
`runner.chunk_plan`) through the one runner.

Models: the pretrained EfficientNet-Lite0 (exported by the project, `effnet_dir`) on two photos,
and a seeded random-weight torchvision VGG16 on 64x64 inputs (its avgpool replaced by Identity
and the first Linear resized, so the small input exports without adaptive pooling). Each map must
have Pearson correlation >= 0.99 with captum's: Saliency (abs=True, then max over channels),
GuidedBackprop, Deconvolution and IntegratedGradients (same n_steps, method="gausslegendre",
zero baseline), compared on the raw [3, H, W] arrays.

What captum returns un-swapped on EfficientNet-Lite0: GuidedBackprop and Deconvolution only hook
`nn.ReLU` modules, and EfficientNet-Lite0 has none (ReLU6 is a Hardtanh), so both silently return
the plain gradient, identical to Saliency(abs=False) (asserted below). Our guided and deconvnet
policies treat Clip (ReLU6) like a ReLU, so our maps are compared with captum run on a copy whose
ReLU6 modules are replaced by an `nn.ReLU` subclass computing clamp(x, 0, 6). The stock class
applies one ReLU6 module at both the stem and the head, and each block's module twice; the
replacement is done on the module, so every use is swapped (captum's hooks handle reuse in a
chain, since each use's backward finishes before the previous use's starts).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.methods import backprop as bp
from cnnviz.methods.explain import completeness_error, ig_points
from cnnviz.runner import Runner, chunk_plan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations"),
]
torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
oracle = pytest.importorskip("torch_oracle")

MIN_CORRELATION = 0.99
IG_STEPS = 16


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def photos(pre: dict) -> np.ndarray:
    from cnnviz.images import preprocess
    from PIL import Image
    from skimage import data

    return np.stack(
        [
            preprocess(Image.fromarray(data.chelsea()), pre),
            preprocess(Image.fromarray(data.coffee()), pre),
        ]
    ).astype(np.float32)


def compare(module, model: onnx.ModelProto, x: np.ndarray, guided_ref, deconv_ref) -> dict:
    """Correlations of our four maps with captum's, per image; also returns our raw maps."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        targets = [int(t) for t in module(xt).argmax(1)]
    feeds = {"images": x, "targets": np.asarray(targets, np.int64)}
    out = {
        p: Runner(bp.gradient_graph(model, p, len(x)), "cpu", 2).run(feeds)
        for p in ("gradient", "guided", "deconvnet")
    }
    ours = {
        "saliency": out["gradient"]["map"],
        "gradient": out["gradient"]["signed"],
        "guided": out["guided"]["signed"],
        "deconvnet": out["deconvnet"]["signed"],
    }
    theirs = {
        "saliency": captum_attr.Saliency(module).attribute(xt, target=targets).amax(1),
        "guided": captum_attr.GuidedBackprop(guided_ref).attribute(xt, target=targets),
        "deconvnet": captum_attr.Deconvolution(deconv_ref).attribute(xt, target=targets),
    }
    alphas, weights = ig_points("gausslegendre", IG_STEPS)
    images, points = chunk_plan(len(alphas), IG_STEPS + 2)  # every path point in one call
    ig = Runner(bp.integrated_gradients_graph(model, images, points), "cpu", 2).run(
        feeds,
        {"alphas": alphas, "weights": weights},
        {"baseline": bp.make_baseline("zero", x[0])[None]},
    )
    ours["ig"] = ig["signed"]
    errors = [completeness_error(ig["signed"][i], ig["values"][i]) for i in range(len(x))]
    theirs["ig"] = [
        captum_attr.IntegratedGradients(module).attribute(
            xt[i : i + 1], target=t, n_steps=IG_STEPS, method="gausslegendre"
        )[0]
        for i, t in enumerate(targets)
    ]
    corr = {
        k: [pearson(ours[k][i], theirs[k][i].detach().numpy()) for i in range(len(x))]
        for k in theirs
    }
    return {"corr": corr, "ours": ours, "targets": targets, "ig_errors": errors}


def test_efficientnet_lite0_matches_captum(effnet_dir):
    from cnnviz.export.sources import efficientnet_lite0
    from cnnviz.modelcard import load_card

    torch.set_num_threads(2)
    card = load_card(effnet_dir)
    model = onnx.load(str(effnet_dir / card["onnx"]))
    module = efficientnet_lite0("pretrained").module
    x = photos(card["preprocess"])
    swapped = oracle.swap_relu6(module)
    result = compare(module, model, x, swapped, swapped)
    print("efficientnet-lite0 correlations", result["corr"], "IG errors", result["ig_errors"])
    for name, values in result["corr"].items():
        assert min(values) >= MIN_CORRELATION, (name, values)

    # captum un-swapped: no nn.ReLU, so "guided" and "deconvolution" are the plain gradient.
    xt = torch.from_numpy(x)
    plain = captum_attr.Saliency(module).attribute(xt, target=result["targets"], abs=False)
    stock = captum_attr.GuidedBackprop(module).attribute(xt, target=result["targets"])
    assert torch.equal(stock, plain)
    for i in range(len(x)):
        similarity = pearson(result["ours"]["guided"][i], result["ours"]["gradient"][i])
        print("ours: guided vs plain gradient correlation", similarity)
        assert similarity < 0.9
        assert pearson(result["ours"]["gradient"][i], plain[i].numpy()) >= MIN_CORRELATION


def test_random_vgg16_matches_captum(tmp_path):
    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    module = torchvision.models.vgg16(weights=None)
    module.avgpool = torch.nn.Identity()
    module.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    module.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    path = tmp_path / "vgg16.onnx"
    torch.onnx.export(
        module,
        torch.from_numpy(x[:1]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    result = compare(module, onnx.load(str(path)), x, module, module)
    print("vgg16 correlations", result["corr"], "IG errors", result["ig_errors"])
    for name, values in result["corr"].items():
        assert min(values) >= MIN_CORRELATION, (name, values)
    assert max(result["ig_errors"]) < 0.05
