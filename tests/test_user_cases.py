"""What users do, through the real workflow: every case of issue 15 in one Snakemake run.

Beyond tests/test_bad_input.py's list: true classes from `images.labels` (with a UTF-8 BOM), a
model with two inputs, an int8 model (QLinearConv, from onnxruntime's quantize_static), an
`onnx:` path that is a folder, a model with external weights, a class label two classes share,
a missing image path, dangling symlinks (listed and inside a folder), a glob that matches nothing,
an animated GIF, a HEIC file, and an image large enough to be resized for display. After the run:
a half-emptied output folder (what a failed cleanup leaves), deleted outputs, rewritten external
weights and a replaced model file must each be noticed and redone.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from cluster.workflow_runs import dry_run_jobs, snakemake, tiny_classifier
from onnx import TensorProto, helper
from onnx_build import finish_model
from PIL import Image

pytestmark = pytest.mark.slow

LABELS = ["tabby", "crane", "dog", "crane"]  # "crane" names classes 1 and 3 (ImageNet: 134, 517)
GOOD = ["good", "other", "third"]
BIG_SIDE = 3000  # > the staging limit: resized for display
SIZE = 32


def two_input_model(path: Path) -> Path:
    """image [1, 3, 32, 32] and aux [1, 4] -> logits [1, 4]: a second input cnnviz cannot feed."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Add", ["f", "aux"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE]),
        helper.make_tensor_value_info("aux", TensorProto.FLOAT, [1, 4]),
    ]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    onnx.save_model(finish_model(nodes, {"w": w}, inputs, [logits]), str(path))
    return path


def int8_model(path: Path, source: Path) -> Path:
    """`source` quantized by onnxruntime (QOperator format: QLinearConv, QGemm, ...)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            shape = (1, 3, SIZE, SIZE)
            self.batches = iter(
                [{"image": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(source), str(path), Calibration(), quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return path


def external_data_model(path: Path) -> Path:
    """tiny_classifier with its weights in `<stem>.weights` beside it."""
    tiny_classifier(path, seed=5, classes=4)
    model = onnx.load(str(path))
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=f"{path.stem}.weights", size_threshold=0,
    )  # fmt: skip
    return path


def write_images(workdir: Path) -> None:
    photos = workdir / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name in GOOD:
        pixels = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"{name}.png")
    frames = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(photos / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    (photos / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(200))
    os.symlink(workdir / "nowhere.png", photos / "gone.png")  # dangling, inside the folder
    os.symlink(workdir / "nowhere-either.png", workdir / "dangling.png")  # dangling, listed
    big = workdir / "big"
    big.mkdir()
    gradient = np.linspace(0, 255, BIG_SIDE, dtype=np.float32)
    picture = np.stack([np.add.outer(gradient[: BIG_SIDE * 2 // 3], gradient) / 2] * 3, axis=-1)
    Image.fromarray(picture.astype(np.uint8)).save(big / "large.jpg", quality=80)
    # True classes, with the BOM a spreadsheet program writes first.
    truth = ["tabby", "dog", "tabby"]
    rows = [f"{name}.png,{label}" for name, label in zip(GOOD, truth, strict=True)]
    (workdir / "truth.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")


def config_for(workdir: Path) -> dict:
    spec = {"preprocess": {"size": [SIZE, SIZE], "resize": "stretch"}, "labels": LABELS}
    (workdir / "folder.onnx").mkdir()
    return {
        "output": "results",
        "threads": 1,
        "shard_size": 6,  # two shards: s001 holds the large image
        "batch_size": 6,
        "images": {
            "samples": [],
            "paths": ["photos", "big/large.jpg", "missing.png", "dangling.png", "nomatch/*.jpg"],
            "labels": "truth.csv",
        },
        "models": {
            "tiny": {"source": "onnx:tiny.onnx", **spec},
            "twoin": {"source": "onnx:twoin.onnx", **spec},
            "int8": {"source": "onnx:int8.onnx", **spec},
            "folder": {"source": "onnx:folder.onnx", **spec},
        },
        "methods": {"enabled": ["gradcam", "saliency"], "target": ["crane", 0]},
        "activations": {"layers": "all"},
        "filters": {"enabled": False},
        "atlas": {"enabled": False},
        "metrics": {"enabled": False},
    }


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("users")
    external_data_model(workdir / "tiny.onnx")
    two_input_model(workdir / "twoin.onnx")
    int8_model(workdir / "int8.onnx", tiny_classifier(workdir / "float.onnx", classes=4))
    write_images(workdir)
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config_for(workdir), sort_keys=False))
    started = time.perf_counter()
    done = snakemake(workdir, configfile)
    assert done.returncode == 0, done.stdout[-6000:]
    results = workdir / "results"
    return {
        "workdir": workdir,
        "config": configfile,
        "results": results,
        "log": done.stdout,
        "seconds": time.perf_counter() - started,
        "index": (results / "report" / "index.html").read_text(encoding="utf-8"),
        "pages": {
            p.stem: p.read_text(encoding="utf-8") for p in (results / "report").glob("*.html")
        },
    }


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def manifests(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "images").glob("s*.json"))]


def staged(results: Path) -> dict[str, dict]:
    return {e["source"]: e for m in manifests(results) for e in m["images"]}


def failed_images(results: Path) -> dict[str, str]:
    return {f["source"]: f["error"] for m in manifests(results) for f in m["failed"]}


def plan(run: dict, *args: str) -> list[tuple[str, dict[str, str]]]:
    done = snakemake(run["workdir"], run["config"], "-n", *args)
    assert done.returncode == 0, done.stdout[-4000:]
    return dry_run_jobs(done.stdout)


def contents(folder: Path) -> dict[str, object]:
    """A folder's files: bytes, and JSON without the times it records."""

    def untimed(value: object) -> object:
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if not k.startswith("time")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    return {
        p.name: untimed(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def planned_jobs(run: dict) -> set[tuple[str, str]]:
    """(rule, model) of each job a dry run lists now."""
    return {(rule, w.get("model", "")) for rule, w in plan(run)}


def mem_mb_of(log: str, rule: str) -> dict[str, int]:
    """{shard: the largest mem_mb} of a rule's jobs in a dry run's log."""
    found: dict[str, int] = {}
    current, shard = None, None
    for line in log.splitlines():
        header = re.match(r"\s*(?:local)?(?:rule|checkpoint) (\w+):", line)
        if header:
            current, shard = header.group(1), None
        elif current == rule and (match := re.search(r"shard=(s\d+)", line)):
            shard = match.group(1)
        elif current == rule and shard and (match := re.search(r"mem_mb=(\d+)", line)):
            found[shard] = max(found.get(shard, 0), int(match.group(1)))
    return found


# --------------------------------------------------------------------------- the run


def test_the_run_finishes_with_a_report(user_run) -> None:
    assert "job(s) failed on bad input" in user_run["log"]
    assert {"index", "tiny", "twoin", "int8", "folder"} <= set(user_run["pages"])
    assert user_run["seconds"] < 300


def test_1_true_classes_from_a_labels_file_reach_the_staged_records(user_run) -> None:
    entries = staged(user_run["results"])
    assert entries["photos/good.png"]["label"] == "tabby"  # the first row: no BOM in its name
    assert entries["photos/other.png"]["label"] == "dog"
    assert "label" not in entries["photos/animated.gif"]


def test_2_a_model_with_two_inputs_fails_its_export_by_name(user_run) -> None:
    card = json.loads((user_run["results"] / "models" / "twoin" / "model.json").read_text())
    error = card["job_failed"]["error"]
    assert "2 inputs" in error and "'aux'" in error
    index = text_of(user_run["index"])
    assert "Failed jobs" in index and "'aux'" in index
    # the other models ran
    assert list((user_run["results"] / "tiny" / "saliency").glob("s*/*"))


def test_3_an_int8_model_gets_its_conv_layers_and_names_its_integer_ops(user_run) -> None:
    results = user_run["results"]
    card = json.loads((results / "models" / "int8" / "model.json").read_text())
    assert [row["name"] for row in card["layers"]] == ["conv1", "conv2"]
    assert "QLinearConv" in card["verification"]["note"]
    grids = {p.name for p in (results / "int8" / "activations").glob("s000/*/*.png")}
    assert {"conv1.png", "conv2.png"} <= grids
    assert not list((results / "int8" / "activations").rglob("job-failed.json"))
    # The gradient methods fail as data (their own record), not as a crashed job.
    failed = json.loads((results / "int8" / "saliency" / "s000" / "failed.json").read_text())
    assert any("crane" not in f["error"] and "stage" not in f for f in failed), failed


def test_6_missing_paths_dangling_links_and_empty_patterns_are_failed_images(user_run) -> None:
    failed = failed_images(user_run["results"])
    assert "file not found" in failed["missing.png"]
    assert "symbolic link" in failed["dangling.png"]
    assert "symbolic link" in failed["photos/gone.png"]
    assert "matches no file" in failed["nomatch/*.jpg"]
    section = text_of(user_run["index"])
    section = section[section.index("Failed images") :]
    for source in ("missing.png", "dangling.png", "gone.png", "nomatch/*.jpg"):
        assert source in section, source


def test_9_a_label_two_classes_share_is_refused_naming_both(user_run) -> None:
    folder = user_run["results"] / "tiny" / "gradcam" / "s000"
    errors = [f["error"] for f in json.loads((folder / "failed.json").read_text())]
    crane = [e for e in errors if "crane" in e]
    assert crane and "1, 3" in crane[0] and "index" in crane[0]
    assert list(folder.glob("*")) and "crane" in text_of(user_run["pages"]["tiny"])


def test_10_large_images_are_reduced_for_display_and_ask_for_more_memory(user_run) -> None:
    from cnnviz.plan import STAGE_MAX_SIDE

    entry = staged(user_run["results"])["big/large.jpg"]
    assert max(entry["width"], entry["height"]) == STAGE_MAX_SIDE
    assert entry["original_size"] == [BIG_SIDE, BIG_SIDE * 2 // 3]
    done = snakemake(user_run["workdir"], user_run["config"], "-n", "--forceall")
    asked = mem_mb_of(done.stdout, "predict")
    big_shard = next(s for s, m in enumerate(manifests(user_run["results"]))
                     if any(e["source"] == "big/large.jpg" for e in m["images"]))  # fmt: skip
    big = asked.pop(f"s{big_shard:03d}")
    assert asked and all(big > small for small in asked.values()), (big, asked)


def test_minor_cases(user_run) -> None:
    entries = staged(user_run["results"])
    assert entries["photos/animated.gif"]["frames"] == 3
    assert "first of 3 frames" in entries["photos/animated.gif"]["note"]
    assert "pillow-heif" in failed_images(user_run["results"])["photos/phone.heic"]
    card = json.loads((user_run["results"] / "models" / "folder" / "model.json").read_text())
    assert "is a folder" in card["job_failed"]["error"]


# --------------------------------------------------------------------------- after the run
# These change the run's folder: each leaves it complete again for the next.


def test_nothing_to_do_after_the_run(user_run) -> None:
    assert plan(user_run) == []


def test_4_5_a_half_emptied_folder_and_deleted_outputs_are_redone(user_run) -> None:
    results = user_run["results"]
    maps = results / "tiny" / "saliency" / "s000"
    before = contents(maps)
    # What a cleanup that fails half-way leaves: some of the old files, under the old time.
    removed = sorted(name for name in before if not name.startswith("."))[:2]
    for name in removed:
        (maps / name).unlink()
    # Deleted outputs: an export's files and one shard's predictions.
    for name in ("model.onnx", "model.json"):
        (results / "models" / "tiny" / name).unlink()
    (results / "int8" / "predictions" / "s001.json").unlink()

    jobs = planned_jobs(user_run)
    assert ("explain", "tiny") in jobs or ("explain_cam_family", "tiny") in jobs
    assert ("export", "tiny") in jobs and ("predict", "int8") in jobs and ("report", "") in jobs
    done = snakemake(user_run["workdir"], user_run["config"])
    assert done.returncode == 0, done.stdout[-4000:]
    assert contents(maps) == before  # the same maps, byte for byte
    assert (results / "int8" / "predictions" / "s001.json").is_file()
    assert plan(user_run) == []


def test_7_rewritten_weights_or_a_replaced_model_file_re_export(user_run) -> None:
    workdir = user_run["workdir"]
    weights = workdir / "tiny.weights"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[64] ^= 0x55  # one weight changes; the time stamp is set back to before the export
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**12))
    assert ("export", "tiny") in planned_jobs(user_run)
    weights.write_bytes(bytes(data[:64]) + bytes([data[64] ^ 0x55]) + bytes(data[65:]))
    assert ("export", "tiny") not in planned_jobs(user_run)  # the same bytes again: nothing

    model = workdir / "int8.onnx"
    old = model.stat()
    replacement = workdir / "replacement.onnx"
    tiny_classifier(replacement, seed=9, classes=4)
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns - 10**12))
    os.replace(replacement, model)  # an older file moved over the model
    assert ("export", "int8") in planned_jobs(user_run)
