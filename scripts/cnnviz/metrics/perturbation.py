"""Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018).

A map ranks the pixels; deletion replaces them, most important first, `pixels` at a time, by a
baseline and follows the target class probability down; insertion starts from the baseline and
puts the image's pixels back in the same order. The area under each curve (trapezoid, the x
axis being the fraction of pixels changed, 0..1) scores the map: a low deletion AUC and a high
insertion AUC mean the map found the pixels the class depends on.

Baselines, in model input space: "blur" (the image under a Gaussian blur of sigma `blur_sigma`
pixels), "grey" (0 after normalization, the dataset mean colour) and "zero" (black pixels through
the model's preprocessing). Deletion and insertion each have their own; the defaults are RISE's
(its code deletes to zeros of the normalized input, i.e. grey, and inserts onto the blurred
image). Ties in a map (flat regions of a CAM) are broken in a seeded random order, so no raster
direction is favoured.
All points of one image's two curves run through one forward session in batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError

BASELINES = ("blur", "grey", "zero")


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """[C, H, W] blurred per channel: separable Gaussian, radius 4 sigma, mirrored borders
    (scipy.ndimage.gaussian_filter's defaults)."""
    x = np.asarray(image, dtype=np.float64)
    if sigma <= 0:
        return x.astype(np.float32)
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (-2, -1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        length = x.shape[axis]
        x = sum(
            w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(kernel)
        )
    return np.asarray(x, dtype=np.float32)


def baseline_image(
    image: np.ndarray,
    kind: str = "blur",
    blur_sigma: float = 5.0,
    pre: dict[str, Any] | None = None,
) -> np.ndarray:
    """The [3, H, W] model input that stands for "no information" at a removed pixel."""
    image = np.asarray(image, dtype=np.float32)
    if kind == "blur":
        return gaussian_blur(image, blur_sigma)
    if kind == "grey":
        return np.zeros_like(image)
    if kind == "zero":
        from ..methods.backprop import make_baseline

        return make_baseline("black", image, pre or {})
    raise ConfigError(f"metrics baseline {kind!r}: use one of {', '.join(BASELINES)}")


def pixel_positions(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """[H*W] int: each pixel's place in the removal order (0 = the map's most important).

    Pixels with equal values are ordered by a seeded random permutation.
    """
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    if not np.isfinite(flat).all():
        raise ConfigError("the map has NaN or infinite values; it cannot rank pixels")
    shuffle = np.random.default_rng(seed).permutation(flat.size)
    order = shuffle[np.argsort(-flat[shuffle], kind="stable")]
    positions = np.empty(flat.size, dtype=np.int64)
    positions[order] = np.arange(flat.size)
    return positions


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """[steps + 1] pixels changed before each point: 0, p, 2p, ..., all (p = ceil(pixels/steps))."""
    if steps < 1:
        raise ConfigError(f"metrics steps must be at least 1, got {steps}")
    per_step = -(-pixels // steps)
    return np.minimum(np.arange(steps + 1) * per_step, pixels)


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under values(fractions), fractions running 0..1."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Scorer:
    """Class probabilities of batches of inputs from one forward session."""

    def __init__(self, session: ort.InferenceSession, card: dict[str, Any], batch_size: int = 16):
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        self.session = session
        wanted_in = card.get("input", {}).get("name")
        wanted_out = card.get("output", {}).get("name")
        self.input = wanted_in if wanted_in in inputs else inputs[0]
        self.output = wanted_out if wanted_out in outputs else outputs[0]
        self.logits = card.get("output", {}).get("kind", "logits") != "probabilities"
        self.batch_size = max(1, int(batch_size))

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """[N, K] float64 class probabilities (softmax of the logits) of inputs [N, 3, H, W]."""
        parts = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = np.ascontiguousarray(inputs[start : start + self.batch_size], np.float32)
            parts.append(self.session.run([self.output], {self.input: chunk})[0])
        out = np.concatenate(parts).reshape(len(inputs), -1)
        return softmax(out) if self.logits else out.astype(np.float64)


def perturbation_curves(
    scorer: Scorer,
    image: np.ndarray,
    saliency: np.ndarray,
    target: int,
    steps: int,
    baseline: np.ndarray,
    seed: int = 0,
    insertion_baseline: np.ndarray | None = None,
) -> dict[str, Any]:
    """Deletion and insertion curves of one map: {"fractions", "deletion", "insertion" (lists),
    "deletion_auc", "insertion_auc"}.

    `image` and `baseline` (deletion's; insertion's too unless `insertion_baseline` is given)
    are model inputs [3, H, W]; `saliency` is [H, W] at the same size.
    The 2 * (steps + 1) perturbed inputs are built and scored a batch at a time.
    """
    image = np.asarray(image, dtype=np.float32)
    baseline = np.asarray(baseline, dtype=np.float32)
    inserted_on = baseline if insertion_baseline is None else insertion_baseline
    substrates = np.stack([baseline, np.asarray(inserted_on, np.float32)])  # deletion, insertion
    size = image.shape[-2:]
    if np.shape(saliency) != size:
        raise ConfigError(
            f"the map is {np.shape(saliency)} but the model input is {tuple(size)}; "
            "maps must be at model input size (the explain step writes them so)"
        )
    positions = pixel_positions(saliency, seed).reshape(size)
    counts = step_counts(positions.size, steps)
    points = len(counts)
    # Point j < points: deletion after counts[j] pixels; j >= points: insertion.
    probs = np.empty(2 * points)
    for start in range(0, 2 * points, scorer.batch_size):
        js = np.arange(start, min(start + scorer.batch_size, 2 * points))
        changed = positions[None] < counts[js % points][:, None, None]  # [B, H, W]
        inserting = js >= points
        take_image = changed == inserting[:, None, None]  # deletion keeps the unchanged pixels
        batch = np.where(take_image[:, None], image[None], substrates[inserting.astype(int)])
        probs[js] = scorer.probabilities(batch)[:, target]
    fractions = counts / positions.size
    deletion, insertion = probs[:points], probs[points:]
    return {
        "fractions": fractions.tolist(),
        "deletion": deletion.tolist(),
        "insertion": insertion.tolist(),
        "deletion_auc": auc(fractions, deletion),
        "insertion_auc": auc(fractions, insertion),
    }
