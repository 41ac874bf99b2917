"""CAM methods and occlusion against pytorch-grad-cam and captum on the same torch models.

cnnviz's side is what `cnnviz explain` runs: the method graphs (`cam.cam_graph`,
`cam.scorecam_graphs` with `explain.score_channels`, `occlusion.occlusion_graph`) through the
one runner.

Models: the pretrained EfficientNet-Lite0 (224x224, head ReLU6 1280x7x7) and a seeded
random-weight torchvision VGG16 at 64x64 (avgpool dropped and the first Linear resized so the
small input fits; last conv ReLU 512x4x4). torch, pytorch_grad_cam and captum are oracles only.
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
from cnnviz.methods.explain import score_channels  # noqa: E402
from cnnviz.methods.occlusion import occlusion_graph, patch_counts, patch_origins  # noqa: E402
from cnnviz.runner import Runner, chunk_plan  # noqa: E402
from cnnviz.runtime import make_session  # noqa: E402

EGYPTIAN_CAT, WINDOW_SCREEN = 285, 904


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def effnet(effnet_dir):
    from cnnviz.images import preprocess
    from cnnviz.modelcard import load_card
    from PIL import Image
    from skimage import data

    torch.set_num_threads(2)
    card = load_card(effnet_dir)
    model = onnx.load(str(effnet_dir / card["onnx"]))
    photos = [data.chelsea(), data.coffee(), data.astronaut()]
    x = np.stack([preprocess(Image.fromarray(p), card["preprocess"]) for p in photos])
    net = oracle.pretrained_effnet(own_head_relu6=True)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    forward = make_session(model, "cpu", 2)
    logits = forward.run(None, {"input": x})[0]
    np.testing.assert_allclose(logits, ref, atol=1e-3 * np.abs(ref).max())
    return {
        "card": card,
        "model": model,
        "net": net,
        "layer": net.head_act,
        "x": x,
        "forward": forward,
        "targets": [int(t) for t in logits.argmax(1)],
    }


@pytest.fixture(scope="module")
def vgg():
    import torchvision
    from cnnviz.graph import conv_layers

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # forward hooks on in-place ReLUs see overwritten tensors
    net.avgpool = torch.nn.Identity()
    net.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    net.eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32))
    import io

    buf = io.BytesIO()
    torch.onnx.export(
        net,
        x[:1],
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    model = onnx.load_from_string(buf.getvalue())
    card = {
        "name": "vgg16-random",
        "input": {"name": "input"},
        "output": {"name": "logits", "kind": "logits", "num_classes": 1000},
        "labels": [str(i) for i in range(1000)],
        "layers": conv_layers(model),
    }
    assert cam.layer_tensor(card, None) and card["layers"][-1]["shape"] == [512, 4, 4]
    forward = make_session(model, "cpu", 2)
    logits = forward.run(None, {"input": x.numpy()})[0]
    return {
        "card": card,
        "model": model,
        "net": net,
        "layer": net.features[29],
        "x": x.numpy(),
        "forward": forward,
        "targets": [int(t) for t in logits.argmax(1)],
    }


def _cams(case, x, targets, images, variants=cam.VARIANTS) -> dict[str, np.ndarray]:
    """{variant: [N, H, W]} from one CAM graph, `images` images per call."""
    graph = cam.cam_graph(case["model"], case["card"], None, images, variants)
    feeds = {"images": x, "targets": np.asarray(targets, np.int64)}
    return Runner(graph, "cpu", 2).run(feeds)


def _peer_maps(case, peer_class, x, targets, **attrs) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method = peer_class(model=case["net"], target_layers=[case["layer"]])
    for key, value in attrs.items():
        setattr(method, key, value)
    try:
        return method(
            input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets]
        )
    finally:
        method.activations_and_grads.release()


@pytest.mark.parametrize("name", ["effnet", "vgg"])
def test_grad_cam_family_matches_pytorch_grad_cam(name, request):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    case = request.getfixturevalue(name)
    x, targets = case["x"][:2], case["targets"][:2]
    ours = _cams(case, x, targets, images=1)  # two calls
    for variant, peer in [
        ("gradcam", GradCAM),
        ("gradcampp", GradCAMPlusPlus),
        ("layercam", LayerCAM),
        ("hirescam", HiResCAM),
        ("xgradcam", XGradCAM),
    ]:
        theirs = _peer_maps(case, peer, x, targets)
        for i in range(len(x)):
            assert _pearson(ours[variant][i], theirs[i]) >= 0.99, (variant, i)
    # Behind a global average pool and one linear layer (EfficientNet-Lite0's head) G_k is the
    # same at every position, so HiResCAM and XGrad-CAM reduce to Grad-CAM (Draelos & Carin;
    # Fu et al.); VGG's flatten + MLP head has gradients that vary over positions.
    for variant in ("hirescam", "xgradcam"):
        gap = np.abs(ours[variant] - ours["gradcam"]).max()
        assert gap < 1e-4 if name == "effnet" else gap > 0.05, (variant, gap)


@pytest.mark.parametrize("name", ["effnet", "vgg"])
def test_score_cam_matches_pytorch_grad_cam(name, request):
    """On every 8th channel of the layer (one masked forward pass per channel is slow in torch):
    pytorch-grad-cam's ScoreCAM is handed the same channel subset of its hooked activations."""
    from pytorch_grad_cam import ScoreCAM

    class SubsetScoreCAM(ScoreCAM):
        channels = slice(None)

        def get_cam_image(
            self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False
        ):
            return super().get_cam_image(
                input_tensor,
                target_layer,
                targets,
                activations[:, self.channels],
                grads,
                eigen_smooth,
            )

    case = request.getfixturevalue(name)
    x, target = case["x"][:1], case["targets"][0]
    graphs = cam.scorecam_graphs(case["model"], case["card"], None, 1, 32)  # 32 masks per call
    acts_runner, scorer, finisher = (Runner(g, "cpu", 2) for g in graphs[:3])
    acts = acts_runner.run({"images": x})["acts"]
    subset = slice(0, None, 8)
    weights, info = score_channels(scorer, x, target, acts[0, subset])
    # the other channels weigh 0: the finished map is the subset's weighted sum
    every = np.zeros(acts.shape[:2], np.float32)
    every[0, subset] = weights
    ours = finisher.run({"acts": acts, "weights": every})["map"][0]
    theirs = _peer_maps(case, SubsetScoreCAM, x, [target], batch_size=32, channels=subset)[0]
    assert _pearson(ours, theirs) >= 0.99, info
    assert info["forward_passes"] <= info["channels"] + 1


@pytest.mark.parametrize(("name", "window", "stride"), [("effnet", 64, 32), ("vgg", 16, 8)])
def test_occlusion_matches_captum(name, window, stride, request):
    captum = pytest.importorskip("captum.attr")
    case = request.getfixturevalue(name)
    x, target = case["x"][:1], case["targets"][0]
    size = x.shape[-2:]
    origins = patch_origins(size, window, stride)
    images, points = chunk_plan(len(origins), 32)  # as explain: rows per call
    graph = occlusion_graph(case["model"], case["card"], images, points, window)
    out = Runner(graph, "cpu", 2).run(
        {"images": x, "targets": np.array([target])}, {"origins": origins}
    )
    ours = out["total"][0] / np.maximum(patch_counts(size, window, stride), 1)
    probs = torch.nn.Sequential(case["net"], torch.nn.Softmax(dim=1)).eval()
    theirs = (
        captum.Occlusion(probs)
        .attribute(
            torch.from_numpy(x),
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=0,
            target=target,
            perturbations_per_eval=32,
        )[0]
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(theirs[0], theirs[2], atol=1e-6)  # one value per pixel
    assert _pearson(ours, theirs[0]) >= 0.99
    np.testing.assert_allclose(ours, theirs[0], atol=2e-3 * np.abs(theirs).max() + 1e-6)


def test_grad_cam_on_the_cat_is_on_the_cat_and_depends_on_the_class(effnet):
    x = effnet["x"][:1]
    assert effnet["targets"][0] == EGYPTIAN_CAT
    maps = _cams(effnet, np.repeat(x, 2, 0), [EGYPTIAN_CAT, WINDOW_SCREEN], 2, ("gradcam",))
    maps = maps["gradcam"]
    # The face (eyes, nose, cheeks) on the 224x224 stretch of chelsea: 45% of the picture.
    face = (slice(40, 200), slice(30, 170))
    assert maps[0][face].sum() / maps[0].sum() >= 0.6
    assert _pearson(maps[0], maps[1]) < 0.8
