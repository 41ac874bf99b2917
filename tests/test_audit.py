"""Scheduled audits: stamped runs side by side, the runs index, a baseline comparison.

The unit tests check the config diff, the map correlation and the snapshot round trip; the
workflow tests run the tiny ONNX model (tests/cluster/workflow_runs.py) three times in one folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cluster.workflow_runs import (
    job_counts,
    snakemake,
    tiny_classifier,
    tiny_model_entry,
    write_config,
)
from cnnviz import audit
from cnnviz.errors import ConfigError
from cnnviz.report.portable import crawl

# --------------------------------------------------------------------------- units


def test_config_diff_is_flat_and_ignores_the_run_keys() -> None:
    before = {"run_id": "a", "threads": 1, "methods": {"enabled": ["gradcam"], "target": "top1"},
              "models": {"m": {"source": "onnx:a.onnx"}}, "old": {"x": 1}}  # fmt: skip
    after = {"run_id": "b", "baseline": "a", "threads": 1,
             "methods": {"enabled": ["gradcam", "saliency"], "target": "top1"},
             "models": {"m": {"source": "onnx:b.onnx"}}, "new": 2}  # fmt: skip
    rows = {r["key"]: r for r in audit.config_diff(before, after)}
    assert set(rows) == {"methods.enabled", "models.m.source", "old.x", "new"}
    assert rows["models.m.source"] == {"key": "models.m.source", "before": "onnx:a.onnx",
                                       "after": "onnx:b.onnx", "change": "changed"}  # fmt: skip
    assert rows["old.x"]["change"] == "removed" and rows["new"]["change"] == "added"
    assert audit.config_diff(before, dict(before, run_id="z")) == []


def test_map_correlation() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32)).astype(np.float32)
    same = audit.map_correlation(a, 3 * a + 1)
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    flipped = audit.map_correlation(a, -a)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["spearman"] == pytest.approx(-1)
    other = audit.map_correlation(a, rng.random((32, 32)))
    assert abs(other["pearson"]) < 0.2
    constant = audit.map_correlation(a, np.zeros((32, 32)))
    assert constant == {"pearson": None, "spearman": None}
    with pytest.raises(ConfigError, match="differ"):
        audit.map_correlation(a, a[:16])


def test_downsample_and_encode_round_trip() -> None:
    big = np.zeros((224, 224), np.float32)
    big[:112, :112] = 1.0  # the top-left quarter
    small = audit.downsample(big)
    assert small.shape == (32, 32) and small[:16, :16].min() == 1 and small[16:, 16:].max() == 0
    assert audit.downsample(np.stack([big] * 3)).shape == (32, 32)  # [C, H, W]: channel mean
    np.testing.assert_array_equal(audit.decode_map(audit.encode_map(small)), small)


def test_prediction_change() -> None:
    then = [{"index": 3, "label": "cat", "prob": 0.6}, {"index": 1, "label": "dog", "prob": 0.3}]
    now = [{"index": 1, "label": "dog", "prob": 0.5}, {"index": 3, "label": "cat", "prob": 0.4}]
    row = audit.compare_predictions(then, now)
    assert row["changed"] and row["prob_delta"] == pytest.approx(-0.2)
    assert not audit.compare_predictions(then, then)["changed"]
    gone = audit.compare_predictions(then, [{"index": 7, "label": "x", "prob": 0.9}])
    assert gone["changed"] and gone["prob_delta"] is None


def test_baseline_resolution(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert audit.resolve_baseline(runs, "latest", "r1") == ""  # the first audit: none yet
    for name in ("r1", "r2"):
        (runs / name).mkdir(parents=True)
        (runs / name / "snapshot.json").write_text("{}")
    assert audit.available_runs(runs) == ["r1", "r2"]
    assert audit.resolve_baseline(runs, "latest", "r3") == "r2"
    assert audit.resolve_baseline(runs, "r1", "r3") == "r1"
    with pytest.raises(ConfigError, match=r"'nope'.*available runs: r1, r2"):
        audit.resolve_baseline(runs, "nope", "r3")
    with pytest.raises(ConfigError, match="run_id"):
        audit.resolve_baseline(runs, "r1", "")


def test_auto_run_id_is_fixed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(audit.ENV_RUN_ID, raising=False)
    stamp = audit.resolve_run_id("auto")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{4}", stamp)
    assert audit.resolve_run_id("auto") == stamp  # cluster jobs re-read the workflow: same id
    assert audit.resolve_run_id("") == "" and audit.resolve_run_id("nightly") == "nightly"


# --------------------------------------------------------------------------- the workflow


def _config(workdir: Path, model: Path, run_id: str, labels: str = "thing", **extra) -> Path:
    entry = tiny_model_entry(model)
    entry["labels"] = [f"{labels} {i}" for i in range(10)]
    return write_config(workdir / f"{run_id}.yaml", {"tiny": entry}, ["gradcam"],
                        run_id=run_id, **extra)  # fmt: skip


def _run(workdir: Path, configfile: Path, *args: str) -> str:
    done = snakemake(workdir, configfile, "--cores", "2", *args, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs r1 and r2 of one model; then r3 of a re-saved, perturbed model with baseline r1."""
    workdir = tmp_path_factory.mktemp("audits")
    first = tiny_classifier(workdir / "models" / "tiny.onnx", seed=0)
    _run(workdir, _config(workdir, first, "r1"))
    second = _run(workdir, _config(workdir, first, "r2"))
    # The per-image artifacts are shared: a second stamp recomputes nothing but its own files.
    assert set(job_counts(second)) == {"all", "report", "audit_snapshot", "audit_index"}
    changed = tiny_classifier(workdir / "models" / "tiny-v2.onnx", seed=1)
    _run(workdir, _config(workdir, changed, "r3", labels="other", baseline="r1"))
    return workdir / "results"


def test_stamped_runs_keep_their_reports_side_by_side(audits: Path) -> None:
    for run in ("r1", "r2", "r3"):
        report = audits / "runs" / run / "report"
        assert (report / "index.html").is_file() and (report / "tiny.html").is_file()
        snap = json.loads((audits / "runs" / run / "snapshot.json").read_text())
        assert set(snap["models"]["tiny"]["predictions"]) == {"chelsea", "coffee"}
        assert set(snap["models"]["tiny"]["maps"]["chelsea"]) == {"gradcam"}
    assert not (audits / "report").exists()  # stamped runs leave the unstamped report alone
    assert not crawl(audits / "runs" / "r3" / "report" / "index.html").broken
    index = (audits / "runs" / "index.html").read_text()
    for run in ("r1", "r2", "r3"):
        assert f'href="{run}/report/index.html"' in index
    assert index.index(">r3<") < index.index(">r1<")  # newest first


def test_baseline_shows_what_changed(audits: Path) -> None:
    data = json.loads((audits / "runs" / "r3" / "audit.json").read_text())
    assert data["baseline"] == "r1"
    keys = {row["key"] for row in data["config_changes"]}
    assert {"models.tiny.source", "models.tiny.labels"} <= keys
    model = data["models"]["tiny"]
    assert model["sha256"]["changed"]
    assert model["top1_changed"] == 2  # every label was renamed
    assert all(set(r["maps"]) == {"gradcam"} for r in model["images"])
    assert model["min_pearson"] is None or model["min_pearson"] < 0.99
    page = (audits / "runs" / "r3" / "report" / "tiny.html").read_text()
    assert "What changed since the last audit" in page and "models.tiny.source" in page
    assert model["sha256"]["before"] in page and model["sha256"]["after"] in page
    assert "What changed" not in (audits / "runs" / "r1" / "report" / "tiny.html").read_text()
    assert "1 checksum change, 2 top-1 changes" in (audits / "runs" / "index.html").read_text()


def test_unknown_baseline_names_the_runs(audits: Path) -> None:
    workdir = audits.parent
    model = workdir / "models" / "tiny.onnx"
    done = snakemake(workdir, _config(workdir, model, "r4", baseline="r0"), "-n", timeout=120)
    assert done.returncode != 0
    assert "'r0'" in done.stdout and "available runs: r1, r2, r3" in done.stdout
