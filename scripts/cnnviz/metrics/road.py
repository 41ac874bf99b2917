"""ROAD: remove and debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022).

Deletion replaces pixels by a constant or a blur; the model then sees the *shape* of the removed
region, and a map is rewarded for drawing that shape (the class leaks through the mask). ROAD
removes a fraction of the pixels in the map's order and fills each removed pixel by *noisy
linear imputation*: the value that is the weighted mean of its 8 neighbours (1/6 for the four
edge neighbours, 1/12 for the diagonals; removed neighbours are unknowns of the same sparse
linear system), plus Gaussian noise of standard deviation `noise` (in model input units). The
fill follows the image around the hole, so the mask's outline carries no information.

Two orders: MoRF (most relevant first: the class probability should fall fast, low is good) and
LeRF (least relevant first: it should stay, high is good). The score of a map is the mean of each
curve over the removal fractions, and their gap LeRF - MoRF (high is good).

The linear system and its weights are those of the authors' code (github.com/tleemann/
road_evaluation) as Quantus 0.6.0 ports it (`quantus.functions.perturb_func.
noisy_linear_imputation`); tests/test_metrics_rank.py checks equality with noise 0. All
perturbed copies of one image (fractions x two orders) are scored through the one forward
session a batch at a time, as deletion / insertion are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .perturbation import Scorer, pixel_positions

# (row offset, column offset, weight): the authors' neighbourhood.
NEIGHBOURS = (
    (1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
    (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6),
)  # fmt: skip
ORDERS = ("morf", "lerf")


def noisy_linear_imputation(
    image: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """[C, H, W] `image` with the pixels where `removed` [H, W] is True imputed (all channels).

    Each removed pixel solves sum_n w_n (x - x_n) = 0 over its neighbours inside the image;
    known neighbours go to the right-hand side. Noise N(0, noise^2) is added to the imputed values
    (drawn from `rng`; none when noise is 0).
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    image = np.asarray(image, dtype=np.float64)
    channels, height, width = image.shape
    removed = np.asarray(removed, dtype=bool).reshape(height, width)
    unknown = np.flatnonzero(removed)
    out = image.reshape(channels, -1).copy()
    if unknown.size == 0:
        return out.reshape(image.shape).astype(np.float32)
    k = unknown.size
    variable = np.full(height * width, -1, dtype=np.int64)
    variable[unknown] = np.arange(k)
    rows_, cols_ = np.divmod(unknown, width)
    diagonal = np.zeros(k)
    rhs = np.zeros((k, channels))
    a_rows, a_cols, a_vals = [], [], []
    for dr, dc, weight in NEIGHBOURS:
        r, c = rows_ + dr, cols_ + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        ids = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        diagonal[ids] -= weight
        free = variable[neighbour] >= 0
        a_rows.append(ids[free])
        a_cols.append(variable[neighbour[free]])
        a_vals.append(np.full(int(free.sum()), weight))
        rhs[ids[~free]] -= weight * out[:, neighbour[~free]].T
    a_rows.append(np.arange(k))
    a_cols.append(np.arange(k))
    a_vals.append(diagonal)
    matrix = csc_matrix(
        (np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))), shape=(k, k)
    )
    solved = np.asarray(spsolve(matrix, rhs)).reshape(k, channels)
    if noise > 0:
        if rng is None:
            raise ConfigError("noisy_linear_imputation: give a seeded generator for the noise")
        solved = solved + noise * rng.standard_normal(solved.shape)
    out[:, unknown] = solved.T
    return out.reshape(image.shape).astype(np.float32)


def removed_counts(pixels: int, fractions: list[float]) -> list[int]:
    """Pixels removed at each fraction: int(pixels * fraction), as Quantus counts them."""
    bad = [f for f in fractions if not 0.0 < float(f) < 1.0]
    if bad or not fractions:
        raise ConfigError(
            f"metrics road.fractions must be numbers between 0 and 1 (exclusive), got {fractions}"
        )
    return [int(pixels * float(f)) for f in fractions]


def road_curves(
    scorer: Scorer,
    image: np.ndarray,
    saliency: np.ndarray,
    target: int,
    fractions: list[float],
    noise: float,
    rng: np.random.Generator,
    seed: int = 0,
) -> dict[str, Any]:
    """ROAD of one map: {"morf", "lerf": target probability per fraction, "morf_top1",
    "lerf_top1": 1 where the target is still the top-1 class, "morf_mean", "lerf_mean", "gap"}.

    `seed` orders tied map values (as deletion does); `rng` draws the imputation noise.
    """
    image = np.asarray(image, dtype=np.float32)
    size = image.shape[-2:]
    if np.shape(saliency) != size:
        raise ConfigError(f"the map is {np.shape(saliency)}, the model input {tuple(size)}")
    positions = pixel_positions(saliency, seed).reshape(size)  # 0 = most relevant
    counts = removed_counts(positions.size, fractions)
    copies = []
    for order in ORDERS:
        rank = positions if order == "morf" else positions.size - 1 - positions
        copies += [noisy_linear_imputation(image, rank < n, noise, rng) for n in counts]
    probs = scorer.probabilities(np.stack(copies))
    on_target = probs[:, target]
    top1 = (probs.argmax(axis=1) == target).astype(int)
    f = len(counts)
    out: dict[str, Any] = {}
    for k, order in enumerate(ORDERS):
        out[order] = on_target[k * f : (k + 1) * f].tolist()
        out[f"{order}_top1"] = top1[k * f : (k + 1) * f].tolist()
        out[f"{order}_mean"] = float(np.mean(on_target[k * f : (k + 1) * f]))
    out["gap"] = out["lerf_mean"] - out["morf_mean"]
    return out
