"""Job failures as artifacts: a step that cannot do its work still writes its outputs.

A job that fails on bad input (an unreadable ONNX file, a layer name the model lacks) would stop
the whole Snakemake run and leave no report. Run with `cnnviz --record-failures <step>` (every
rule does), a step that raises a `CnnvizError` writes instead, for each of its declared outputs,
a failure marker:

- a folder output gets `job-failed.json` inside it;
- a file output gets a sidecar `<file>.job-failed.json`, and the file itself holds the record
  (JSON), a picture of the message (PNG), or nothing (anything else, e.g. model.onnx).

Later steps that read a failed artifact raise `UpstreamFailed`, so they record a failure of their
own that names the root cause; the report lists every marker it finds (`find_failures`). The
run finishes and the exit status is 0: what failed is in the report and in `onsuccess`'s summary.
A step that succeeds removes the sidecars an earlier failed run left beside its outputs.

Stdlib only at import time: the Snakefile imports it to summarize a run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import CnnvizError

MARKER = "job-failed.json"
SIDECAR_SUFFIX = "." + MARKER
JSON_KEY = "job_failed"


class UpstreamFailed(CnnvizError):
    """An input of this step is the failure marker of an earlier step."""

    def __init__(self, message: str, cause: dict[str, Any]) -> None:
        super().__init__(message)
        self.cause = cause


def marker_path(output: Path, is_dir: bool) -> Path:
    return output / MARKER if is_dir else output.with_name(output.name + SIDECAR_SUFFIX)


def failure_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The failure record when `path` (a folder or file output) is a failure marker, else None."""
    path = Path(path)
    marker = marker_path(path, path.is_dir())
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {"error": f"unreadable failure marker {marker}"}
    return record if isinstance(record, dict) else {"error": str(record)}


def check_input(path: str | os.PathLike[str], what: str) -> None:
    """Raise UpstreamFailed when the artifact at `path` is an earlier step's failure marker."""
    record = failure_of(path)
    if record is not None:
        raise UpstreamFailed(upstream_message(record, what), root_cause(record))


def upstream_message(record: dict[str, Any], what: str) -> str:
    cause = root_cause(record)
    return f"skipped: {what} failed in step {cause.get('step', '?')}: {cause.get('error', '')}"


def root_cause(record: dict[str, Any]) -> dict[str, Any]:
    """The first failure in a chain of skipped steps."""
    cause = record.get("cause")
    return cause if isinstance(cause, dict) else record


def failure_record(
    step: str, error: BaseException, outputs: Iterable[tuple[Path, bool]]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": step,
        "error": str(error),
        "kind": type(error).__name__,
        "outputs": [str(path) for path, _ in outputs],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if isinstance(error, UpstreamFailed):
        record["cause"] = error.cause
    return record


def record_failure(step: str, error: BaseException, outputs: list[tuple[Path, bool]]) -> None:
    """Write a failure marker for every output (see the module docstring)."""
    from .artifacts import write_json, write_with

    record = failure_record(step, error, outputs)
    for path, is_dir in outputs:
        if is_dir:
            path.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".json":
            write_json(path, {JSON_KEY: record})
        elif path.suffix == ".png":
            write_with(path, lambda tmp: _error_picture(tmp, step, str(error)))
        else:
            write_with(path, lambda tmp: tmp.write_bytes(b""))
        write_json(marker_path(path, is_dir), record)


def clear_failure(outputs: Iterable[tuple[Path, bool]]) -> None:
    """Remove the sidecars of a failed earlier run once the step has succeeded."""
    for path, is_dir in outputs:
        if not is_dir:
            marker_path(path, is_dir).unlink(missing_ok=True)


def find_failures(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every failure record under `root`, each with `marker` (its path), sorted by path."""
    root = Path(root)
    found = []
    for marker in sorted(root.rglob(f"*{MARKER}")):
        if any(part.startswith(".") for part in marker.relative_to(root).parts):
            continue
        record = failure_of(marker.parent if marker.name == MARKER else _sidecar_owner(marker))
        if record is not None:
            found.append(dict(record, marker=str(marker)))
    return found


def _sidecar_owner(marker: Path) -> Path:
    return marker.with_name(marker.name[: -len(SIDECAR_SUFFIX)])


def _error_picture(path: Path, step: str, message: str) -> None:
    """A small grey PNG that says what failed, for a picture a page would otherwise show."""
    import textwrap

    from PIL import Image, ImageDraw

    lines = [f"{step} failed:"] + textwrap.wrap(message, 60)[:12]
    picture = Image.new("RGB", (480, 40 + 16 * len(lines)), (236, 236, 236))
    draw = ImageDraw.Draw(picture)
    for i, line in enumerate(lines):
        draw.text((12, 12 + 16 * i), line, fill=(140, 20, 20) if i == 0 else (40, 40, 40))
    picture.save(path, format="PNG")


def failed_jobs_summary(root: str | os.PathLike[str], limit: int = 20) -> list[str]:
    """One line per job that failed on its own (not skipped for an earlier failure)."""
    seen: set[tuple[str, ...]] = set()
    lines = []
    for record in find_failures(root):
        key = tuple(record.get("outputs") or [record["marker"]])
        if key in seen or "cause" in record:
            continue
        seen.add(key)
        lines.append(f"{record.get('step', '?')}: {record.get('error', '')}"[:300])
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
