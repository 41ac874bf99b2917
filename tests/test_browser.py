"""The report in a real browser: headless Chromium opens it from disk (file://).

Checks every page reachable from the index (no broken image, no console error, every link and
anchor resolves), that sorting and filtering work, and that the model page of a 1,000-image run
loads in under two seconds. Screenshots of an index, a model and an image page are saved in a
folder the test prints, and copied to .tmp/screens/ of the repository when that folder's parent
exists (for people to look at).

Any other report can be checked the same way: CNNVIZ_REPORT=results/report/index.html pytest
tests/test_browser.py -k given (screenshots of it go to the same places, prefixed "given-").

Needs the Debian package `chromium` (installed once with apt-get if missing and possible);
skipped with the reason otherwise. The crawler itself is `browser_check.check_report(index)`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
from browser_check import Browser, check_report, find_chromium, page_load
from cnnviz.report import build_report
from report_fixture import big_results, make_results

REPO = Path(__file__).resolve().parents[1]
SHARED_SCREENS = REPO / ".tmp" / "screens"
CONFIG = {"report": {"title": "cnnviz report"}, "models": {"tinynet": {"source": "onnx:x"}}}


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium(install=True)
    if binary is None:
        pytest.skip(
            "headless Chromium is not installed and `apt-get install chromium` did not work "
            "here; install the Debian packages chromium and chromium-driver to run this test"
        )
    with Browser(binary) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = make_results(tmp_path_factory.mktemp("small") / "results")
    return build_report(results, config=CONFIG, provenance={"date": "2026-11-27 22:00"})


def _share(screens: Path, names: list[str]) -> None:
    if not SHARED_SCREENS.parent.is_dir():
        return
    SHARED_SCREENS.mkdir(exist_ok=True)
    for name in names:
        if (screens / name).exists():
            shutil.copy2(screens / name, SHARED_SCREENS / name)


def test_every_page_in_the_browser(browser: Browser, small_report: Path, tmp_path: Path) -> None:
    screens = tmp_path / "screens"
    report = check_report(small_report, browser, screens)
    print(f"\nscreenshots: {screens}")
    for page in report.pages:
        print(f"  {page.timing['load_ms']:6.0f} ms  {page.images:3d} images  {page.url}")
    assert not report.problems, "\n".join(report.problems[:20])
    names = sorted(Path(p.url).name for p in report.pages)
    assert names == ["block5.conv.html", "chelsea.html", "coffee.html", "img0002.html",
                     "img0003.html", "index.html", "tinynet.html"]  # fmt: skip
    assert sum(page.images for page in report.pages) > 60
    shots = sorted(p.name for p in screens.glob("*.png"))
    assert shots == ["image.png", "index.png", "model.png"]
    assert all((screens / s).stat().st_size > 20_000 for s in shots)
    _share(screens, shots)


def test_self_contained_file_in_the_browser(
    browser: Browser, small_report: Path, tmp_path: Path
) -> None:
    results = small_report.parent.parent
    single = build_report(results, tmp_path, CONFIG, self_contained=True)
    report = check_report(single, browser)
    assert len(report.pages) == 1 and not report.problems, report.problems[:10]
    assert report.pages[0].images > 60  # every picture, embedded


def test_sorting_and_filtering(browser: Browser, small_report: Path) -> None:
    browser.open((small_report.parent / "tinynet.html").as_uri())
    order = """Array.from(document.querySelectorAll('#images-table tbody tr'))
                 .filter(r => !r.hidden).map(r => r.cells[0].getAttribute('data-v'))"""
    before = browser.evaluate(order)
    assert before == ["chelsea", "coffee", "img0002", "img0003"]
    browser.evaluate("document.querySelectorAll('#images-table th button')[2].click()")
    by_confidence = browser.evaluate(order)  # ascending confidence
    confidences = browser.evaluate(
        """Array.from(document.querySelectorAll('#images-table tbody tr'))
             .map(r => parseFloat(r.getAttribute('data-conf')))"""
    )
    assert confidences == sorted(confidences) and by_confidence != before
    shown = browser.evaluate(
        """(() => { const box = document.querySelector('[data-f=class]');
             box.value = 'golden'; box.dispatchEvent(new Event('input', {bubbles: true}));
             return document.querySelector('form.filters .count').textContent; })()"""
    )
    assert shown == "2 of 4 images shown"
    assert browser.evaluate(order) == ["img0002", "img0003"]
    assert not browser.evaluate("document.querySelector('form.filters').hidden")


def test_thousand_image_model_page_loads_fast(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("big")
    started = time.perf_counter()
    results = big_results(root / "results")
    made = time.perf_counter()
    index = build_report(results, config={})
    built = time.perf_counter()
    page = index.parent / "tinynet.html"
    loads = [page_load(browser, page) for _ in range(3)]
    load = [t["load_ms"] for t in loads]
    ready = [t["dom_content_loaded_ms"] for t in loads]
    print(
        f"\n1,000-image model page ({page.stat().st_size / 1e6:.2f} MB HTML; results "
        f"{made - started:.1f} s, report {built - made:.1f} s): load event "
        f"{', '.join(f'{v:.0f}' for v in load)} ms, DOMContentLoaded "
        f"{', '.join(f'{v:.0f}' for v in ready)} ms (median {statistics.median(load):.0f} ms)"
    )
    assert not any(t["errors"] for t in loads), loads
    assert statistics.median(load) < 2000
    report = check_report(index, browser, root / "screens", max_pages=2)  # index, model page
    assert not report.problems, report.problems[:10]
    model = report.pages[1]
    assert model.url.endswith("tinynet.html")
    assert 2000 < model.images < 2200  # input + one strip per row, not 12,000 pictures
    if (root / "screens" / "model.png").exists():
        shutil.copy2(root / "screens" / "model.png", root / "screens" / "model-1000.png")
        _share(root / "screens", ["model-1000.png"])


@pytest.mark.skipif(not os.environ.get("CNNVIZ_REPORT"), reason="set CNNVIZ_REPORT=index.html")
def test_given_report(browser: Browser, tmp_path: Path) -> None:
    """The report CNNVIZ_REPORT names (e.g. the default run's), crawled like the small one."""
    index = Path(os.environ["CNNVIZ_REPORT"])
    screens = tmp_path / "screens"
    report = check_report(index, browser, screens)
    print(f"\n{len(report.pages)} pages; screenshots: {screens}")
    for page in report.pages:
        print(f"  {page.timing['load_ms']:6.0f} ms  {page.images:4d} images  {page.url}")
    for shot in list(screens.glob("*.png")):
        shot.rename(shot.with_name(f"given-{shot.name}"))
    _share(screens, sorted(p.name for p in screens.glob("*.png")))
    assert not report.problems, "\n".join(report.problems[:20])
