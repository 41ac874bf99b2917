"""What produced the report: the model file and its checksum, package versions, the config."""

from __future__ import annotations

import platform
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..model_file import checksum as model_checksum

PACKAGES = (
    ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")),
    ("onnx", ("onnx",)),
    ("numpy", ("numpy",)),
    ("pillow", ("pillow",)),
    ("matplotlib", ("matplotlib",)),
    ("jinja2", ("jinja2",)),
    ("scikit-image", ("scikit-image",)),
    ("snakemake", ("snakemake",)),
)


def describe_io(io: dict[str, Any] | None) -> str:
    if not io:
        return ""
    parts = [str(io.get("name", ""))]
    if "shape" in io:
        parts.append("[" + ", ".join(map(str, io["shape"])) + "]")
    for key in ("dtype", "layout", "channel_order", "kind", "num_classes"):
        if key in io:
            parts.append(f"{key} {io[key]}")
    return " ".join(parts)


def describe_verification(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    text = f"against {v.get('reference', '?')} on {v.get('image', '?')}"
    if v.get("max_abs_diff") is not None:  # None for onnx: sources (no reference to check)
        text += f": max |diff| {v['max_abs_diff']:.3g} (tolerance {v.get('tolerance', '?')})"
    if v.get("note"):
        text += f"; {v['note']}"
    return text


def _own_input(entry: dict[str, Any]) -> str:
    """What the model was made for, the adapter export put in front (export/onnx_io.py) and
    the precision it is computed in when export widened it (export/precision.py)."""
    parts = [f"adapter: {'; '.join(entry['adapter'])}"] if entry.get("adapter") else []
    parts += [str(entry["precision"])] if entry.get("precision") else []
    return "; ".join([describe_io(entry.get("model_input")), *parts]) if parts else ""


def model_rows(results_dir: Path, name: str, card: dict[str, Any] | None) -> list[tuple[str, str]]:
    card = card or {}
    checksum = card.get("sha256")
    onnx_file = results_dir / "models" / name / str(card.get("onnx", "model.onnx"))
    check = "model file missing"
    if onnx_file.exists() and checksum:
        matches = model_checksum(onnx_file) == checksum
        check = "matches the file" if matches else "DOES NOT match the file"
    pre = card.get("preprocess") or {}
    rows = [
        ("name", card.get("name", name)),
        ("source", card.get("source", "unknown")),
        ("weights", card.get("weights", "unknown")),
        ("sha256", f"{checksum or 'unknown'} ({check})"),
        ("opset", card.get("opset", "")),
        ("input", describe_io(card.get("input"))),
        ("model's own input", _own_input(card.get("input") or {})),
        ("output", describe_io(card.get("output"))),
        ("preprocess", ", ".join(f"{k} {v}" for k, v in pre.items())),
        ("conv layers", len(card.get("layers", [])) if card else ""),
        ("verification", describe_verification(card.get("verification"))),
        ("exporter", ", ".join(f"{k} {v}" for k, v in (card.get("exporter") or {}).items())),
        ("exported", card.get("created", "")),
    ]
    return [(k, str(v)) for k, v in rows if v not in ("", None)]


@lru_cache(maxsize=1)
def package_versions() -> tuple[tuple[str, str], ...]:
    from .. import __version__

    versions = [("python", platform.python_version()), ("cnnviz", __version__)]
    for label, dists in PACKAGES:
        for dist in dists:
            try:
                versions.append((label, metadata.version(dist)))
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions.append((label, "not installed"))
    return tuple(versions)


def format_duration(value: Any) -> str:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{int(hours)} h {int(minutes)} min"
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def run_rows(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """Date, duration and package versions of the run, then any other provenance given."""
    rows = [("date", str(provenance.get("date", time.strftime("%Y-%m-%d %H:%M:%S %z"))))]
    duration = provenance.get("duration_s", provenance.get("duration"))
    if duration is not None:
        rows.append(("duration", format_duration(duration)))
    versions = {**dict(package_versions()), **(provenance.get("versions") or {})}
    rows += [(name, str(v)) for name, v in versions.items()]
    skip = {"date", "duration", "duration_s", "versions"}
    rows += [(str(k), str(v)) for k, v in provenance.items() if k not in skip]
    return rows


def config_yaml(config: dict[str, Any]) -> str:
    if not config:
        return "(not recorded: the report was built without the config)"
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
