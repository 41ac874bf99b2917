"""Models past protobuf's 2 GiB (cnnviz.model_file): the graph in model.onnx, the weights in
model.onnx.data beside it, the card's checksum over both, and every step reading them.

torchvision's regnet_y_128gf (2.6 GB of weights) is the real case; it runs in the zoo sweep
(benchmarks/ZOO.md), not here: its export alone takes ~6 GB and minutes. Here protobuf's limit is
stood in for by a serializer that reports "too large" for every model, so that export takes the
large-model path on a small model of the same family (regnet_y_400mf), and every later step (real
sessions, real files, the zoo's own checks) reads the model from the two files."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cluster.workflow_runs import tiny_classifier
from cnnviz import model_file
from cnnviz.model_file import DATA_SUFFIX, checksum, write_model
from cnnviz.report.provenance import model_rows


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_model_written_with_external_data_reads_back_and_its_checksum_covers_both_files(
    tmp_path: Path,
) -> None:
    model = onnx.load(str(tiny_classifier(tmp_path / "given.onnx", seed=4)))
    folder = tmp_path / "models" / "tiny"
    path = folder / "model.onnx"

    written = write_model(path, model, external=True)
    data = path.with_name("model.onnx" + DATA_SUFFIX)
    assert written == [path, data]
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    large = {n for n, a in _weights(model).items() if a.nbytes >= model_file.EXTERNAL_FROM_BYTES}
    outside = onnx.load(str(path), load_external_data=False).graph.initializer
    assert {t.name for t in outside if t.data_location == onnx.TensorProto.EXTERNAL} == large
    assert data.stat().st_size >= sum(_weights(model)[n].nbytes for n in large) > 0
    read = onnx.load(str(path))
    for name, array in _weights(model).items():
        np.testing.assert_array_equal(_weights(read)[name], array)
    both = hashlib.sha256(path.read_bytes() + data.read_bytes()).hexdigest()
    assert checksum(path) == both

    # The report's provenance checks the card's checksum against both files.
    card = {"name": "tiny", "onnx": "model.onnx", "sha256": both}
    assert "matches the file" in dict(model_rows(tmp_path, "tiny", card))["sha256"]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert checksum(path) != both
    assert "DOES NOT match" in dict(model_rows(tmp_path, "tiny", card))["sha256"]

    # The same model written again fits one file: the stale data file goes.
    assert write_model(path, model) == [path]
    assert not data.exists()
    assert checksum(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.torch
def test_a_model_too_large_for_one_protobuf_is_exported_in_two_files_and_runs_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cnnviz.export
    import zoo

    def too_large(model: onnx.ModelProto) -> None:
        return None  # what model_file.serialize says of a model of 2 GiB or more

    monkeypatch.setattr(model_file, "serialize", too_large)
    monkeypatch.setattr(cnnviz.export, "serialize", too_large)
    row = zoo.check_model(
        "regnet_y_400mf", "torchscript", 32, tmp_path, threads=2, samples=200, per_op=False
    )

    folder = tmp_path / "model"
    graph, data = folder / "model.onnx", folder / "model.onnx.data"
    assert row["export"]["status"] == "ok", row["export"]
    assert data.stat().st_size > 4 * row["params_m"] * 1e6 * 0.99  # the float32 weights
    assert graph.stat().st_size < data.stat().st_size / 20
    card = json.loads((folder / "model.json").read_text())
    assert card["sha256"] == checksum(graph) != hashlib.sha256(graph.read_bytes()).hexdigest()
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    results = {**{f"gradcheck {p}": r for p, r in row["gradcheck"].items()}, **row["steps"]}
    assert set(row["steps"]) == {*zoo.STEPS, *zoo.per_image_methods(), "filters"}
    bad = {k: r.get("reason", "") for k, r in results.items() if r["status"] != "ok"}
    assert not bad, zoo.verdict(row)
