"""What a config edit reruns: exactly the jobs whose results it changes, and nothing else.

One real run (EfficientNet-Lite0 and a tiny ONNX model, one photo, saliency and a small
SmoothGrad) is shared by the module. Each test writes an edited copy of its config and asks a dry
run what Snakemake would redo (the rules' params are rerun triggers: each job's params hold only
the settings that change its output). The last test really reruns one edit in a copy of the run.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from cluster.workflow_runs import (
    dry_run_jobs,
    job_counts,
    planned,
    snakemake,
    tiny_classifier,
    tiny_model_entry,
    write_config,
)

pytestmark = pytest.mark.slow
EFFNET = "efficientnet-lite0"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workdir of a finished run; its config is workdir/config.yaml."""
    workdir = tmp_path_factory.mktemp("reruns")
    tiny = tiny_classifier(workdir / "tiny.onnx")
    config = write_config(
        workdir / "config.yaml",
        {EFFNET: {"source": EFFNET}, "tiny": tiny_model_entry(tiny)},
        ["saliency", "smoothgrad"],
        images={"samples": ["chelsea"]},
        methods={"smoothgrad": {"samples": 2}},
    )
    done = snakemake(workdir, config)
    assert done.returncode == 0, done.stdout[-4000:]
    return workdir


def edited(workdir: Path, name: str, change: Callable[[dict], None]) -> Path:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config = copy.deepcopy(config)
    change(config)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_nothing_to_do_after_the_run(run: Path) -> None:
    assert planned(run, run / "config.yaml") == set()


def test_a_methods_option_reruns_that_method_and_the_report(run: Path) -> None:
    config = edited(run, "samples", lambda c: c["methods"]["smoothgrad"].update(samples=3))
    assert planned(run, config) == {
        ("explain", EFFNET, "smoothgrad", "s000"),
        ("explain", "tiny", "smoothgrad", "s000"),
        ("render", EFFNET, "s000"),  # one render job per model and shard, every method
        ("render", "tiny", "s000"),
        ("report",),
        ("all",),
    }


def test_blank_eps_reruns_activations_sparsity_and_the_report(run: Path) -> None:
    config = edited(run, "eps", lambda c: c.setdefault("activations", {}).update(blank_eps=0.01))
    assert planned(run, config) == {
        ("activations", EFFNET, "s000"),
        ("activations", "tiny", "s000"),
        ("sparsity", EFFNET),
        ("sparsity", "tiny"),
        ("report",),
        ("all",),
    }


def test_one_models_config_reruns_that_models_jobs_only(run: Path) -> None:
    config = edited(run, "labels", lambda c: c["models"]["tiny"]["labels"].__setitem__(0, "cat"))
    assert planned(run, config) == {
        ("export", "tiny"),
        ("predict", "tiny", "s000"),
        ("activations", "tiny", "s000"),
        ("sparsity", "tiny"),
        ("explain", "tiny", "saliency", "s000"),
        ("explain", "tiny", "smoothgrad", "s000"),
        ("render", "tiny", "s000"),
        ("report",),
        ("all",),
    }


def test_the_report_title_reruns_the_report_alone(run: Path) -> None:
    config = edited(run, "title", lambda c: c.update(report={"title": "Another title"}))
    assert planned(run, config) == {("report",), ("all",)}


def test_a_real_rerun_redoes_only_the_planned_jobs(run: Path, tmp_path: Path) -> None:
    """In a copy of the run: the edit reruns the SmoothGrad jobs; saliency's files stay put."""
    workdir = tmp_path / "copy"
    shutil.copytree(run, workdir, symlinks=True)  # copy2: mtimes and .snakemake metadata kept
    config = edited(workdir, "samples", lambda c: c["methods"]["smoothgrad"].update(samples=3))
    results = workdir / "results"
    saliency = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in results.glob("*/saliency/**/*.*")
    }
    smooth = {p: np.load(p) for p in results.glob("*/smoothgrad/**/*.npy")}
    assert saliency and len(smooth) == 2

    done = snakemake(workdir, config)
    assert done.returncode == 0, done.stdout[-4000:]
    assert job_counts(done.stdout) == {"explain": 2, "render": 2, "report": 1, "all": 1}
    assert {(r, w.get("method")) for r, w in dry_run_jobs(done.stdout) if r == "explain"} == {
        ("explain", "smoothgrad")
    }
    for path, (mtime, data) in saliency.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    for path, before in smooth.items():
        assert not np.array_equal(np.load(path), before), f"{path} did not change"
    assert planned(workdir, config) == set()
