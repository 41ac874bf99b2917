"""A numpy reference for 3x3, stride-1, pad-1 convolutions and their transposes (float64)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [O, H, W] for weights [O, C, 3, 3] and bias [O]."""
    windows = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
    return np.einsum("chwij,ocij->ohw", windows, w) + b[:, None, None]


def conv3x3_transpose(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[O, H, W] -> [C, H, W]: the input gradient of conv3x3 (deconvnet's filtering step)."""
    gx = np.zeros((w.shape[1], g.shape[1] + 2, g.shape[2] + 2))
    for i in range(3):
        for j in range(3):
            part = np.einsum("ohw,oc->chw", g, w[:, :, i, j])
            gx[:, i : i + g.shape[1], j : j + g.shape[2]] += part
    return gx[:, 1:-1, 1:-1]
