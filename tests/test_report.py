"""The HTML report over synthetic results in the real layout: pages, links, scale, portability."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest
from cnnviz.artifacts import read_json, write_json
from cnnviz.report import SECTION_BUILDERS, Section, build_report, crawl, report_zip
from cnnviz.report import builder as report_builder
from report_fixture import make_results

EVIL = "<script>alert(1)</script>"
CONFIG = {"report": {"title": "audit run"}, "models": {"tinynet": {"source": "onnx:x"}}}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 images, 11 methods + projections, 6 layers, filters, atlas, metrics, benchmarks."""
    return make_results(tmp_path_factory.mktemp("run") / "results")


@pytest.fixture(scope="module")
def report(results: Path) -> Path:
    return build_report(results, config=CONFIG, provenance={"date": "2026-11-27 22:00"})


def _ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', html)


def test_pages_and_every_link_resolves(results: Path, report: Path) -> None:
    assert report == results / "report" / "index.html"
    found = crawl(report)
    names = sorted(p.relative_to(report.parent).as_posix() for p in found.pages)
    assert names == ["index.html", "tinynet.html", "tinynet/atlas/block5.conv.html",
                     "tinynet/chelsea.html", "tinynet/coffee.html", "tinynet/img0002.html",
                     "tinynet/img0003.html"]  # fmt: skip
    assert not found.broken and not found.external
    # nothing the steps drew is left out: every PNG of the model is reachable from the index
    pictures = set((results / "tinynet").rglob("*.png"))
    assert pictures and not pictures - found.files
    assert (results / "report" / "thumbs").is_dir()


def test_sections_in_order_with_anchors(report: Path) -> None:
    index = report.read_text()
    assert _ids(index) == ["models", "failed", "run"]
    model = (report.parent / "tinynet.html").read_text()
    assert _ids(model) == ["summary", "images", "layers", "filters", "neurons", "atlas",
                           "metrics", "failed", "provenance"]  # fmt: skip
    for section in _ids(model):  # the table of contents links every section
        assert f'href="#{section}"' in model
    image = (report.parent / "tinynet" / "chelsea.html").read_text()
    assert _ids(image) == ["predictions", "methods", "activations"]
    assert 'id="m-gradcam"' in image and 'href="../tinynet.html#images"' in image
    assert 'rel="next" ' not in image and 'rel="next">coffee' in image  # pager
    for page in (index, model, image):  # run & config one click away from every page
        assert re.search(r'href="(\.\./)?index\.html#run"', page)


def test_atlas_page_per_layer(results: Path, report: Path) -> None:
    """Each atlas layer has a page: every channel's strip, a link over each column and under it
    to the image's page (none for an image without one), the caption naming the projection
    rule; the model page's atlas section and layer table link to it."""
    page = report.parent / "tinynet" / "atlas" / "block5.conv.html"
    html = page.read_text()
    info = read_json(results / "tinynet" / "atlas" / "layers" / "block5.conv.json")
    channel = info["channels"][0]
    assert 'id="ch-4"' in html and 'src="../../../tinynet/atlas/layers/block5.conv/ch0004.png"' \
        in html
    shown = [t["image"] for t in channel["top"]]
    assert shown == ["chelsea", "coffee", "gone"]
    for image in shown[:2]:  # the column's link and the image's name below the strip
        assert html.count(f'href="../{image}.html"') == 2, image
    assert "gone" in html and 'href="../gone.html"' not in html
    assert 'style="left: 0.0%; width: 24.615%"' in html  # column 0 of 4: 48 px of 195
    assert "projected by guided backprop (auto: no max pooling below this layer)" in html
    assert "selectivity 0.2" in html and "(most_selective)" in html
    model = (report.parent / "tinynet.html").read_text()
    assert model.count('href="tinynet/atlas/block5.conv.html"') == 2  # atlas section, layer table
    assert 'href="../../tinynet.html#atlas"' in html


def test_index_summary_numbers(report: Path) -> None:
    index = report.read_text()
    cards = dict(
        (k, v) for v, k in re.findall(r'<span class="v">([^<]+)</span><span class="k">([^<]+)',
                                      index)
    )  # fmt: skip
    assert cards["images"] == "4" and cards["failed"] == "1" and cards["model"] == "1"
    assert cards["methods"] == "12" and cards["compute time"] == "27.7 s"
    assert 'golden retriever <span class="small">(2)</span>' in index  # top classes
    assert "broken &lt;1&gt;.jpg" in index and "cannot identify image file" in index
    assert "title: audit run" in index and "onnxruntime" in index  # config and software


def test_model_page_scales(results: Path, report: Path) -> None:
    """Per-image detail lives on the image pages: the model page links only thumbnails."""
    model = (report.parent / "tinynet.html").read_text()
    grids = re.findall(r'"\.\./tinynet/activations/s000/(\w+)/[^"]+\.png"', model)
    assert set(grids) == {"chelsea"}  # the per-layer example only, full size on click
    images = re.findall(r"<img [^>]*>", model)
    assert all('loading="lazy"' in tag for tag in images)
    strips = [t for t in images if 'class="strip" src="thumbs/strips/tinynet/' in t]
    assert len(strips) == 4  # one picture per row holds every method's map
    assert "gradcam/s000/gradcam/" not in model  # the maps themselves are on the image pages
    table = model[model.index('id="images-table"') :]
    assert table.count("<tr data-class=") == 4
    form = re.search(r'<form class="filters"[^>]*>', model).group(0)
    assert "hidden" in form  # shown by the script; without it the table is just complete
    assert model.count("<script>") == 1 and "makeSortable" in model


def test_readable_captions_and_colour_bars(report: Path) -> None:
    image = (report.parent / "tinynet" / "chelsea.html").read_text()
    figures = re.findall(r"<figure.*?</figure>", image, re.S)
    assert len(figures) == 1 + 12 + 6 + 1  # input, maps, layer grids, one single channel
    assert all("<figcaption>" in f for f in figures)
    assert "bright = more evidence for the class" in image
    assert "hatched grey = blank channel" in image
    assert 'class="cbar heat"' in image and 'class="cbar act"' in image
    assert "approximate</span>" in image  # the finite-difference note is flagged
    model = (report.parent / "tinynet.html").read_text()
    assert "Grad-CAM: the layer&#39;s channels weighted" in model  # the legend of the grid
    assert "0%" in model and "(0%–0%)" in model  # blank channels per layer
    assert "filters, an input image optimized" in model and "converged" in model
    # neuron pictures in their own section, each pair with its own anchor
    neurons = model.split('<section id="neurons"')[1].split("</section>")[0]
    last = re.findall(r'id="filter-([^"]+)-lucent"', model)[-1]
    assert f'id="neuron-{last}-lucent"' in neurons and f"neurons/{last}.lucent.png" in neurons
    assert "the one unit at the centre of that filter" in neurons
    assert "the one unit at the centre" not in model.split('<section id="neurons"')[0]
    assert "<h4>Per method</h4>" in model and "The dashed &#39;random&#39; curve" in model
    assert 'title="Area under the class probability' in model  # how to read, per column
    assert "s000/gradcam.json</a>" in model  # per-shard details linked, not tabled


def test_correctness_from_labels(report: Path) -> None:
    model = (report.parent / "tinynet.html").read_text()
    rows = re.findall(r'<tr data-class="[^"]*" data-conf="[^"]*" data-ok="(\d)"', model)
    assert rows == ["0", "1", "0", "0"]
    assert "25.0%" in model  # top-1 correct of the 4 labelled images
    assert '<select data-f="ok">' in model


def test_escaping(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results", n_images=2, methods=["gradcam"], n_layers=2,
                           extras=False, sparsity=False)  # fmt: skip
    preds = results / "tinynet" / "predictions" / "s000.json"
    data = read_json(preds)
    data["images"][0]["top"][0]["label"] = EVIL
    write_json(preds, data)
    manifest = results / "images" / "s000.json"
    data = read_json(manifest)
    data["failed"] = [{"source": f"/in/{EVIL}.jpg", "error": EVIL}]
    write_json(manifest, data)
    index = build_report(results, config={"note": EVIL}, provenance={"operator": EVIL})
    for page in crawl(index).pages:
        html = page.read_text()
        assert EVIL not in html, page
        assert html.count("<script>") == 1
    model = (index.parent / "tinynet.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in model
    assert "&lt;script&gt;" in index.read_text()


def test_absent_steps_are_absent(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results", n_images=2, methods=[], n_layers=2,
                           grids="none", extras=False, truth=False, failed=False,
                           sparsity=False)  # fmt: skip
    shutil.rmtree(results / "tinynet" / "activations")
    (results / "models" / "ghost").mkdir()
    index = build_report(results)  # models discovered under results/models/
    model = (index.parent / "tinynet.html").read_text()
    assert _ids(model) == ["summary", "images", "provenance"]
    assert "True class" not in model and 'data-f="ok"' not in model
    ghost = (index.parent / "ghost.html").read_text()
    assert _ids(ghost) == ["summary", "images", "provenance"]  # staged images, nothing else
    assert "No prediction" not in ghost and "no prediction" in ghost
    assert "model.json was not found" in ghost
    assert not crawl(index).broken


def test_older_layout_and_cli_style_call(tmp_path: Path, monkeypatch) -> None:
    """images/shards/{shard}.json + images/{id}.png (an older staging layout) still reads."""
    results = make_results(tmp_path / "results", n_images=2, methods=["saliency"], n_layers=2,
                           extras=False, sparsity=False)  # fmt: skip
    (results / "images" / "shards").mkdir()
    for png in (results / "images" / "s000").glob("*.png"):
        png.rename(results / "images" / png.name)
    (results / "images" / "s000.json").rename(results / "images" / "shards" / "s000.json")

    def extra(ctx):
        return Section("extra", "Extra", "_gallery.html", {"figures": []}, note=f"for {ctx.name}")

    monkeypatch.setattr(report_builder, "SECTION_BUILDERS", [*SECTION_BUILDERS[:-1], extra])
    index = build_report(results_dir=results, index=tmp_path / "out" / "main.html",
                         config={}, models=["tinynet"])  # fmt: skip
    assert index.name == "main.html" and (index.parent / "tinynet.html").exists()
    model = (index.parent / "tinynet.html").read_text()
    assert '<section id="extra">' in model and "for tinynet" in model
    assert (
        'href="../results/images/chelsea.png"><img class="thumb" src="../results/images/chel'
        in model
    )
    assert not crawl(index).broken


def test_zip_opens_anywhere(results: Path, report: Path, tmp_path: Path) -> None:
    archive = report_zip(report, tmp_path / "report.zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "report/index.html" in names and not any(n.endswith((".npy", ".onnx")) for n in names)
    elsewhere = tmp_path / "elsewhere"
    zipfile.ZipFile(archive).extractall(elsewhere)
    found = crawl(elsewhere / "report" / "index.html")
    assert len(found.pages) == 7 and not found.broken and not found.external
    assert all(elsewhere in p.parents for p in found.files)


def test_self_contained_single_file(results: Path, tmp_path: Path) -> None:
    single = build_report(results, tmp_path / "single", CONFIG, self_contained=True)
    assert single == tmp_path / "single" / "report.html"
    assert sorted(p.name for p in single.parent.iterdir()) == ["report.html"]
    html = single.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    ids = set(re.findall(r'id="([^"]+)"', html))
    for href in set(re.findall(r'href="([^"]+)"', html)):
        assert href.startswith(("#", "data:")), href
        assert href.startswith("data:") or href[1:] in ids, href
    assert {"index", "m-tinynet", "i-tinynet-chelsea", "a-tinynet-block5.conv"} <= ids
    assert 'href="#a-tinynet-block5.conv"' in html and 'href="#i-tinynet-chelsea"' in html
    assert html.count("<script>") == 1


def test_rebuild_keeps_thumbnails(results: Path, report: Path) -> None:
    thumbs = sorted((report.parent / "thumbs").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    build_report(results, config=CONFIG)
    assert {p: p.stat().st_mtime_ns for p in thumbs} == before
    assert len(thumbs) > 12
