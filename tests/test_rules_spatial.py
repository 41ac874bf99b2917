"""Backward rules of rules_spatial (Pad modes, Resize/Upsample, max-like and norm reductions,
Tile, Einsum, Layer/Instance/Group normalization) against central finite differences.

Linear ops (Pad, Resize, Tile, Einsum) are checked with eps=1, where central differences are
exact up to rounding; float64 where ONNX Runtime's CPU provider runs the op in double.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from test_autodiff_rules import F32, F64, build, check, rand


# ---- Pad ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
@pytest.mark.parametrize(
    "pads",
    [
        [0, 0, 1, 2, 0, 0, 2, 1],  # both spatial axes, uneven
        [0, 0, 0, 3, 0, 0, 0, 0],  # one side only
        [0, 1, 2, 0, 0, 0, 3, 4],  # channels too; wrap past a whole period (W=5 + 4)
    ],
)
def test_pad_modes(mode, pads):
    if mode == "reflect" and max(pads) >= 4:
        pads = [min(p, 3) for p in pads]  # reflect needs pads < axis length
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    model = build([node], (1, 2, 4, 5), {"pads": np.array(pads, np.int64)}, dtype=F64, opset=19)
    check(model, rand((1, 2, 4, 5), F64), eps=1.0, rtol=1e-9)


def test_pad_edge_with_axes_input():
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="edge")
    inits = {"pads": np.array([3, 1, 0, 2], np.int64), "axes": np.array([-1, 2], np.int64)}
    model = build([node], (1, 2, 4, 5), inits, dtype=F64, opset=19)
    check(model, rand((1, 2, 4, 5), F64), eps=1.0, rtol=1e-9)


def test_pad_reflect_old_opset_attribute():
    node = helper.make_node("Pad", ["x"], ["y"], mode="reflect", pads=[0, 0, 2, 1, 0, 0, 1, 2])
    model = build([node], (1, 2, 4, 5), dtype=F32, opset=9)
    check(model, rand((1, 2, 4, 5)), eps=1.0, rtol=1e-5)
