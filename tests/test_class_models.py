"""Class models (issue 18 item 3): the chosen classes (the run's most frequent top-1, then the
named ones, by label or index), the logit reached per step, several pictures per class kept
apart by the diversity term, and a real Snakemake run that puts them in the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from cnnviz.errors import ConfigError
from cnnviz.methods import class_models as cm
from PIL import Image
from test_filters import IMAGENET, small_net, write_model_dir

REPO = Path(__file__).resolve().parents[1]


def predictions(path: Path, top1: list[int]) -> Path:
    rows = [{"id": f"img{i}", "top": [{"index": k, "label": "abcd"[k], "prob": 0.5}]}
            for i, k in enumerate(top1)]
    path.write_text(json.dumps({"model": "tiny", "images": rows, "failed": []}))
    return path


def test_classes_top_predicted_then_named(tmp_path: Path) -> None:
    files = [predictions(tmp_path / "s0.json", [2, 2, 0]),
             predictions(tmp_path / "s1.json", [0, 3, 0])]
    assert cm.top_predicted(files, 2) == [(0, 3), (2, 2)]
    assert cm.class_index("B", ["a", "b"], 2) == 1 and cm.class_index(1, ["a", "b"], 2) == 1
    assert cm.class_index("1", ["a", "b"], 2) == 1
    with pytest.raises(ConfigError, match="labelled 'zebra'"):
        cm.class_index("zebra", ["a", "b"], 2)
    with pytest.raises(ConfigError, match="not in 0..1"):
        cm.class_index(5, ["a", "b"], 2)


@pytest.mark.parametrize("mode", ["lucent", "seed"])
def test_pictures_raise_their_class_logit(tmp_path: Path, mode: str) -> None:
    model_dir = write_model_dir(tmp_path / "tiny", small_net(), IMAGENET)
    files = [predictions(tmp_path / "p.json", [2, 2, 0])]
    out = tmp_path / "out"
    info = cm.class_models(model_dir, files, out, top=1, classes=["d", 2], pictures=3,
                           diversity=0.05, layer="auto", mode=mode, steps=24, seed=0,
                           param_size=16, device="cpu", threads=1)
    assert [c["index"] for c in info["classes"]] == [2, 3]  # top-1 first; 2 named again: once
    assert info["classes"][0]["why"].startswith("top-1 for 2 images")
    assert info["classes"][1]["why"] == "named in the config"
    assert info["objective"].startswith("class_logit(k) + 0.05 * diversity(")
    stack = np.load(out / "class_models.npy")
    assert stack.shape[:2] == (2, 3) and stack.min() >= 0 and stack.max() <= 1
    for row in info["classes"]:
        curves = np.array(row["logit_curves"])
        assert curves.shape == (3, 24)
        assert curves[:, -4:].mean() > curves[:, :4].mean(), curves  # the logit rises
        total = np.array(row["objective_curves"]).sum(0)  # what the batch ascends
        assert total[-4:].mean() > total[:4].mean(), total
        assert len(row["final_probability"]) == 3
    with Image.open(out / "class_models.png") as grid:  # 2 rows x 3 columns of tiles
        tile = min(stack.shape[2], 128)
        assert grid.size == (3 * tile + 4, 2 * tile + 2)
    assert (out / "class_models.curve.png").stat().st_size > 1000


def test_workflow_runs_class_models_into_the_report(tmp_path: Path) -> None:
    """snakemake on a tiny ONNX classifier, 3 images, everything but the report's core and the
    class models switched off: the job runs per model and the page shows the section."""
    onnx.save(small_net(), str(tmp_path / "tiny.onnx"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    config = {
        "output": "results", "device": "cpu", "threads": 1,
        "images": {"samples": [], "paths": [str(photos)]},
        "models": {"tiny": {"source": f"onnx:{tmp_path / 'tiny.onnx'}", "labels": list("abcd"),
                            "preprocess": {"size": [32, 32], "resize": "stretch", **IMAGENET}}},
        "methods": {"enabled": []},
        "filters": {"enabled": False}, "atlas": {"enabled": False},
        "metrics": {"enabled": False},
        "class_models": {"top": 1, "classes": ["b"], "pictures": 2, "steps": 6,
                         "param_size": 16},
    }  # fmt: skip
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(configfile), "--cores", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    folder = tmp_path / "results" / "tiny" / "class_models"
    info = json.loads((folder / "class_models.json").read_text())
    assert [c["label"] for c in info["classes"]][1:] == ["b"]
    assert np.array(info["classes"][0]["logit_curves"]).shape == (2, 6)
    assert (tmp_path / "results" / "logs" / "class_models" / "tiny.log").exists()
    page = (tmp_path / "results" / "report" / "tiny.html").read_text(encoding="utf-8")
    assert "What each class looks like to the model" in page
    assert "class_models.png" in page and "named in the config" in page
    assert page.count('id="class-models"') == 1  # the section's anchor, once
