"""How alike two maps are: Spearman rank correlation and SSIM, in numpy.

Both follow the reference implementations exactly (tests compare them with
scipy.stats.spearmanr and skimage.metrics.structural_similarity):

- spearman: the Pearson correlation of the average ranks (ties share their mean rank); NaN when
  either map is constant (no ordering to compare), as scipy.
- ssim: Wang et al. 2004 with skimage's defaults: 7 x 7 uniform windows, K1 = 0.01, K2 = 0.03,
  sample covariances, averaged over the windows that lie fully inside the image (skimage's
  reflect-padded filter followed by its crop of 3 pixels per side gives exactly those).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ConfigError


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks of the flattened values, ties sharing their average rank (float64)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(a, kind="stable")
    ordered = a[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], a.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of one shape; NaN when either is constant."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ConfigError(f"spearman: the maps differ in shape, {a.shape} vs {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    norm = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if norm == 0.0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / norm, -1.0, 1.0))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, win_size: int = 7) -> float:
    """Mean structural similarity of two 2-D maps (skimage's defaults; see the module notes)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ConfigError(f"ssim needs two 2-D maps of one shape, got {x.shape} and {y.shape}")
    if min(x.shape) < win_size or win_size % 2 == 0:
        raise ConfigError(f"ssim: win_size {win_size} must be odd and at most the map's side")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    count = win_size * win_size
    cov_norm = count / (count - 1.0)

    def mean(z: np.ndarray) -> np.ndarray:
        return sliding_window_view(z, (win_size, win_size)).mean(axis=(-2, -1))

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def unit(m: np.ndarray) -> np.ndarray:
    """A map min-max scaled to [0, 1] (a constant map becomes zeros): SSIM's common scale."""
    m = np.asarray(m, dtype=np.float64)
    low, span = float(m.min()), float(m.max() - m.min())
    return (m - low) / span if span > 0 else np.zeros_like(m)
