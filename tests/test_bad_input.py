"""Bad input through the real workflow: every kind the issue lists in one Snakemake run.

Each bad thing gives a named error, the rest of the run completes, and the report lists what
failed and why. The run has three `onnx:` models (a small CNN with dynamic input shapes, the same
CNN with an op the gradient engine has no rule for, and a file that is not ONNX at all), a layer
name and a class that do not exist, unreadable images, a decompression bomb, images in every
mode, and an HTML payload in a file name and in a class label.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from cluster.workflow_runs import dry_run_jobs, tiny_classifier
from cnnviz.methods.shard_maps import read_shard_maps
from PIL import Image
from test_workflow import run_snakemake

pytestmark = pytest.mark.slow

PAYLOAD_NAME = "<img src=x onerror=alert(1)>"
PAYLOAD_LABEL = "<script>alert('label')</script>"
LABELS = ["tabby", "dog", PAYLOAD_LABEL, "bird"]
MISSING_CLASS = "zebra"
MISSING_LAYER = "no_such_layer"
REAL_LAYER = "conv1"  # tiny_classifier's first conv, as the export names it
READABLE = 7  # of the 12 images: good, payload-named, 16-bit, CMYK, palette, RGBA, grey


def write_bad_images(folder: Path) -> dict[str, str]:
    """The images, and for each bad one the words its error must contain."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    Image.fromarray(rgb).save(folder / f"{PAYLOAD_NAME}.png")
    Image.fromarray((rng.random((40, 48)) * 65535).astype(np.uint16)).save(folder / "depth16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "print.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "alpha.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500)))
    (folder / "notes.png").write_text("this is a text file, not a picture\n")
    # 30000 x 30000 = 900 Mpx, a few hundred bytes on disk: PIL's bomb check refuses it.
    Image.new("1", (30000, 30000)).save(folder / "bomb.png")
    return {
        "truncated.png": "truncated",
        "empty.png": "empty",
        "corrupt.jpg": "",
        "notes.png": "",
        "bomb.png": "decompression bomb",
    }


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("bad")
    tiny_classifier(workdir / "dynamic.onnx", classes=4, dynamic_size=True)
    tiny_classifier(workdir / "norule.onnx", classes=4, extra_op="Softsign")
    (workdir / "broken.onnx").write_bytes(b"this is not an ONNX protobuf \x00\x01\x02" * 20)
    bad_images = write_bad_images(workdir / "photos")
    spec = {"preprocess": {"size": [32, 32], "resize": "stretch"}, "labels": LABELS}
    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    config.update(
        images={"samples": [], "paths": ["photos"]},
        models={
            "dynamic": {"source": "onnx:dynamic.onnx", **spec},
            "norule": {"source": "onnx:norule.onnx", **spec},
            "broken": {"source": "onnx:broken.onnx", **spec},
        },
        shard_size=4,
    )
    config["activations"]["layers"] = [REAL_LAYER, MISSING_LAYER]
    config["methods"].update(enabled=["gradcam", "saliency"], target=[0, MISSING_CLASS])
    config["filters"].update(count=2, steps=4, batch_size=2, layers="auto", modes=["seed"])
    config["atlas"].update(count=2, top_k=2)
    config["metrics"].update(methods=["gradcam"], steps=4)
    config["metrics"]["randomization"].update(cuts=2, methods=["gradcam"])
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, configfile)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    results = workdir / "results"
    return {
        "workdir": workdir,
        "results": results,
        "log": result.stdout + result.stderr,
        "bad_images": bad_images,
        "index": (results / "report" / "index.html").read_text(encoding="utf-8"),
        "pages": {
            str(p.relative_to(results / "report").with_suffix("")): p.read_text(encoding="utf-8")
            for p in (results / "report").rglob("*.html")
        },
    }


def text_of(page: str) -> str:
    """The page's visible text, entities decoded (a payload must come back as these chars)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_the_run_completes_and_summarizes_what_failed(bad_run) -> None:
    assert (bad_run["results"] / "report" / "index.html").is_file()
    assert "job(s) failed on bad input" in bad_run["log"]


def test_an_invalid_onnx_file_fails_its_export_and_skips_only_that_model(bad_run) -> None:
    card = json.loads((bad_run["results"] / "models" / "broken" / "model.json").read_text())
    error = card["job_failed"]["error"]
    assert "cannot read ONNX model" in error and "broken.onnx" in error
    index = text_of(bad_run["index"])
    assert "Failed jobs" in index and "cannot read ONNX model" in index
    # Its later jobs were skipped and say why; the other models ran every method.
    assert "skipped because of" in text_of(bad_run["pages"]["broken"])
    for model in ("dynamic", "norule"):
        shards = (bad_run["results"] / model / "predictions").glob("*.json")
        assert sum(len(json.loads(p.read_text())["images"]) for p in shards) == READABLE


def test_dynamic_input_shapes_are_fixed_from_the_preprocess_size(bad_run) -> None:
    card = json.loads((bad_run["results"] / "models" / "dynamic" / "model.json").read_text())
    assert card["preprocess"]["size"] == [32, 32]
    maps = [
        raw
        for folder in (bad_run["results"] / "dynamic" / "gradcam").iterdir()
        for row, raw in zip(*read_shard_maps(folder), strict=True)
        if row["target"] == 0
    ]
    assert len(maps) == READABLE
    assert all(m.shape == (32, 32) and np.isfinite(m).all() for m in maps)


def test_unreadable_images_and_the_bomb_are_named_and_skipped(bad_run) -> None:
    index = text_of(bad_run["index"])
    section = index[index.index("Failed images") :]
    for name, words in bad_run["bad_images"].items():
        assert name in section
        row = section[section.index(name) :][:400].lower()
        assert words in row, (name, row)
    staged = [p.name for p in (bad_run["results"] / "images").rglob("*.png")]
    assert len(staged) == READABLE


def test_every_image_mode_is_converted_and_classified(bad_run) -> None:
    results = bad_run["results"]
    predictions = {}
    for path in (results / "dynamic" / "predictions").glob("*.json"):
        predictions.update((e["id"], e["top"]) for e in json.loads(path.read_text())["images"])
    for manifest in (results / "images").glob("*.json"):
        for entry in json.loads(manifest.read_text())["images"]:
            mode = Image.open(results.parent / entry["path"]).mode
            assert mode == "RGB" and len(predictions[entry["id"]]) == 4, entry


def test_a_missing_layer_fails_activations_listing_the_real_layers(bad_run) -> None:
    marker = bad_run["results"] / "dynamic" / "activations" / "s000" / "job-failed.json"
    error = json.loads(marker.read_text())["error"]
    card = json.loads((bad_run["results"] / "models" / "dynamic" / "model.json").read_text())
    real = [layer["name"] for layer in card["layers"]]
    assert REAL_LAYER in real and MISSING_LAYER in error and all(name in error for name in real)
    assert "sparsity" in text_of(bad_run["pages"]["dynamic"])  # its plot was skipped, listed


def test_an_op_without_a_rule_fails_the_gradient_methods_by_name(bad_run) -> None:
    folder = bad_run["results"] / "norule" / "saliency" / "s000"
    failed = [f for f in json.loads((folder / "failed.json").read_text()) if "stage" not in f]
    no_rule = [f for f in failed if MISSING_CLASS not in f["error"]]
    assert no_rule and all("Softsign" in f["error"] for f in no_rule)
    assert "finite-differences" in no_rule[0]["error"]  # says what to do
    page = text_of(bad_run["pages"]["norule"])
    assert "Softsign" in page


def test_a_missing_class_is_named_per_image_and_the_other_target_runs(bad_run) -> None:
    folder = bad_run["results"] / "dynamic" / "gradcam" / "s000"
    failed = [f for f in json.loads((folder / "failed.json").read_text()) if "stage" not in f]
    assert len(failed) == 1 and MISSING_CLASS in failed[0]["error"]
    assert "tabby" in failed[0]["error"] or "Give a label" in failed[0]["error"]
    rows, _ = read_shard_maps(folder)
    assert [r["target"] for r in rows] == [0, 0]  # both images of the shard, class 0
    assert MISSING_CLASS in text_of(bad_run["pages"]["dynamic"])


def test_payloads_in_a_file_name_and_a_label_are_shown_as_text(bad_run) -> None:
    for name, page in bad_run["pages"].items():
        assert PAYLOAD_LABEL not in page, name
        assert PAYLOAD_NAME not in page, name
    shown = " ".join(text_of(page) for page in bad_run["pages"].values())
    assert PAYLOAD_NAME in shown  # escaped in the HTML, the same characters on screen
    assert PAYLOAD_LABEL in shown


def test_a_second_run_has_nothing_to_do(bad_run) -> None:
    result = run_snakemake(bad_run["workdir"], bad_run["workdir"] / "config.yaml", "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_replacing_the_broken_file_reruns_that_model_only(bad_run) -> None:
    workdir = bad_run["workdir"]
    tiny_classifier(workdir / "broken.onnx", classes=4)
    result = run_snakemake(workdir, workdir / "config.yaml", "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dry_run_jobs(result.stdout)
    models = {wildcards.get("model") for _, wildcards in jobs} - {None}
    assert ("export", {"model": "broken"}) in [(r, {"model": w.get("model")}) for r, w in jobs]
    assert models == {"broken"}, jobs
