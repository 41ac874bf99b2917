"""What every per-image method shares: choosing targets and layers, scaling maps.

The artifacts of a method for a shard (one array file and an index per shard and method, the
pictures drawn by their own jobs) are written by cnnviz.methods.shard_maps and cnnviz.pictures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError

TargetSpec = str | int | list[int | str] | dict[str, int]


def resolve_targets(
    card: dict[str, Any], probs: np.ndarray, spec: TargetSpec = "top1"
) -> list[int]:
    """Class indices to explain for one image.

    `spec`: "top1" (the default), {"top_k": k}, or classes by index or label (one or a list).
    An unknown class raises ConfigError naming it (via modelcard.resolve_class).
    """
    from ..modelcard import resolve_class

    order = np.argsort(-np.asarray(probs), kind="stable")
    if spec in (None, "top1"):
        return [int(order[0])]
    if isinstance(spec, dict):
        if set(spec) != {"top_k"} or int(spec["top_k"]) < 1:
            raise ConfigError(f"target {spec!r}: use 'top1', {{top_k: k}} or class names/indices")
        return [int(i) for i in order[: int(spec["top_k"])]]
    classes = spec if isinstance(spec, list) else [spec]
    return [resolve_class(card, c) for c in classes]


def known_classes(card: dict[str, Any], spec: TargetSpec) -> tuple[TargetSpec, list[str]]:
    """`spec` without the classes the model lacks, and an error naming each of those.

    One unknown label in a list should not cost the images their other targets: the caller
    explains the known classes and records the errors.
    """
    from ..modelcard import resolve_class

    if spec in (None, "top1") or isinstance(spec, dict):
        return spec, []
    known: list[int | str] = []
    errors: list[str] = []
    for target in spec if isinstance(spec, list) else [spec]:
        try:
            resolve_class(card, target)
            known.append(target)
        except ConfigError as error:
            errors.append(str(error))
    return known, errors


def last_conv_layer(card: dict[str, Any]) -> dict[str, Any]:
    """The last conv-like layer whose output is still a spatial map (H, W > 1): Grad-CAM's layer."""
    spatial = [row for row in card["layers"] if row["shape"][-1] > 1 and row["shape"][-2] > 1]
    if not spatial:
        raise ConfigError(
            f"model {card.get('name')!r} has no conv layer with a spatial output; "
            "name a layer for the class activation maps in the config"
        )
    return spatial[-1]


def normalize_map(raw: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] (a flat map becomes all zeros, not NaN)."""
    raw = np.asarray(raw, dtype=np.float32)
    low, high = float(raw.min()), float(raw.max())
    if high - low <= 1e-12:
        return np.zeros_like(raw)
    return (raw - low) / (high - low)
