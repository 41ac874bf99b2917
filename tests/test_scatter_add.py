"""The engine's scatter-adds (the adjoints of Gather and of overlapping MaxPool) add every update,
the same way on every run, with ONNX Runtime's CPU provider on several threads.

ONNX Runtime's ScatterND(reduction='add') CPU kernel splits the updates over its intra-op
threads with no guard against two adding to one position (onnxruntime#18048): with repeated
indices it lost about 0.5 % of the sum, differently each run, and feature visualization's step
on EfficientNet-Lite0 disagreed with itself by up to 60 % of the gradient's largest entry. The
Gather graph is big enough that the old ScatterND adjoint failed it on two threads (4,080 of
4,096 entries wrong); the MaxPool one checks the overlapping-window path the fix moved too.
"""

from __future__ import annotations

import numpy as np
import onnx
from cnnviz.autodiff import vjp
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(18048)
THREADS = 2
RUNS = 3


def _model(nodes, x_shape, inits=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "scatter", [x], [y], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gradients(model, x: np.ndarray, seed: np.ndarray) -> list[np.ndarray]:
    session = make_session(vjp(model, ["x"], ["y"], batch=x.shape[0]), "cpu", THREADS)
    return [session.run(["grad:x"], {"x": x, "seed:y": seed})[0] for _ in range(RUNS)]


def _assert_all_equal(runs: list[np.ndarray], expected: np.ndarray) -> None:
    for got in runs:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_array_equal(got, runs[0])  # deterministic, not only close


def test_gather_adjoint_adds_every_repeated_read():
    """A Gather reading 16 rows 100,000 times (a bilinear resampling's taps, exaggerated)."""
    rows, width, reads = 16, 256, 100_000
    idx = RNG.integers(0, rows, reads).astype(np.int64)
    model = _model(
        [helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)],
        [1, rows, width], [numpy_helper.from_array(idx, "idx")],
    )  # fmt: skip
    x = RNG.standard_normal((1, rows, width)).astype(np.float32)
    seed = RNG.standard_normal((1, reads, width)).astype(np.float32)
    expected = np.zeros((rows, width), np.float64)
    np.add.at(expected, idx, seed[0].astype(np.float64))
    _assert_all_equal(_gradients(model, x, seed), expected[None].astype(np.float32))


def test_overlapping_max_pool_adjoint_adds_every_window():
    """3x3 windows at stride 1 over a field with few distinct values: one input wins up to nine
    windows, and all nine gradients reach it."""
    shape = [8, 32, 64, 64]
    model = _model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1])], shape
    )
    x = np.repeat(np.repeat(RNG.standard_normal((8, 32, 22, 22)), 3, 2), 3, 3)[:, :, :64, :64]
    x = (x + 1e-3 * RNG.standard_normal(shape)).astype(np.float32)  # one winner per window
    seed = RNG.standard_normal((8, 32, 62, 62)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    flat_arg = windows.reshape(*windows.shape[:4], 9).argmax(-1)
    rows = np.arange(62)[:, None] + flat_arg // 3
    cols = np.arange(62)[None, :] + flat_arg % 3
    expected = np.zeros(shape, np.float64)
    n, c = np.meshgrid(np.arange(8), np.arange(32), indexing="ij")
    np.add.at(expected, (n[..., None, None], c[..., None, None], rows, cols), seed)
    _assert_all_equal(_gradients(model, x, seed), expected.astype(np.float32))


def _gather_nd_expected(seed_rows: np.ndarray, tuples: np.ndarray, shape) -> np.ndarray:
    """zeros(shape) with seed_rows[i] added at data[tuples[i]] (numpy's unbuffered add)."""
    expected = np.zeros(shape, np.float64)
    np.add.at(expected, tuple(tuples.T), seed_rows.astype(np.float64))
    return expected


def test_gather_nd_adjoint_as_dynamo_writes_adaptive_pooling():
    """torch.onnx's dynamo exporter writes AdaptiveAvgPool2d to a larger output (VGG, AlexNet
    below 224 px) as Transpose -> GatherND(constant (h, w) positions, each read many times) ->
    Transpose; the adjoint adds every read back."""
    b, c, h, w = 3, 4, 2, 3
    tuples = RNG.integers(-h, h, (7, 5, 2))
    tuples[..., 1] = RNG.integers(-w, w, (7, 5))
    model = _model(
        [
            helper.make_node("Transpose", ["x"], ["hwbc"], perm=[2, 3, 0, 1]),
            helper.make_node("GatherND", ["hwbc", "idx"], ["picked"]),
            helper.make_node("Transpose", ["picked"], ["y"], perm=[2, 3, 0, 1]),
        ],
        [b, c, h, w], [numpy_helper.from_array(tuples.astype(np.int64), "idx")],
    )  # fmt: skip
    x = RNG.standard_normal((b, c, h, w)).astype(np.float32)
    seed = RNG.standard_normal((b, c, 7, 5)).astype(np.float32)
    wrapped = np.where(tuples < 0, tuples + np.array([h, w]), tuples).reshape(-1, 2)
    rows = seed.transpose(2, 3, 0, 1).reshape(35, b, c)
    expected = _gather_nd_expected(rows, wrapped, (h, w, b, c)).transpose(2, 3, 0, 1)
    _assert_all_equal(_gradients(model, x, seed), expected.astype(np.float32))


def test_gather_nd_adjoint_with_indices_computed_at_run_time():
    """Indices fed at run time (negative ones wrapped in the graph), one tuple of two
    per read into a [B, rows, width] tensor: whole rows gathered and their gradients added back."""
    b, rows, width, reads = 2, 6, 5, 40
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows, width])
    idx_info = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", reads, 2])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("GatherND", ["x", "idx"], ["y"])
    graph = helper.make_graph([node], "gnd", [x_info, idx_info], [y_info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tuples = np.stack([RNG.integers(-b, b, (b, reads)), RNG.integers(-rows, rows, (b, reads))], 2)
    x = RNG.standard_normal((b, rows, width)).astype(np.float32)
    seed = RNG.standard_normal((b, reads, width)).astype(np.float32)
    session = make_session(vjp(model, ["x"], ["y"], batch=b), "cpu", THREADS)
    feeds = {"x": x, "idx": tuples, "seed:y": seed}
    runs = [session.run(["grad:x"], feeds)[0] for _ in range(RUNS)]
    wrapped = np.where(tuples < 0, tuples + np.array([b, rows]), tuples).reshape(-1, 2)
    expected = _gather_nd_expected(seed.reshape(-1, width), wrapped, (b, rows, width))
    _assert_all_equal(runs, expected.astype(np.float32))
