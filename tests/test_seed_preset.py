"""config/seed-vgg16.yaml, the tutorial's own setting, runs end to end (a real Snakemake run of
a real VGG16 export, with seeded random weights: no download) and every picture it promises
has the structure the tutorial shows: five layers' activation grids, the first filters of each
block by plain ascent, deconvnet projections with switches (so they differ per image),
Grad-CAM for class 386 (African elephant) and the atlas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_workflow import run_snakemake

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["features.0", "features.5", "features.10", "features.17", "features.24"]
CHANNELS = {"features.0": 64, "features.5": 128, "features.10": 256, "features.17": 512,
            "features.24": 512}  # fmt: skip
FILTERS = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("seed")
    config = yaml.safe_load((REPO / "config" / "seed-vgg16.yaml").read_text())
    assert config["models"]["vgg16"]["weights"] == "pretrained"  # as shipped
    config["models"]["vgg16"]["weights"] = "random"  # no weights file on a test machine
    config["images"]["samples"] = ["chelsea", "astronaut"]
    config["filters"].update(count=FILTERS, steps=3, batch_size=FILTERS)  # the wiring only
    config.setdefault("class_models", {}).update(steps=3, top=1)
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, configfile)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir / config["output"]


def test_the_preset_is_the_tutorials_setting() -> None:
    config = yaml.safe_load((REPO / "config" / "seed-vgg16.yaml").read_text())
    assert config["models"]["vgg16"]["source"] == "torchvision:vgg16"
    assert config["filters"]["count"] == 64 and config["filters"]["modes"] == ["seed"]
    for section in (config["activations"], config["filters"], config["atlas"],
                    config["methods"]["projections"]):
        assert section["layers"] == LAYERS
    assert config["methods"]["target"] == [386]


def test_activation_grids_of_the_five_block_convs(seed_run: Path) -> None:
    card = json.loads((seed_run / "models" / "vgg16" / "model.json").read_text())
    assert [r["name"] for r in card["layers"]][:1] == ["features.0"]
    assert card["labels"][386].lower().startswith("african elephant")
    for image in ("chelsea", "astronaut"):
        grids = {p.stem: p for p in (seed_run / "vgg16" / "activations").glob(f"*/{image}/*.png")}
        assert set(grids) == set(LAYERS)
    stats = json.loads(next((seed_run / "vgg16" / "activations").glob("*/*.json")).read_text())
    shapes = {row["name"]: row["shape"] for row in stats["layers"]}
    assert {layer: shape[0] for layer, shape in shapes.items()} == CHANNELS
    assert shapes["features.0"][1:] == [224, 224] and shapes["features.24"][1:] == [14, 14]


def test_gradcam_explains_class_386_for_every_image(seed_run: Path) -> None:
    from cnnviz.methods.shard_maps import read_shard_maps

    for folder in (seed_run / "vgg16" / "gradcam").iterdir():
        rows, maps = read_shard_maps(folder)
        assert {r["target"] for r in rows} == {386}
        assert {r["image"] for r in rows} == {"chelsea", "astronaut"}
        assert maps.shape[1:] == (224, 224) and np.isfinite(maps).all()
        assert all(r["layer"] for r in rows)


def test_projections_use_the_switches_and_differ_per_image(seed_run: Path) -> None:
    from cnnviz.methods.shard_maps import read_array, read_index

    folder = next((seed_run / "vgg16" / "projections").iterdir())
    index = read_index(folder)
    rows = index["rows"]
    assert {r["layer"] for r in rows} == set(LAYERS)
    assert all(r["policy"] == "deconvnet" for r in rows)
    reasons = {r["layer"]: r["policy_reason"] for r in rows}
    assert "the same picture for every image" in reasons["features.0"]  # no pooling below
    assert all(reasons[layer] == "set in the config" for layer in LAYERS[1:])
    array = np.asarray(read_array(folder, index, "projections"))
    assert array.shape[1:3] == (4, 3)  # top_k 4 channels per (image, layer), RGB projections
    by = {(r["image"], r["layer"]): array[r["row"]] for r in rows}
    deep = "features.24"
    assert np.abs(by[("chelsea", deep)] - by[("astronaut", deep)]).max() > 0


def test_filters_and_the_atlas_for_every_layer(seed_run: Path) -> None:
    filters = seed_run / "vgg16" / "filters"
    for layer in LAYERS:
        info = json.loads((filters / f"{layer}.seed.json").read_text())
        assert info["filters"] == list(range(FILTERS))
        picture = Image.open(filters / f"{layer}.seed.png")
        assert min(picture.size) > 0
        atlas = json.loads((seed_run / "vgg16" / "atlas" / "layers" / f"{layer}.json").read_text())
        assert atlas["policy"] == "deconvnet" and atlas["channels"]
        assert (seed_run / "vgg16" / "atlas" / "layers" / f"{layer}.png").stat().st_size > 0
    index = (seed_run / "report" / "index.html").read_text()
    assert "vgg16" in index
