"""Torch models and their ONNX twins for the CAM peers' tests (FullGrad, multi-layer LayerCAM).

`vgg16_case`: a seeded random-weight torchvision VGG16 at 64x64 (avgpool dropped, the first
Linear resized so the small input fits; no BatchNorm, every conv biased), exported through
TorchScript; `resnet50_case`: a random ResNet-50 at 64x64 (bias-free convs + BatchNorm, folded
by the export); `effnet_case`: the pretrained EfficientNet-Lite0 as the pipeline exports it (the
export folds each BatchNorm into its bias-free conv). torch is an oracle only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx


def _case(model: onnx.ModelProto, card: dict[str, Any], net: Any, x: np.ndarray) -> dict:
    from cnnviz.runtime import make_session

    logits = make_session(model, "cpu", 2).run(None, {card["input"]["name"]: x})[0]
    return {"card": card, "model": model, "net": net, "x": x,
            "targets": [int(t) for t in logits.argmax(1)]}


def vgg16_case(images: int = 2) -> dict[str, Any]:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None)
    net.avgpool = torch.nn.Identity()
    net.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    return _exported(net, "vgg16-random", images)


def vgg16_bn_case(images: int = 2) -> dict[str, Any]:
    """VGG16-BN as `vgg16_case`: biased convs each followed by a BatchNorm (random statistics),
    which the export folds into the conv's bias."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.vgg16_bn(weights=None)
    net.avgpool = torch.nn.Identity()
    net.classifier[0] = torch.nn.Linear(512 * 2 * 2, 4096)
    _random_statistics(net)
    return _exported(net, "vgg16-bn-random", images)


def _random_statistics(net: Any) -> None:
    """Random BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    import torch

    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)


def resnet50_case(images: int = 2) -> dict[str, Any]:
    """Random ResNet-50 at 64 px, its BatchNorms given random statistics (fresh ones are the
    identity): the export folds each into its bias-free conv."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    _random_statistics(net)
    return _exported(net, "resnet50-random", images)


def _exported(net: Any, name: str, images: int) -> dict[str, Any]:
    """The torch net (eval, ReLUs not in place) and its TorchScript ONNX export at 64 px."""
    import torch
    from cnnviz.graph import conv_layers

    for module in net.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # forward hooks on in-place ReLUs see overwritten tensors
    net.eval()
    x = np.random.default_rng(0).normal(size=(images, 3, 64, 64)).astype(np.float32)
    buf = io.BytesIO()
    torch.onnx.export(net, torch.from_numpy(x[:1]), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    card = {
        "name": name,
        "input": {"name": "input", "shape": ["batch", 3, 64, 64]},
        "output": {"name": "logits", "kind": "logits", "num_classes": 1000},
        "labels": [str(i) for i in range(1000)],
        "layers": conv_layers(model),
    }
    return _case(model, card, net, x)


def effnet_case(effnet_dir: Path, images: int = 2) -> dict[str, Any]:
    import torch
    import torch_oracle
    from cnnviz.images import preprocess
    from cnnviz.modelcard import load_card
    from PIL import Image
    from skimage import data

    card = load_card(effnet_dir)
    model = onnx.load(str(effnet_dir / card["onnx"]))
    photos = [data.chelsea(), data.coffee(), data.astronaut()][:images]
    x = np.stack([preprocess(Image.fromarray(p), card["preprocess"]) for p in photos])
    net = torch_oracle.pretrained_effnet(own_head_relu6=True)  # head_act: the head's ReLU6
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    case = _case(model, card, net, x)
    assert case["targets"] == [int(t) for t in ref.argmax(1)]
    return case


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
