"""The real workflow, end to end: snakemake on the default config reduced to 2 images.

Runs the real export of the pretrained EfficientNet-Lite0, real ONNX Runtime sessions and the
real report; then checks the files, the predictions and the report's links.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cnnviz.report.portable import crawl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_snakemake(workdir: Path, configfile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake",
        "-s", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        "--cores", "2",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("run")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["images"]["samples"] = ["chelsea", "coffee"]
    # Every step and method runs; the image-independent optimizations run short (their
    # quality is tested in test_filters.py / test_metrics.py, here only the wiring).
    config["filters"].update(count=4, steps=8, batch_size=4)
    config.setdefault("class_models", {}).update(steps=8, param_size=64)
    config["metrics"].update(steps=8)
    config["metrics"]["randomization"].update(cuts=2)
    config["metrics"].update(road={"fractions": [0.5]},
                             max_sensitivity={"samples": 1, "methods": ["gradcam", "saliency"]})
    methods = config.setdefault("methods", {})
    methods.update(smoothgrad={"samples": 4}, integrated_gradients={"steps": 8},
                   rise={"masks": 64, "batch_size": 32})
    # one picture per method and shard: the other image's maps are written, not drawn
    config["report"]["pictures"] = {"top": 1}
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, configfile)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir / config["output"]


def test_predictions_name_the_cat(default_run: Path) -> None:
    shards = sorted((default_run / "efficientnet-lite0" / "predictions").glob("*.json"))
    assert shards
    by_id = {}
    for shard in shards:
        for entry in json.loads(shard.read_text())["images"]:
            by_id[entry["id"]] = entry["top"]
    assert set(by_id) == {"chelsea", "coffee"}
    assert "cat" in by_id["chelsea"][0]["label"].lower()
    assert "espresso" in by_id["coffee"][0]["label"].lower()
    assert len(by_id["chelsea"]) == 5
    probs = [t["prob"] for t in by_id["chelsea"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_activation_grids_for_every_conv_layer(default_run: Path) -> None:
    card = json.loads((default_run / "models" / "efficientnet-lite0" / "model.json").read_text())
    layers = [row["name"] for row in card["layers"]]
    assert len(layers) > 40  # EfficientNet-Lite0 has ~49 conv layers
    for image_id in ("chelsea", "coffee"):
        activations = default_run / "efficientnet-lite0" / "activations"
        grids = list(activations.glob(f"*/{image_id}/*.png"))
        assert {p.stem for p in grids} >= set(layers)
    assert (default_run / "efficientnet-lite0" / "activations" / "sparsity.png").stat().st_size > 0


def test_every_rule_wrote_its_log(default_run: Path) -> None:
    logs = list((default_run / "logs").rglob("*.log"))
    # logs/{rule}/... or, for a once-per-run rule, logs/{rule}.log
    rules = {p.relative_to(default_run / "logs").parts[0].removesuffix(".log") for p in logs}
    assert {"export", "stage_shard", "predict", "activations", "report"} <= rules


def test_report_links_every_picture(default_run: Path) -> None:
    report = default_run / "report"
    found = crawl(report / "index.html")
    assert not found.broken, f"broken links, e.g. {found.broken[:3]}"
    pages = {p.name for p in found.pages}
    assert {"index.html", "efficientnet-lite0.html", "chelsea.html", "coffee.html"} <= pages
    linked = {p.resolve() for p in found.files}
    pictures = {p.resolve() for p in (default_run / "efficientnet-lite0").rglob("*.png")}
    missing = pictures - linked
    assert not missing, f"{len(missing)} PNGs not in the report, e.g. {sorted(missing)[:3]}"


def test_maps_per_shard_and_only_the_selected_pictures(default_run: Path) -> None:
    from cnnviz.methods.shard_maps import read_index, read_pictures

    config = yaml.safe_load((default_run.parent / "config.yaml").read_text())
    model = default_run / "efficientnet-lite0"
    for method in config["methods"]["enabled"]:
        for folder in (model / method).iterdir():
            index = read_index(folder)  # one array file + index per method and shard
            assert {r["image"] for r in index["rows"]} == {"chelsea", "coffee"}, method
            assert not list(folder.glob("*.png")), method
            drawn = read_pictures(model / "pictures" / method / folder.name)
            images = {r["image"] for r in index["rows"] if r["row"] in drawn}
            assert len(images) == 1, (method, drawn)  # report.pictures: {top: 1}
            pngs = list((model / "pictures" / method / folder.name).glob("*.png"))
            assert len(pngs) == len(drawn) >= 1, method
    # the undrawn image's page names its maps instead of linking missing pictures
    pages = (default_run / "report" / "efficientnet-lite0").glob("*.html")
    assert sum("without a picture" in page.read_text() for page in pages) == 1


def test_neuron_pictures_for_the_filter_layers(default_run: Path) -> None:
    """filters.neurons (default [lucent]): every filter layer's lucent job has a neuron job
    beside it, maximizing the centre unit, shown in the model page's neurons section."""
    from cnnviz.methods.objectives import FILTER_DEFAULT, NEURON_OBJECTIVE

    config = yaml.safe_load((default_run.parent / "config.yaml").read_text())
    model = default_run / "efficientnet-lite0"

    def grids(kind: str, mode: str) -> dict[str, dict]:
        pngs = (model / kind).glob(f"*.{mode}.png")
        return {p.name: json.loads(p.with_suffix(".json").read_text()) for p in pngs}

    filters = grids("filters", "lucent")
    assert config["filters"]["neurons"] == ["lucent"] and len(filters) == 4
    neurons = grids("neurons", "lucent")
    assert set(neurons) == set(filters) and not grids("neurons", "seed")
    assert {info["expression"] for info in filters.values()} == {FILTER_DEFAULT}
    assert {info["expression"] for info in neurons.values()} == {NEURON_OBJECTIVE}
    for name, info in neurons.items():
        assert info["filters"] == filters[name]["filters"] and info["steps"] == 8
    page = (default_run / "report" / "efficientnet-lite0.html").read_text()
    section = page.split('<section id="neurons"')[1].split("</section>")[0]
    assert all(f"neurons/{name}" in section for name in neurons)


def test_second_run_has_nothing_to_do(default_run: Path) -> None:
    workdir = default_run.parent
    result = run_snakemake(workdir, workdir / "config.yaml", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
