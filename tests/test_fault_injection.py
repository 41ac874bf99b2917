"""Kill a run at random points, resume it as the README says, and get the same run.

One uninterrupted run (a tiny model, two sample photos and one truncated file, Grad-CAM and
saliency, two shards: the second holds only the truncated file) is the reference. Then, for
each seed, a fresh run is killed with SIGKILL (the scheduler and every job it runs) at a random
moment of its course, and resumed the way the README's "When input is bad" says: the same
command again, through the default profile, with no `--unlock` and nothing deleted by hand. The
resumed run must leave no temporary or half-written file, maps and pictures byte-identical to
the reference, and a report that lists exactly the failures of the reference (the truncated
image), nothing lost and nothing invented by the kill.
"""

from __future__ import annotations

import html
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cluster.workflow_runs import (
    artifact_files,
    assert_same_results,
    snakemake,
    snakemake_cmd,
    temp_leftovers,
    tiny_classifier,
    tiny_model_entry,
    write_config,
)

pytestmark = pytest.mark.slow
SEEDS = [11, 23, 37]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    model = tiny_classifier(folder / "tiny.onnx")
    photos = folder / "photos"
    photos.mkdir()
    (photos / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return write_config(
        folder / "config.yaml", {"tiny": tiny_model_entry(model)}, ["gradcam", "saliency"],
        shard_size=2, images={"samples": ["chelsea", "coffee"], "paths": [str(photos)]},
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, config: Path) -> dict:
    workdir = tmp_path_factory.mktemp("reference")
    started = time.monotonic()
    done = snakemake(workdir, config)
    assert done.returncode == 0, done.stdout[-4000:]
    return {"results": workdir / "results", "seconds": time.monotonic() - started}


def failures_listed(results: Path) -> str:
    """The report's Failed jobs / Failed images sections as text, the run's folder taken out."""
    page = (results / "report" / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    text = " ".join(text.replace(str(results.parent), "WORKDIR").split())
    starts = [i for i in (text.find("Failed jobs #"), text.find("Failed images #")) if i >= 0]
    if not starts:
        return ""
    start = min(starts)
    return text[start : text.find("Run & config #", start)]


def _alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_at(workdir: Path, config: Path, seconds: float) -> None:
    """Start the run and SIGKILL its whole process group after `seconds`."""
    with open(workdir / "killed.log", "w") as log:
        run = subprocess.Popen(
            snakemake_cmd(workdir, config), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        run.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    for _ in range(100):
        if not _alive(run.pid):
            return
        time.sleep(0.1)
    raise AssertionError("the killed run's processes still run")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_run_killed_at_a_random_point_resumes_to_the_same_run(
    tmp_path: Path, config: Path, reference: dict, seed: int
) -> None:
    workdir = tmp_path / f"seed{seed}"
    workdir.mkdir()
    # A point anywhere in the run's course (the first seconds are the DAG build).
    moment = random.Random(seed).uniform(0.1, 0.9) * reference["seconds"]
    kill_at(workdir, config, moment)
    killed_report = (workdir / "results" / "report" / "index.html").is_file()

    resumed = snakemake(workdir, config)  # what the README says: the same command again
    assert resumed.returncode == 0, f"killed at {moment:.1f} s\n" + resumed.stdout[-4000:]
    results = workdir / "results"
    assert temp_leftovers(results) == []
    assert_same_results(results, reference["results"])
    for name, path in artifact_files(reference["results"]).items():
        if path.suffix in (".npy", ".png"):
            assert (results / name).read_bytes() == path.read_bytes(), name
    assert failures_listed(results) == failures_listed(reference["results"])
    assert "truncated.png" in failures_listed(results)
    if not killed_report:  # the kill came before the report: the resumed run wrote it
        assert np.isfinite(resumed.stdout.count("report"))
