"""The whole report as one HTML file, every picture embedded as a data: URI (audit tickets).

The same page fragments as the multi-page report follow one another in one document; links
between pages become in-document anchors. Size is kept in hand for larger runs:

- per-image pages are included only up to IMAGE_PAGES_UP_TO images per model;
- full-size pictures are embedded as they are while all of them together stay under
  FULL_BUDGET bytes; beyond that every picture is embedded as a reduced copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import write_with
from .links import EmbeddedLinks, atlas_page_id, page_id

if TYPE_CHECKING:
    from .builder import Site

IMAGE_PAGES_UP_TO = 24
FULL_BUDGET = 24 * 1024 * 1024


def _picture_bytes(site: Site, image_pages: bool) -> int:
    run = site.run
    total = sum(i.path.stat().st_size for i in run.images.values() if i.path is not None)
    for model in run.models:
        if not model.dir.is_dir():
            continue
        for png in model.dir.rglob("*.png"):
            if image_pages or "activations" not in png.relative_to(model.dir).parts[:1]:
                total += png.stat().st_size
    return total


def write_standalone(site: Site, path: Path) -> Path:
    run = site.run
    largest = max((len(rows) for rows in site.rows.values()), default=0)
    image_pages = largest <= IMAGE_PAGES_UP_TO
    full = _picture_bytes(site, image_pages) <= FULL_BUDGET
    cache: dict[tuple[Path, int], str] = {}

    def links(page: str) -> EmbeddedLinks:
        return EmbeddedLinks(page, cache, full=full, image_pages=image_pages)

    pages = [(page_id(), site.index(links(page_id())))]
    for model in run.models:
        pages.append((page_id(model.name), site.model(model, links(page_id(model.name)))))
        for item in site.atlas_pages(model):
            pid = atlas_page_id(model.name, item["layer"])
            pages.append((pid, site.atlas(model, item, links(pid))))
        if image_pages:
            for position, row in enumerate(site.rows[model.name]):
                pid = page_id(model.name, row["id"])
                pages.append((pid, site.image(model, position, links(pid))))
    from .builder import assets

    css, js = assets()
    html = site.env.get_template("standalone.html").render(
        link=links(page_id()), run=run, pages=pages, title=run.title, current="index",
        css=css, js=js, full=full, images=largest,
    )  # fmt: skip
    return write_with(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
