"""How concentrated is a map? Sparseness and complexity, on the map's magnitude |m|.

- sparseness (Chalasani et al. 2020): the Gini index of |m|, 0 (every pixel equal) to 1 (one
  pixel holds everything); higher is better: a map that names a few pixels is easier to read.
- complexity (Bhatt et al. 2020): the entropy of |m| / sum |m| (natural log), 0 (one pixel) to
  log(H * W) (uniform); lower is better.

Both equal Quantus 0.6.0's Sparseness and Complexity with their defaults (abs, normalised by the
maximum, the same guards: 1e-7 added before the Gini index, 1e-12 inside the logarithm);
tests/test_metrics_rank.py checks that.
"""

from __future__ import annotations

import numpy as np


def _magnitude(saliency: np.ndarray) -> np.ndarray:
    a = np.abs(np.asarray(saliency, dtype=np.float64)).ravel()
    top = a.max() if a.size else 0.0
    return a / top if top > 0 else a


def sparseness(saliency: np.ndarray) -> float:
    """Gini index of the map's magnitude (see the module notes)."""
    a = np.sort(_magnitude(saliency) + 1e-7)
    n = a.size
    k = np.arange(1, n + 1)
    return float(((2 * k - n - 1) * a).sum() / (n * a.sum()))


def complexity(saliency: np.ndarray) -> float:
    """Entropy of the map's normalised magnitude (see the module notes); NaN for a zero map."""
    a = _magnitude(saliency)
    total = a.sum()
    if total == 0:
        return float("nan")
    p = a / total
    return float(-(p * np.log(p + 1e-12)).sum())
