"""Graphs over protobuf's 2 GiB limit get a session (runtime.open_session): the zoo's
EfficientNetV2-L failed LRP with 'EncodeError: Failed to serialize proto' before, because
LRP's rules keep modified copies of the weights. Such a graph reaches ONNX Runtime as a file
with external data (runtime.session_with_external_data). Here that path runs on the real LRP
graph of EfficientNet-Lite0 (protobuf cannot even hold one 2 GiB tensor in a graph, and two
1 GiB ones took 8 GB of memory: too much for CI) and must give the in-memory session's outputs
and leave the caller's graph as it was. The zoo's EfficientNetV2-L row runs it past 2 GiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from cnnviz.autodiff.rules_lrp import LrpSettings
from cnnviz.methods.lrp import lrp_graph
from cnnviz.model_file import EXTERNAL_FROM_BYTES, save_with_external_data
from cnnviz.runtime import CPU, make_session, session_options, session_with_external_data


def test_a_graph_given_to_onnx_runtime_as_external_data_runs_as_in_memory(
    effnet_dir: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(effnet_dir / "model.onnx"))
    graph = lrp_graph(model, 2, "epsilon_plus_flat", LrpSettings()).model
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    large = {n for n, a in arrays.items() if a.nbytes >= EXTERNAL_FROM_BYTES}
    x = np.random.default_rng(3).normal(size=(2, 3, 224, 224)).astype(np.float32)
    feeds = {"images": x, "targets": np.array([1, 3], np.int64)}

    path = save_with_external_data(graph, tmp_path / "graph.onnx")
    # The caller's graph keeps its weights (they are copied out, not moved).
    for t in graph.graph.initializer:
        assert t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), arrays[t.name])
    data = path.with_name(path.name + ".data")
    assert data.stat().st_size >= sum(arrays[n].nbytes for n in large) > 4e6
    written = onnx.load(str(path), load_external_data=False).graph.initializer
    assert {t.name for t in written if t.data_location == onnx.TensorProto.EXTERNAL} == large
    # The session the runtime opens: its scratch folder is gone once the session exists.
    filed = session_with_external_data(graph, session_options(1), list(CPU))
    assert isinstance(filed, ort.InferenceSession)
    want = make_session(graph, "cpu", 1).run(None, feeds)
    got = filed.run(None, feeds)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(want[0]).max() > 0  # a real relevance map, not zeros
