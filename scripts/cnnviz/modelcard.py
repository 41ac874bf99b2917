"""model.json: what export learned about a model, read by every later step (no torch)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from .artifacts import read_json, write_json
from .errors import ConfigError, ModelError
from .failures import check_input

CARD = "model.json"
REQUIRED = ("name", "source", "weights", "onnx", "sha256", "opset", "input", "output",
            "preprocess", "labels", "layers")  # fmt: skip
LAYER_KEYS = ("name", "tensor", "conv_node", "conv_output", "activation", "shape", "depth")


def card_path(model_dir: str | os.PathLike[str]) -> Path:
    """model.json inside `model_dir` (a path to model.json itself is accepted too)."""
    path = Path(model_dir)
    return path if path.name == CARD else path / CARD


def load_card(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check model.json; ModelError naming the file when it is missing or incomplete."""
    path = card_path(model_dir)
    if not path.is_file():
        raise ModelError(f"{path} does not exist; run the export step for this model first")
    check_input(path, f"model {path.parent.name!r}")
    try:
        card = read_json(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; rerun the export step") from exc
    if not isinstance(card, dict):
        raise ModelError(f"{path} is not a JSON object; rerun the export step")
    missing = [key for key in REQUIRED if key not in card]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}; rerun the export step")
    for i, layer in enumerate(card["layers"]):
        gaps = [key for key in LAYER_KEYS if key not in layer]
        if gaps:
            raise ModelError(f"{path}: layers[{i}] lacks {', '.join(gaps)}; rerun the export step")
    pre, entry = card["preprocess"], card["input"]
    if str(pre.get("channel_order", "RGB")).upper() == "BGR" and "channel_order" not in entry:
        raise ModelError(
            f"{path}: written by an older cnnviz, whose model.onnx takes BGR (today's takes RGB "
            "and reverses the channels in the graph); rerun the export step"
        )
    classes = card["output"].get("num_classes")
    if classes is not None and len(card["labels"]) != classes:
        raise ModelError(
            f"{path}: {len(card['labels'])} labels for {classes} classes; rerun the export step"
        )
    return card


def save_card(model_dir: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write model.json atomically (a reader never sees half a card)."""
    return write_json(card_path(model_dir), card)


def model_path(model_dir: str | os.PathLike[str], card: dict[str, Any] | None = None) -> Path:
    """The ONNX file the card describes; ModelError when it is gone."""
    card = card if card is not None else load_card(model_dir)
    base = card_path(model_dir).parent
    path = base / card["onnx"]
    if not path.is_file():
        raise ModelError(f"{path} (named by {base / CARD}) does not exist; rerun the export step")
    return path


def find_layer(card: dict[str, Any], name: str) -> dict[str, Any]:
    """The layer row for a friendly name, or for its tensor / conv output tensor name."""
    layers = card["layers"]
    for key in ("name", "tensor", "conv_output"):
        for layer in layers:
            if layer[key] == name:
                return layer
    names = [layer["name"] for layer in layers]
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model {card.get('name', '?')!r} has no layer {name!r}.{hint} "
        f"Its layers: {_listing(names)}"
    )


def resolve_class(card: dict[str, Any], index_or_label: int | str) -> int:
    """A class index from an index (int or digits) or a label (case-insensitive). A label that
    several classes share (ImageNet's "crane": 134, the bird, and 517, the machine) is refused,
    naming the indices, rather than one of them chosen silently."""
    labels: list[str] = card["labels"]
    model = card.get("name", "?")
    value = index_or_label
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(labels):
            return value
        raise ConfigError(
            f"class index {value} is out of range for model {model!r} "
            f"(0..{len(labels) - 1}); give an index in range or a label"
        )
    wanted = str(value).strip().casefold()
    matches = [i for i, label in enumerate(labels) if label.casefold() == wanted]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(
            f"class {index_or_label!r} names {len(matches)} classes of model {model!r} "
            f"(indices {', '.join(map(str, matches))}); give the index of the one you mean"
        )
    lowered = {label.casefold(): label for label in labels}
    close = [lowered[c] for c in difflib.get_close_matches(wanted, list(lowered), n=5, cutoff=0.6)]
    close += [label for label in labels if wanted and wanted in label.casefold()][:5]
    close = list(dict.fromkeys(close))[:5]
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"model {model!r} has no class {index_or_label!r}.{hint} "
        "Give a label from model.json or a class index"
    )


def _listing(names: list[str], limit: int = 80) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
