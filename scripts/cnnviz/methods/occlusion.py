"""Occlusion (Zeiler & Fergus 2014): how much the target's probability drops under a grey patch.

A `window` x `window` patch of the baseline (0 in the model's input space: the mean pixel, since
inputs are normalised with the dataset mean) slides over the image with `stride`; the map at a
pixel is the drop p_t(x) - p_t(occluded) averaged over the patches that cover it. This is captum's
Occlusion with sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
baselines=0 on the softmax of the logits: captum places ceil((H - window) / stride) + 1 windows
per axis, so the last one may stick out of the image and is cut at the border, and every pixel is
covered. All occluded copies run through one session in batches of `batch_size`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top-left offsets along one axis, as captum counts them."""
    if window > size:
        raise ConfigError(f"occlusion window {window} is larger than the image side {size}")
    if stride < 1 or (stride > window and window < size):
        raise ConfigError(
            f"occlusion stride {stride} must be between 1 and the window {window}, "
            "or pixels would never be occluded"
        )
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def _probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    out = np.asarray(outputs, dtype=np.float64)
    if kind == "probabilities":
        return out
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def occlusion(
    session: ort.InferenceSession,
    card: dict[str, Any],
    image: np.ndarray,
    target: int,
    window: int = 32,
    stride: int = 16,
    batch_size: int = 64,
    baseline: float = 0.0,
) -> np.ndarray:
    """float32 [H, W]: the mean drop in p(target) over the patches covering each pixel.

    `session`: a plain forward session of the model (free batch axis); image: [3, H, W] already
    preprocessed. Positive where hiding the pixel lowers the target's probability.
    """
    x = np.asarray(image, dtype=np.float32).reshape(np.shape(image)[-3:])
    _, height, width = x.shape
    boxes = [
        (top, left)
        for top in window_starts(height, window, stride)
        for left in window_starts(width, window, stride)
    ]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    in_name = card.get("input", {}).get("name")
    in_name = in_name if in_name in inputs else inputs[0]
    out_name = card.get("output", {}).get("name")
    out_name = out_name if out_name in outputs else outputs[0]
    kind = card.get("output", {}).get("kind", "logits")

    drops = np.zeros(len(boxes))
    reference = None
    step = max(1, batch_size)
    for start in range(-1, len(boxes), step):  # row -1: the unoccluded image, in the first run
        part = boxes[max(start, 0) : start + step]
        batch = np.repeat(x[None], len(part) + (start < 0), axis=0)
        for row, (top, left) in enumerate(part, start=int(start < 0)):
            batch[row, :, top : top + window, left : left + window] = baseline
        probs = _probabilities(session.run([out_name], {in_name: batch})[0], kind)[:, target]
        if start < 0:
            reference, probs = probs[0], probs[1:]
        drops[max(start, 0) : max(start, 0) + len(part)] = probs
    drops = reference - drops

    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for drop, (top, left) in zip(drops, boxes, strict=True):
        total[top : top + window, left : left + window] += drop
        count[top : top + window, left : left + window] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)
