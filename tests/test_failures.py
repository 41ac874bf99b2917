"""Job failures as artifacts (cnnviz.failures) and `cnnviz --record-failures <step>`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cnnviz import failures
from cnnviz.cli import main
from cnnviz.errors import ConfigError
from cnnviz.modelcard import load_card
from PIL import Image


def test_markers_for_folders_json_png_and_other_files(tmp_path: Path) -> None:
    outputs = [
        (tmp_path / "maps", True),
        (tmp_path / "top.json", False),
        (tmp_path / "plot.png", False),
        (tmp_path / "model.onnx", False),
    ]
    failures.record_failure("explain", ConfigError("no layer 'x'"), outputs)
    marker = json.loads((tmp_path / "maps" / "job-failed.json").read_text())
    assert marker["error"] == "no layer 'x'"
    assert json.loads((tmp_path / "top.json").read_text())["job_failed"]["step"] == "explain"
    with Image.open(tmp_path / "plot.png") as picture:
        assert picture.size[0] == 480 and len(set(picture.getdata())) > 1  # text drawn on grey
    assert (tmp_path / "model.onnx").read_bytes() == b""
    for path, _ in outputs:
        assert failures.failure_of(path)["kind"] == "ConfigError"
    found = failures.find_failures(tmp_path)
    assert len(found) == 4 and {r["step"] for r in found} == {"explain"}
    failures.clear_failure(outputs)
    assert failures.failure_of(tmp_path / "top.json") is None
    assert failures.failure_of(tmp_path / "maps") is not None  # a rerun recreates the folder


def test_a_failed_input_raises_upstream_failed_naming_the_root_cause(tmp_path: Path) -> None:
    card = tmp_path / "models" / "m" / "model.json"
    failures.record_failure("export", ConfigError("bad source"), [(card, False)])
    with pytest.raises(failures.UpstreamFailed, match="step export: bad source") as caught:
        load_card(card.parent)
    later = tmp_path / "m" / "predictions" / "s000.json"
    failures.record_failure("predict", caught.value, [(later, False)])
    record = failures.failure_of(later)
    assert failures.root_cause(record)["error"] == "bad source"
    assert failures.failed_jobs_summary(tmp_path) == ["export: bad source"]


def test_the_cli_records_a_failure_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    args = ["predict", "--card", str(tmp_path / "missing" / "model.json"),
            "--manifest", str(tmp_path / "m.json"), "--out", str(out)]  # fmt: skip
    assert main(args) == 2 and not out.exists()
    assert main(["--record-failures", *args]) == 0
    assert "run the export step" in json.loads(out.read_text())["job_failed"]["error"]
