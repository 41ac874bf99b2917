"""Interruptions and failures: a killed run resumes cleanly, a failed job is retried, runs repeat.

Runs use config/profiles/default (rerun-incomplete, retries) and a traced `cnnviz` on PATH
(tests/cluster/workflow_runs.py) that injects the faults: a step that fails on its first attempt
only, or one whose atomic renames are slowed so that a kill lands while its temporary file
exists. One uninterrupted run of a tiny model (Grad-CAM and a seeded SmoothGrad) is the
reference for the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cluster.workflow_runs import (
    PROFILES,
    artifact_files,
    assert_same_results,
    snakemake,
    snakemake_cmd,
    temp_leftovers,
    tiny_classifier,
    tiny_model_entry,
    trace_records,
    traced_env,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    model = tiny_classifier(folder / "tiny.onnx")
    return write_config(
        folder / "config.yaml", {"tiny": tiny_model_entry(model)}, ["gradcam", "smoothgrad"],
        methods={"smoothgrad": {"samples": 4, "seed": 7}},
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, config: Path) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    done = snakemake(workdir, config)
    assert done.returncode == 0, done.stdout[-4000:]
    return workdir / "results"


@pytest.fixture(scope="module")
def retried(tmp_path_factory: pytest.TempPathFactory, config: Path):
    """A second full run of the same config whose predict job fails on its first attempt."""
    workdir = tmp_path_factory.mktemp("retried")
    done = snakemake(workdir, config, env=traced_env(workdir, fail_once="predict"))
    return workdir, done


def _group_alive(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a reaper do not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_a_killed_run_resumes_without_partial_files(
    tmp_path: Path, config: Path, reference: Path
) -> None:
    workdir = tmp_path / "killed"
    workdir.mkdir()
    results = workdir / "results"
    # predict pauses before its atomic rename: the kill lands while its temporary file exists.
    env = traced_env(workdir, slow_writes="predict:120")
    with open(workdir / "killed.log", "w") as log:
        run = subprocess.Popen(
            snakemake_cmd(workdir, config), cwd=workdir, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    predictions = results / "tiny" / "predictions"
    deadline = time.monotonic() + 180
    while run.poll() is None and time.monotonic() < deadline:
        if predictions.is_dir() and list(predictions.glob(".s000.json.*")):
            break
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the scheduler and every job it runs
    run.wait(timeout=30)
    for _ in range(50):
        if not _group_alive(run.pid):
            break
        time.sleep(0.1)
    assert not _group_alive(run.pid)
    partial = temp_leftovers(results)
    assert predictions / "s000.json" not in partial  # (the final name is never partial)
    assert any(p.parent == predictions for p in partial), (workdir / "killed.log").read_text()
    assert not (results / "report" / "index.html").exists()

    # A kill leaves Snakemake's lock behind: the workflow removes it, its run being gone
    # (cnnviz.resume), so the same command resumes without --unlock; the profile's
    # rerun-incomplete redoes the jobs that were running, and cnnviz removes the stale
    # temporary before it writes the file again.
    assert list((workdir / ".snakemake" / "locks").glob("*.lock"))
    resumed = snakemake(workdir, config)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "removed the lock left by a run that is gone" in resumed.stdout

    assert temp_leftovers(results) == []
    kept = {".snakemake_timestamp", ".cnnviz-files"}  # time stamps, folder records
    assert not [p for p in results.rglob(".*") if p.name not in kept]
    assert_same_results(results, reference)


def test_a_failing_job_is_retried_per_the_profile(retried) -> None:
    workdir, done = retried
    assert done.returncode == 0, done.stdout[-4000:]
    retries = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())["retries"]
    assert retries >= 1
    attempts = [r for r in trace_records(workdir) if r["step"] == "predict"]
    assert [(r.get("injected", False), r["rc"]) for r in attempts] == [(True, 75), (False, 0)]
    assert "Trying to restart job" in done.stdout
    assert "injected failure" in done.stdout  # show-failed-logs: the failed attempt's log


def test_two_runs_of_one_config_and_seed_are_identical(retried, reference: Path) -> None:
    """Raw maps equal to the bit and PNGs byte for byte, in two independent workdirs."""
    workdir, done = retried
    assert done.returncode == 0, done.stdout[-4000:]
    again = workdir / "results"
    assert_same_results(again, reference)
    maps = {name: p for name, p in artifact_files(reference).items() if name.endswith(".npy")}
    assert {name.split("/")[1] for name in maps} == {"gradcam", "smoothgrad"}
    for name, path in maps.items():
        assert np.array_equal(np.load(again / name), np.load(path)), name
