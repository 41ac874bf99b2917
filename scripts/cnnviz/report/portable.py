"""What a report needs on disk, found by following its links; and a zip of exactly that.

The report links pictures where the steps wrote them (relative links, nothing copied but
thumbnails), so the portable unit is the results folder. `report_zip` packs only the files the
pages reach (pages, thumbnails, PNGs; not the .npy arrays, models or logs), keeping their paths
below the folder that holds them all; unzipped anywhere, every link resolves.

    python -m cnnviz.report.portable results/report/index.html report.zip
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def page_links(html: str) -> list[str]:
    parser = _LinkParser()
    parser.feed(html)
    return parser.links


@dataclass
class Crawl:
    pages: list[Path] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)  # everything linked, pages included
    broken: list[tuple[Path, str]] = field(default_factory=list)  # (page, link)
    external: list[tuple[Path, str]] = field(default_factory=list)  # absolute or remote links


def crawl(index: str | Path) -> Crawl:
    """Follow every href/src from `index` through the report's pages (static, no browser)."""
    index = Path(os.path.abspath(index))
    result = Crawl()
    todo, seen = [index], {index}
    while todo:
        page = todo.pop()
        result.pages.append(page)
        result.files.add(page)
        for link in page_links(page.read_text(encoding="utf-8")):
            parts = urlsplit(link)
            if parts.scheme in ("data", "javascript", "mailto") or (not parts.path):
                continue  # in-page anchors and embedded pictures
            if parts.scheme or parts.netloc or parts.path.startswith("/"):
                result.external.append((page, link))
                continue
            target = Path(os.path.normpath(page.parent / unquote(parts.path)))  # as a browser
            if not target.exists():
                result.broken.append((page, link))
                continue
            result.files.add(target)
            if target.suffix == ".html" and target not in seen:
                seen.add(target)
                todo.append(target)
    return result


def report_zip(index: str | Path, zip_path: str | Path) -> Path:
    """Zip the files the report reaches, below their common folder (the results folder)."""
    found = crawl(index)
    if found.broken:
        page, link = found.broken[0]
        raise FileNotFoundError(f"{page} links to missing {link} ({len(found.broken)} broken)")
    root = Path(_common_root(found.files))
    zip_path = Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:  # PNGs don't shrink
        for path in sorted(found.files):
            archive.write(path, path.relative_to(root).as_posix())
    return zip_path


def _common_root(paths: set[Path]) -> Path:
    parts = [p.parent.parts for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return Path(*common)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m cnnviz.report.portable REPORT/index.html OUT.zip", file=sys.stderr)
        return 2
    print(report_zip(args[0], args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
