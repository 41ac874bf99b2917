"""How a page refers to files and to other pages: relative links, or data: URIs in one file.

`Links` serves the multi-page report: every href is relative to the page's own folder
(`report/` or `report/{model}/`), so the report works from disk and after the results folder is
moved or zipped whole. `EmbeddedLinks` serves the single self-contained file: pictures become
data: URIs and pages become anchors in the same document.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from pathlib import Path
from urllib.parse import quote

from .thumbs import strip_bytes, thumbnail_bytes


def relative_href(path: str | Path, page_dir: str | Path) -> str:
    """A URL-quoted relative link from `page_dir` to `path`.

    Lexical (os.path.abspath, not resolve): a browser resolves "../" in a file URL lexically too,
    and it costs no system calls, which matters for 1,000 pages.
    """
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    return quote(rel.replace(os.sep, "/"))


def page_id(model: str | None = None, image: str | None = None) -> str:
    if model is None:
        return "index"
    return f"m-{model}" if image is None else f"i-{model}-{image}"


def atlas_page_id(model: str, layer: str) -> str:
    """The self-contained file's id of a layer's atlas page."""
    return f"a-{model}-{layer}"


class Links:
    """Links from one page of the multi-page report."""

    embedded = False

    def __init__(
        self,
        out_dir: Path,
        page_dir: Path,
        index_name: str = "index.html",
        thumbs: dict[tuple[Path, int], Path] | None = None,
        image_pages: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.page_dir = os.path.abspath(page_dir)
        self.index_name = index_name
        self.thumbs = thumbs or {}
        self.image_pages = image_pages

    # files ------------------------------------------------------------------------------
    def file(self, path: str | Path) -> str:
        return relative_href(path, self.page_dir)

    def thumb(self, path: str | Path, side: int) -> str:
        return self.file(self.thumbs.get((Path(path), side), path))

    def strip(self, row: dict) -> str:
        """The method x image grid's picture for one row (written by write_pages)."""
        return self.file(row["strip"]) if row.get("strip") else ""

    # pages and anchors --------------------------------------------------------------------
    def anchor(self, name: str) -> str:
        """The id attribute of a section of this page."""
        return name

    def _page(self, target: Path, anchor: str) -> str:
        href = relative_href(target, self.page_dir)
        return f"{href}#{anchor}" if anchor else href

    def index(self, anchor: str = "") -> str:
        return self._page(self.out_dir / self.index_name, anchor)

    def model(self, name: str, anchor: str = "") -> str:
        return self._page(self.out_dir / f"{name}.html", anchor)

    def image(self, model: str, image: str, anchor: str = "") -> str | None:
        if not self.image_pages:
            return None
        return self._page(self.out_dir / model / f"{image}.html", anchor)

    def atlas(self, model: str, layer: str, anchor: str = "") -> str:
        """A layer's atlas page: report/{model}/atlas/{layer}.html (a folder of its own, so no
        layer name can meet an image id)."""
        return self._page(self.out_dir / model / "atlas" / f"{layer}.html", anchor)


class EmbeddedLinks(Links):
    """Links inside the single self-contained file: data: URIs and in-document anchors.

    With `full=False` (a large run) even "full-size" pictures are embedded as reduced copies
    (`reduced_side` px), so the file stays small enough to attach to a ticket.
    """

    embedded = True

    def __init__(
        self,
        page: str,
        cache: dict[tuple[Path, int], str],
        full: bool = True,
        reduced_side: int = 480,
        image_pages: bool = True,
    ) -> None:
        super().__init__(Path("."), Path("."), image_pages=image_pages)
        self.page = page
        self.cache = cache
        self.full = full
        self.reduced_side = reduced_side

    def _data(self, path: Path, side: int) -> str:
        key = (path, side)
        if key not in self.cache:
            if side:
                data, mime = thumbnail_bytes(path, side), "image/png"
            else:
                data = path.read_bytes()
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.cache[key] = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return self.cache[key]

    def file(self, path: str | Path) -> str:
        path = Path(path)
        if not path.is_file():
            return ""
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif", ".webp"):
            return ""
        try:
            return self._data(path, 0 if self.full else self.reduced_side)
        except OSError:
            return ""

    def thumb(self, path: str | Path, side: int) -> str:
        path = Path(path)
        try:
            return self._data(path, side) if path.is_file() else ""
        except OSError:
            return ""

    def strip(self, row: dict) -> str:
        key = (Path(f"strip:{row['id']}:{id(row)}"), -1)
        if key not in self.cache:
            data = strip_bytes(*row["strip_sources"])
            self.cache[key] = f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}"
        return self.cache[key]

    def anchor(self, name: str) -> str:
        return f"{self.page}--{name}"

    def _to(self, page: str, anchor: str) -> str:
        return f"#{page}--{anchor}" if anchor else f"#{page}"

    def index(self, anchor: str = "") -> str:
        return self._to(page_id(), anchor)

    def model(self, name: str, anchor: str = "") -> str:
        return self._to(page_id(name), anchor)

    def image(self, model: str, image: str, anchor: str = "") -> str | None:
        if not self.image_pages:
            return None
        return self._to(page_id(model, image), anchor)

    def atlas(self, model: str, layer: str, anchor: str = "") -> str:
        return self._to(atlas_page_id(model, layer), anchor)
