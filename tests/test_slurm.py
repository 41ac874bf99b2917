"""The workflow on a real (one-node) SLURM cluster, through config/profiles/slurm.

The cluster is started on this machine for the module (tests/cluster/slurm_cluster.py): munged,
slurmctld and slurmd, with one fake GPU (gres on /dev/null). One SLURM run of a tiny model on two
photos and one method, with `gpu_jobs: true` and `device: auto`, is compared with a local run of
the same config: every job but the local rules ran under SLURM, jobs were packed into fewer
submissions, the jobs that asked for the GPU got it (CUDA_VISIBLE_DEVICES) one at a time, fell
back to the CPU, and produced the same files as the local run.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
from cluster import slurm_cluster
from cluster.workflow_runs import (
    assert_same_results,
    snakemake,
    temp_leftovers,
    tiny_classifier,
    tiny_model_entry,
    trace_records,
    traced_env,
    write_config,
)
from cnnviz.runtime import cuda_usable

pytestmark = pytest.mark.slow
GPU_STEPS = {"predict", "activations", "explain"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip(
        "snakemake_executor_plugin_slurm",
        reason="Snakemake's SLURM executor is not installed: "
        "pip install snakemake-executor-plugin-slurm==2.8.0",
    )
    reason = slurm_cluster.install_reason()
    if reason:
        pytest.skip(reason)
    try:
        running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.ClusterUnavailable as why:
        pytest.skip(str(why))
    try:
        yield running
    finally:
        slurm_cluster.stop(running)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two photos, one shard each; predict, activations and Grad-CAM ask for the GPU."""
    folder = tmp_path_factory.mktemp("config")
    model = tiny_classifier(folder / "tiny.onnx")
    return write_config(
        folder / "config.yaml", {"tiny": tiny_model_entry(model)}, ["gradcam"],
        gpu_jobs=True, shard_size=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, config: Path) -> Path:
    workdir = tmp_path_factory.mktemp("local")
    done = snakemake(workdir, config)
    assert done.returncode == 0, done.stdout[-4000:]
    return workdir / "results"


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory: pytest.TempPathFactory, cluster, config: Path):
    workdir = tmp_path_factory.mktemp("on_slurm")
    env = {**traced_env(workdir), "SLURM_CONF": cluster.env["SLURM_CONF"]}
    started = time.time()
    done = snakemake(
        workdir, config,
        # Status checks every few seconds, not the profile's 20 (a test waits for each one).
        "--slurm-init-seconds-before-status-checks", "2",
        # Both shards staged in one submission; then the four predict and activations jobs,
        # all ready at once, packed two per submission: two GPU submissions, with two GPU steps
        # each, compete for the one GPU. Explain (after predict) goes alone: packing it with
        # another shard's job could make two submissions wait on each other.
        "--groups", "stage_shard=images", "predict=ort", "activations=ort",
        "metrics_summary=finish",
        "--group-components", "images=16", "ort=2", "finish=100",
        profile="slurm", env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + cluster.log_tail()
    jobs = [job for job in cluster.jobs() if _time(job["SubmitTime"]) >= int(started) - 1]
    return workdir, done.stdout, jobs


def _time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_results_equal_a_local_run(slurm_run, local_run: Path) -> None:
    workdir, _, _ = slurm_run
    assert_same_results(workdir / "results", local_run)
    assert (workdir / "results" / "report" / "index.html").stat().st_size > 0
    assert not temp_leftovers(workdir / "results")


def test_every_job_ran_under_slurm_in_fewer_submissions(slurm_run) -> None:
    workdir, output, jobs = slurm_run
    records = trace_records(workdir)
    assert all(r["rc"] == 0 for r in records), records
    steps = [r["step"] for r in records]
    assert {"export", "stage", "predict", "activations", "sparsity", "report"} <= set(steps)
    # sample_image and sparsity are local rules: they run in the scheduler's process.
    local = sorted(r["step"] for r in records if r["slurm_job"] is None)
    assert local == ["sample-image", "sample-image", "sparsity"], local
    remote = [r for r in records if r["slurm_job"] is not None]
    by_job: dict[str, list[str]] = {}
    for r in remote:
        by_job.setdefault(r["slurm_job"], []).append(r["step"])
    # Grouping: ONNX Runtime jobs share submissions.
    assert any(len(s) >= 2 and set(s) <= GPU_STEPS for s in by_job.values()), by_job
    assert len(by_job) < len(remote)
    assert {job["JobId"] for job in jobs} == set(by_job)
    assert all(job["JobState"] == "COMPLETED" for job in jobs), jobs
    assert "group_ort" in output  # Snakemake's own account of the group submissions


def test_gpu_jobs_get_the_gpu_one_at_a_time_and_fall_back_to_cpu(slurm_run) -> None:
    workdir, _, jobs = slurm_run
    gpu_records = [r for r in trace_records(workdir) if r["step"] in GPU_STEPS]
    assert {r["step"] for r in gpu_records} == GPU_STEPS
    # SLURM gave each the (fake) GPU, and ONNX Runtime, finding no CUDA to load, used the CPU
    # (device: auto), with the same results as the local run (test_results_equal_a_local_run).
    assert {r["cuda_visible_devices"] for r in gpu_records} == {"0"}
    if not cuda_usable():
        assert {r["cuda_usable"] for r in gpu_records} == {False}
    others = [r for r in trace_records(workdir) if r["step"] not in GPU_STEPS]
    assert all(r["cuda_visible_devices"] is None for r in others)
    # Never two GPU steps at once, within a submission or across submissions.
    spans = sorted((r["start"], r["end"]) for r in gpu_records)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans
    # Two submissions asked for the GPU; the second was queued while the first held it.
    gpu_jobs = sorted(
        (job for job in jobs if "gpu" in job.get("TresPerJob", "")),
        key=lambda job: _time(job["StartTime"]),
    )
    assert len(gpu_jobs) >= 2, jobs
    for first, second in zip(gpu_jobs, gpu_jobs[1:], strict=False):
        assert _time(second["StartTime"]) >= _time(first["EndTime"])
    assert any(
        _time(second["SubmitTime"]) < _time(first["EndTime"])
        for first, second in zip(gpu_jobs, gpu_jobs[1:], strict=False)
    ), "no GPU submission had to wait for the GPU: serialization not exercised"
