"""Occlusion, as cnnviz explain runs it (`occlusion.occlusion_graph` through the one runner), on a
tiny ONNX model whose answer is known, against a loop over the definition."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.errors import ConfigError
from cnnviz.methods.explain import run_method
from cnnviz.methods.occlusion import window_starts
from onnx import TensorProto, helper, numpy_helper
from test_method_graphs import job_for

C, H, W = 3, 10, 10
RNG = np.random.default_rng(5)
# logit 0 = 4 * mean of channel 0 over rows 2..5, cols 4..7; logit 1 = 0; logit 2 = sum of
# channel 1 / 50 (the whole image): class 0 depends on a 4x4 region only.
REGION = (slice(2, 6), slice(4, 8))
WEIGHTS = np.zeros((3, C, H, W), np.float32)
WEIGHTS[0, 0][REGION] = 4.0 / 16
WEIGHTS[2, 1] = 1.0 / 50
CARD = {
    "input": {"name": "input", "shape": ["batch", C, H, W]},
    "output": {"name": "logits", "kind": "logits", "num_classes": 3},
}


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1),
    ]
    w = numpy_helper.from_array(WEIGHTS.reshape(3, -1), "w")
    graph = helper.make_graph(nodes, "region", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def occlusion(
    x: np.ndarray, targets: list[int], window: int, stride: int, batch_size: int
) -> np.ndarray:
    """[N, H, W]: explain's occlusion maps of the images x [N, C, H, W]."""
    job = job_for(_model(), CARD, x, targets, batch_size, window=window, stride=stride)
    return np.stack([raw for _, raw, _, _ in run_method(job, "occlusion")])


def _prob(x: np.ndarray, target: int) -> float:
    logits = WEIGHTS.reshape(3, -1).astype(np.float64) @ x.reshape(-1).astype(np.float64)
    e = np.exp(logits - logits.max())
    return float(e[target] / e.sum())


def _reference(x: np.ndarray, target: int, window: int, stride: int) -> np.ndarray:
    """captum's Occlusion written out: windows may stick out at the far edge and are cut."""
    total, count = np.zeros((H, W)), np.zeros((H, W))
    rows = range(0, stride * (int(np.ceil((H - window) / stride)) + 1), stride)
    cols = range(0, stride * (int(np.ceil((W - window) / stride)) + 1), stride)
    for top in rows:
        for left in cols:
            hidden = x.copy()
            hidden[:, top : top + window, left : left + window] = 0
            total[top : top + window, left : left + window] += _prob(x, target) - _prob(
                hidden, target
            )
            count[top : top + window, left : left + window] += 1
    return total / count


def test_occlusion_is_high_on_the_region_only():
    x = RNG.uniform(0.5, 1.0, size=(C, H, W)).astype(np.float32)
    x[1] = 0  # so that no other logit depends on the image either
    heat = occlusion(x[None], [0], window=2, stride=2, batch_size=8)[0]
    assert heat.shape == (H, W) and heat.dtype == np.float32
    inside = np.zeros((H, W), bool)
    inside[REGION] = True
    assert heat[inside].min() > 0.01
    assert np.abs(heat[~inside]).max() < 1e-6  # patches off the region change nothing
    np.testing.assert_allclose(heat, _reference(x, 0, 2, 2), atol=1e-6)


@pytest.mark.parametrize(("window", "stride"), [(3, 2), (4, 3), (10, 1)])
def test_occlusion_matches_the_definition_and_batching(window, stride):
    """Three images: 16 rows per call (an image's patches over two calls), 50 (two images per
    call, the last call padded), 1000 (everything in one call)."""
    x = RNG.normal(size=(3, C, H, W)).astype(np.float32)
    expected = [_reference(image, 2, window, stride) for image in x]
    for batch_size in (1, 50, 1000):
        heat = occlusion(x, [2, 2, 2], window=window, stride=stride, batch_size=batch_size)
        np.testing.assert_allclose(heat, expected, atol=1e-6)


def test_window_starts_and_errors():
    assert window_starts(224, 32, 16) == list(range(0, 193, 16))  # 13 per axis: 169 patches
    assert window_starts(10, 3, 2) == [0, 2, 4, 6, 8]  # the last window is cut at the border
    with pytest.raises(ConfigError, match="larger than"):
        window_starts(10, 11, 1)
    with pytest.raises(ConfigError, match="stride"):
        window_starts(10, 3, 4)
