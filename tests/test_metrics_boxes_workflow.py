"""The ranking metrics through the real workflow: object boxes from a CSV (`images.boxes`), ROAD,
pointing games, sparseness, complexity and max-sensitivity per method, the summary's ranking
and the model page's leaderboard; editing the boxes reruns the metrics, not the staging."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from cluster.workflow_runs import dry_run_jobs, snakemake, tiny_classifier, tiny_model_entry
from cluster.workflow_runs import write_config as write_run_config

pytestmark = pytest.mark.slow

# chelsea.png is 451 x 300: the cat's head; coffee.png gets no box (listed, skips the games).
BOXES = "file,x0,y0,x1,y1\nchelsea.png,140,20,330,230\n"


def config(workdir: Path) -> Path:
    entry = tiny_model_entry(tiny_classifier(workdir / "tiny.onnx", classes=4), classes=4)
    metrics = {"enabled": True, "steps": 4, "randomization": {"cuts": 1, "methods": ["gradcam"]},
               "class_sensitivity": {"classes": []}, "road": {"fractions": [0.3, 0.7]},
               "max_sensitivity": {"samples": 1, "methods": ["saliency"]}}  # fmt: skip
    return write_run_config(
        workdir / "config.yaml", {"tiny": entry}, ["gradcam", "saliency"],
        images={"samples": ["chelsea", "coffee"], "paths": [], "boxes": "boxes.csv"},
        metrics=metrics,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("boxes")
    (workdir / "boxes.csv").write_text(BOXES)
    configfile = config(workdir)
    done = snakemake(workdir, configfile)
    assert done.returncode == 0, done.stdout[-6000:]
    return {"workdir": workdir, "config": configfile, "results": workdir / "results"}


def test_boxes_reach_the_pointing_games_and_unboxed_images_are_listed(run) -> None:
    shard = json.loads((run["results"] / "tiny" / "metrics" / "s000" / "gradcam.json").read_text())
    by_image = {r["image"]: r for r in shard["images"]}
    assert shard["unboxed"] == ["coffee"] and shard["failed"] == []
    assert by_image["chelsea"]["pointing_game"] in (0, 1)
    assert 0 <= by_image["chelsea"]["energy_pointing_game"] <= 1
    assert "pointing_game" not in by_image["coffee"]
    for record in shard["images"]:
        assert len(record["road"]["morf"]) == 2 and 0 <= record["sparseness"] <= 1
    saliency = json.loads((run["results"] / "tiny" / "metrics" / "s000" / "saliency.json")
                          .read_text())  # fmt: skip
    assert all(r["max_sensitivity"] > 0 for r in saliency["images"])
    assert "max_sensitivity" not in by_image["chelsea"]  # gradcam is not listed


def test_the_summary_ranks_the_methods_and_the_page_shows_the_leaderboard(run) -> None:
    summary = json.loads((run["results"] / "tiny" / "metrics" / "summary.json").read_text())
    assert summary["images_without_box"] == ["coffee"]
    ranked = {r["metric"]: r for r in summary["ranking"]}
    assert {r["method"] for r in ranked["road_gap"]["order"]} == {"gradcam", "saliency", "random"}
    assert {r["method"] for r in ranked["pointing_game"]["order"]} == {
        "gradcam", "saliency", "random"}  # fmt: skip
    assert [r["method"] for r in ranked["max_sensitivity"]["order"]] == ["saliency"]
    page = (run["results"] / "report" / "tiny.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert "Methods ranked by each metric" in text and "Reading guide" in text
    assert "energy_pointing_game" in text and "road_gap" in text


def test_editing_the_boxes_reruns_the_metrics_not_the_staging(run) -> None:
    (run["workdir"] / "boxes.csv").write_text(BOXES + "coffee.png,100,100,300,400\n")
    done = snakemake(run["workdir"], run["config"], "-n")
    assert done.returncode == 0, done.stdout[-4000:]
    rules = {rule for rule, _ in dry_run_jobs(done.stdout)}
    assert {"metrics", "metrics_reference", "metrics_summary"} <= rules
    assert not rules & {"stage_shard", "explain", "predict"}
