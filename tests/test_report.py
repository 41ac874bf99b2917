"""The HTML report over a hand-made results folder: links, escaping, discovery, plug-in sections."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from cnnviz.artifacts import write_json
from cnnviz.render import save_png
from cnnviz.report import SECTION_BUILDERS, Section, build_report
from cnnviz.report import builder as report_builder

EVIL = "<script>alert(1)</script>"


def _png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return save_png(path, rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    # staged images and a shard manifest with one failure
    for name in ("cat", "dog"):
        _png(root / "images" / f"{name}.png")
    write_json(
        root / "images" / "shards" / "s000.json",
        {
            "images": [
                {"id": n, "source": f"/in/{n}.jpg", "path": str(root / "images" / f"{n}.png"),
                 "width": 32, "height": 24}
                for n in ("cat", "dog")
            ],
            "failed": [{"source": f"/in/{EVIL}.jpg", "error": "not an image"}],
        },
    )  # fmt: skip
    # model card with a checksum that matches its file
    model_dir = root / "models" / "net"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"fake onnx bytes")
    write_json(
        model_dir / "model.json",
        {"name": "net", "source": "onnx:/x.onnx", "weights": "file", "onnx": "model.onnx",
         "sha256": hashlib.sha256(b"fake onnx bytes").hexdigest(), "opset": 17,
         "input": {"name": "input", "shape": ["batch", 3, 8, 8]},
         "output": {"name": "logits", "kind": "logits", "num_classes": 2},
         "labels": ["cat", EVIL], "layers": []},
    )  # fmt: skip
    write_json(
        root / "net" / "predictions" / "s000.json",
        {"model": "net",
         "images": [{"id": n, "top": [{"index": 1, "label": EVIL, "prob": 0.75},
                                       {"index": 0, "label": "cat", "prob": 0.25}]}
                    for n in ("cat", "dog")],
         "failed": []},
    )  # fmt: skip
    acts = root / "net" / "activations"
    layers = [{"name": "stem", "depth": 0, "shape": [4, 8, 8]},
              {"name": "head", "depth": 1, "shape": [8, 2, 2]}]  # fmt: skip
    write_json(
        acts / "s000.json",
        {"model": "net", "eps": 1e-6, "layers": layers,
         "images": [{"id": n, "layers": {"stem": {"blank_fraction": 0.0, "mean": 1, "max": 2},
                                         "head": {"blank_fraction": 0.5, "mean": 1, "max": 2}}}
                    for n in ("cat", "dog")],
         "failed": []},
    )  # fmt: skip
    for i, n in enumerate(("cat", "dog")):
        _png(acts / n / "stem.png", i)
        _png(acts / n / "head.png", i + 1)
        _png(acts / n / "head_ch3.png", i + 2)
    _png(acts / "sparsity.png", 9)
    _png(root / "net" / "gradcam" / "cat_c1.png", 10)  # a method no section knows by name
    write_json(root / "net" / "gradcam" / "cat_c1.json", {"method": "gradcam", "image": "cat",
                                                         "target": 1})  # fmt: skip
    return root


def _links(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#]+)"', html)


def test_every_png_is_referenced_and_links_resolve(results):
    index = build_report(results, results / "report", {"models": {"net": {}}}, ["net"], {})
    assert index == results / "report" / "index.html"
    page = (results / "report" / "net.html").read_text()
    pngs = [p for p in results.rglob("*.png") if "report" not in p.relative_to(results).parts]
    assert len(pngs) == 10
    for png in pngs:
        assert f'"../{png.relative_to(results).as_posix()}"' in page, png
    for html in (page, index.read_text()):
        for link in _links(html):
            assert not link.startswith(("/", "file:", "http")), link
            assert (results / "report" / unquote(link)).exists(), link
    assert 'href="net.html"' in index.read_text()
    # thumbnails for the predictions table, linked to the staged image
    assert (results / "report" / "thumbs" / "cat.png").exists()
    assert 'href="../images/cat.png"><img class="thumb" src="thumbs/cat.png"' in page


def test_labels_and_file_names_are_escaped(results):
    build_report(results, results / "report", {"note": EVIL}, ["net"], {"operator": EVIL})
    page = (results / "report" / "net.html").read_text()
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") >= 4  # label x2, failed file name, config, provenance
    assert "75.0%" in page


def test_sections_captions_and_provenance(results):
    build_report(results, results / "report", {}, ["net"], {"date": "2026-11-27", "duration_s": 3})
    page = (results / "report" / "net.html").read_text()
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == ["predictions", "activations", "m-gradcam", "failed", "provenance"]
    assert page.count("<figure>") == page.count("<figcaption>") == 8  # 6 grids, plot, gradcam
    assert "matches the file" in page and "onnxruntime" in page and "3.0 s" in page
    assert "<details>" in page and "<script" not in page  # collapsible without JavaScript
    assert "gradcam: image cat, class 1 (&lt;script&gt;" in page
    assert "not an image" in page and "<td>staging</td>" in page


def test_plug_in_section_and_cli_style_call(results, monkeypatch):
    def extra(ctx):
        return Section("extra", "Extra", "_gallery.html", {"figures": []}, note=f"for {ctx.name}")

    monkeypatch.setattr(report_builder, "SECTION_BUILDERS", [*SECTION_BUILDERS[:-1], extra])
    index = build_report(results, index=results / "out" / "main.html", models=["net", "ghost"])
    assert index.name == "main.html" and (results / "out" / "net.html").exists()
    page = (results / "out" / "net.html").read_text()
    assert '<section id="extra">' in page and "for net" in page
    ghost = (results / "out" / "ghost.html").read_text()  # no results at all: still a page
    assert "ghost" in ghost
    for link in _links(page):
        assert (results / "out" / unquote(link)).exists(), link
