"""Open a report in headless Chromium and check it the way a person would see it.

Chromium is driven over the Chrome DevTools Protocol on a pipe (--remote-debugging-pipe: file
descriptors 3 and 4, NUL-separated JSON), so nothing beyond the standard library is needed.

`check_report(index)` starts at the index page, follows every link to another page of the
report, and on each page: forces lazy images to load and checks that every <img> decoded
(naturalWidth > 0); records console errors, uncaught exceptions and failed loads; checks that
every link to a file resolves and every #anchor exists on its page; saves a screenshot.

    python tests/browser_check.py results/report/index.html [--screens DIR]
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urlsplit

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
    "--remote-debugging-pipe",
]  # fmt: skip


def find_chromium(install: bool = False, timeout: float = 600) -> str | None:
    """The Chromium binary; with `install`, try apt-get once when it is missing."""
    for path in CHROMIUM:
        if Path(path).exists():
            return path
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=timeout, env=env)
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True,
                           timeout=timeout, env=env)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return find_chromium(install=False)
    return None


class Browser:
    """One headless Chromium and one tab, driven over CDP on a pipe."""

    def __init__(self, binary: str, width: int = 1360, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="cnnviz-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # in the child: our pipe ends become fds 3 (in) and 4 (out)
            read_end = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire_pipes,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # protocol ---------------------------------------------------------------------------------
    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        box = self._replies.get(message["id"])
                    if box is not None:
                        box.put(message)
                else:
                    self.events.append(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:  # fmt: skip
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            self._replies[ident] = box = queue.Queue()
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer {method} in {timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(ident, None)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_event(self, method: str, start: int, timeout: float = 30,
                   match: Any = None) -> int:  # fmt: skip
        """Index of the first `method` event of this tab at or after `start` (that `match`es)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(start, len(self.events)):
                event = self.events[index]
                if event.get("method") == method and event.get("sessionId") == self.session:
                    if match is None or match(event.get("params", {})):
                        return index
            time.sleep(0.01)
        raise TimeoutError(f"no {method} within {timeout} s")

    # pages ------------------------------------------------------------------------------------
    def open(self, url: str, timeout: float = 60) -> int:
        """Navigate and wait for this navigation's load event; returns the index of its first
        event (console messages of the page come after it)."""
        start = len(self.events)
        loader = self.call("Page.navigate", {"url": url}).get("loaderId")
        navigated = self.wait_event(
            "Page.frameNavigated", start, timeout,
            lambda p: p["frame"].get("loaderId") == loader and not p["frame"].get("parentId"),
        )  # fmt: skip
        self.wait_event("Page.loadEventFired", navigated, timeout)
        return start

    def timing(self) -> dict[str, float]:
        """Navigation Timing of the current page, in ms from navigation start."""
        for _ in range(200):
            entry = self.evaluate(
                "JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())"
            )
            data = json.loads(entry)
            if data.get("loadEventEnd", 0) > 0:
                return {
                    "load_ms": data["loadEventEnd"],
                    "dom_content_loaded_ms": data["domContentLoadedEventEnd"],
                }
            time.sleep(0.01)
        raise TimeoutError("loadEventEnd never set")

    def errors(self, start: int) -> list[str]:
        """Console errors, uncaught exceptions and failed loads since event `start`."""
        found = []
        for event in self.events[start:]:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    "console: "
                    + " ".join(
                        str(a.get("value", a.get("description"))) for a in params.get("args", [])
                    )
                )
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params.get("exceptionDetails"))[:300])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return found

    def screenshot(self, path: Path, max_height: int = 2400) -> Path:
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.clientWidth")
        shot = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, max_height),
                     "scale": 1}})  # fmt: skip
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FORCE_IMAGES = """(async () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const images = Array.from(document.images);
  images.forEach(i => { i.loading = 'eager'; });
  window.scrollTo(0, document.documentElement.scrollHeight);
  const settle = i => i.complete ? null : new Promise(done => {
    i.addEventListener('load', done); i.addEventListener('error', done); });
  const timeout = new Promise(done => setTimeout(done, 20000));
  await Promise.race([Promise.all(images.map(settle)), timeout]);
  await Promise.race([Promise.all(images.map(i => i.decode().catch(() => null))), timeout]);
  window.scrollTo(0, 0);
  return {count: images.length,
          broken: images.filter(i => !(i.complete && i.naturalWidth > 0))
                        .map(i => (i.getAttribute('src') || '(empty src)').slice(0, 160))};
})()"""

PAGE_FACTS = """(() => ({
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  title: document.title,
}))()"""


@dataclass
class PageReport:
    url: str
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    screenshot: Path | None = None


@dataclass
class CrawlReport:
    pages: list[PageReport] = field(default_factory=list)
    missing_anchors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        for page in self.pages:
            out += [f"{page.url}: broken image {s}" for s in page.broken_images]
            out += [f"{page.url}: {e}" for e in page.errors]
            out += [f"{page.url}: broken link {link}" for link in page.broken_links]
            out += [f"{page.url}: id used twice: {i}" for i in page.duplicate_ids]
        return out + [f"missing anchor {a}" for a in self.missing_anchors]


def _kind(url: str, index_url: str) -> str:
    if url == index_url:
        return "index"
    return (
        "image" if urlsplit(url).path.count("/") > urlsplit(index_url).path.count("/") else "model"
    )


def check_report(
    index: str | Path,
    browser: Browser,
    screens: Path | None = None,
    max_pages: int | None = None,
) -> CrawlReport:
    """Crawl the report from `index` in `browser`; screenshots of the first index, model and
    image page go to `screens` (index.png, model.png, image.png)."""
    index_url = Path(index).resolve().as_uri()
    report = CrawlReport()
    todo, seen = [index_url], {index_url}
    anchors: list[tuple[str, str, str]] = []  # (from page, target page, id)
    ids: dict[str, set[str]] = {}
    shot_kinds: set[str] = set()
    while todo and (max_pages is None or len(report.pages) < max_pages):
        url = todo.pop(0)
        start = browser.open(url)
        page = PageReport(url, timing=browser.timing())
        forced = browser.evaluate(FORCE_IMAGES, timeout=60)
        page.images, page.broken_images = forced["count"], forced["broken"]
        facts = browser.evaluate(PAGE_FACTS)
        ids[url] = set(facts["ids"])
        page.duplicate_ids = sorted({i for i in facts["ids"] if facts["ids"].count(i) > 1})
        for link in facts["links"]:
            target, fragment = urldefrag(link)
            if not target.startswith("file:"):
                if not target.startswith(("http:", "https:", "mailto:", "data:")):
                    page.broken_links.append(link)
                continue
            path = Path(unquote(urlsplit(target).path))
            if not path.exists():
                page.broken_links.append(link)
                continue
            if fragment:
                anchors.append((url, target, unquote(fragment)))
            if path.suffix == ".html" and target not in seen:
                seen.add(target)
                todo.append(target)
        kind = _kind(url, index_url)
        if screens is not None and kind not in shot_kinds:
            browser.evaluate("window.scrollTo(0, 0)")
            page.screenshot = browser.screenshot(Path(screens) / f"{kind}.png")
            shot_kinds.add(kind)
        time.sleep(0.05)  # late console messages
        page.errors = browser.errors(start)
        report.pages.append(page)
    for source, target, anchor in anchors:
        if target in ids and anchor not in ids[target]:
            report.missing_anchors.append(f"{source} -> {target}#{anchor}")
    return report


def page_load(browser: Browser, page: str | Path) -> dict[str, float]:
    """loadEventEnd and DOMContentLoaded (ms from navigation start) of one fresh page load."""
    start = browser.open(Path(page).resolve().as_uri(), timeout=60)
    timing = browser.timing()
    timing["errors"] = browser.errors(start)
    return timing


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    screens = Path(argv[argv.index("--screens") + 1]) if "--screens" in argv else None
    binary = find_chromium()
    if binary is None:
        print("Chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    with Browser(binary) as browser:
        report = check_report(argv[0], browser, screens)
    for page in report.pages:
        print(f"{page.timing.get('load_ms', 0):7.0f} ms {page.images:5d} images  {page.url}")
    for problem in report.problems:
        print("PROBLEM", problem)
    print(f"{len(report.pages)} pages, {len(report.problems)} problems")
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
