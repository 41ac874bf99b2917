"""Scheduled audits: stamp a run, freeze what it found, compare it with an earlier run.

A stamped run (config `run_id`) writes its report to `{output}/runs/{run_id}/report/` and a
frozen `snapshot.json` beside it: per model the checksum, per image the top-k predictions and,
per image x method, a 32 x 32 float32 copy of the raw map (so a later run can correlate even after
the shared maps in `{output}/` were overwritten). `compare` turns two snapshots into the data of
the report's "What changed since the last audit" section; `write_runs_index` lists every run.

The helpers the workflow calls while it builds the DAG (`resolve_run_id`, `available_runs`,
`resolve_baseline`) use the standard library only.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

SIDE = 32  # the frozen maps' side
RUN_KEYS = ("run_id", "baseline")  # config keys that name the run, not what it computes
ENV_RUN_ID = "CNNVIZ_RUN_ID"  # `run_id: auto` resolved once, inherited by the jobs


# --------------------------------------------------------------------------- run ids (stdlib)


def resolve_run_id(value: str) -> str:
    """ "" (unstamped), a given id, or for "auto" the date and time at DAG build.

    The auto id is kept in the environment so that jobs which re-read the workflow (cluster
    jobs) see the same id as the run that planned them.
    """
    if value != "auto":
        return value
    return os.environ.setdefault(ENV_RUN_ID, time.strftime("%Y-%m-%dT%H%M"))


def available_runs(runs_dir: str | Path) -> list[str]:
    """The stamped runs that finished their snapshot, oldest first (by snapshot time)."""
    runs_dir = Path(runs_dir)
    found = runs_dir.glob("*/snapshot.json") if runs_dir.is_dir() else []
    return [p.parent.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.parent.name))]


def resolve_baseline(runs_dir: str | Path, baseline: str, run_id: str) -> str:
    """The run to compare with: "" (none), an earlier run id, or "latest" (the newest earlier
    run; none when there is none yet). Raises ConfigError naming the runs that exist."""
    if not baseline:
        return ""
    if not run_id:
        raise ConfigError(
            f"config: baseline {baseline!r} needs a stamped run; set run_id (e.g. run_id=auto)"
        )
    earlier = [r for r in available_runs(runs_dir) if r != run_id]
    if baseline == "latest":
        return earlier[-1] if earlier else ""
    if baseline == run_id:
        raise ConfigError(f"config: baseline {baseline!r} is this run itself; name an earlier run")
    if baseline not in earlier:
        listed = ", ".join(earlier) if earlier else "none yet"
        raise ConfigError(
            f"config: baseline run {baseline!r} has no snapshot under {runs_dir}/; "
            f"available runs: {listed}"
        )
    return baseline


# --------------------------------------------------------------------------- maps


def downsample(raw: Any, side: int = SIDE) -> Any:
    """A [side, side] float32 area-average of a 2-D map ([C, H, W] / [H, W, C]: channel mean)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(raw, dtype=np.float32)
    if values.ndim == 3:
        values = values.mean(axis=0 if values.shape[0] <= 4 else -1)
    values = np.squeeze(values)
    if values.ndim != 2:
        raise ConfigError(f"audit: a map of shape {np.shape(raw)} is not a 2-D picture")
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    small = Image.fromarray(values, mode="F").resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def encode_map(values: Any) -> dict[str, Any]:
    import numpy as np

    array = np.ascontiguousarray(values, dtype="<f4")
    return {"shape": list(array.shape), "dtype": "float32",
            "b64": base64.b64encode(array.tobytes()).decode("ascii")}  # fmt: skip


def decode_map(data: dict[str, Any]) -> Any:
    import numpy as np

    raw = base64.b64decode(data["b64"])
    return np.frombuffer(raw, dtype="<f4").reshape(data["shape"]).astype(np.float32)


def map_correlation(a: Any, b: Any) -> dict[str, float | None]:
    """Pearson and Spearman of two maps of one shape; None where either map is constant."""
    import numpy as np

    from .metrics.similarity import spearman

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"audit: maps of shapes {np.shape(a)} and {np.shape(b)} differ")
    xc, yc = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    pearson = float(np.clip((xc * yc).sum() / norm, -1, 1)) if norm > 0 else None
    rank = spearman(x, y)
    return {"pearson": pearson, "spearman": None if math.isnan(rank) else rank}


# --------------------------------------------------------------------------- configs


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}: nested dicts become dotted keys; lists and scalars are leaves."""
    if not isinstance(config, dict) or (prefix and not config):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key in sorted(config, key=str):
        flat.update(flatten(config[key], f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Keys whose value differs (added, removed or changed), sorted; run-naming keys ignored."""
    old = {k: v for k, v in flatten(before).items() if k.split(".")[0] not in RUN_KEYS}
    new = {k: v for k, v in flatten(after).items() if k.split(".")[0] not in RUN_KEYS}
    missing = object()
    rows = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, missing), new.get(key, missing)
        if was != now:
            rows.append({"key": key,
                         "before": None if was is missing else was,
                         "after": None if now is missing else now,
                         "change": "added" if was is missing else
                         "removed" if now is missing else "changed"})  # fmt: skip
    return rows


# --------------------------------------------------------------------------- snapshot


def snapshot(
    results_dir: str | Path,
    run_id: str,
    config: dict[str, Any],
    models: list[str],
    methods: list[str] | None = None,
    baseline: str = "",
) -> dict[str, Any]:
    """What a later audit needs from this run, independent of the shared artifacts."""
    import numpy as np

    from .report.collect import model_results, staged_images

    results_dir = Path(results_dir)
    images, failed = staged_images(results_dir)
    data: dict[str, Any] = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "baseline": baseline,
        "report": f"{run_id}/report/index.html",
        "config": {k: v for k, v in config.items() if k not in RUN_KEYS},
        "images": sorted(images),
        "failed": failed,
        "models": {},
    }
    for name in models:
        model = model_results(results_dir, name)
        card = model.card or {}
        maps: dict[str, dict[str, Any]] = {}
        for method in model.methods:
            if methods is not None and method not in methods:
                continue
            for image_id, entries in model.explanations[method].items():
                entry = entries[0]  # the first target (top-1 by default)
                raw = entry.raw()  # the shard's maps.npy row (or the older per-image .npy)
                if raw is None or np.ndim(raw) != 2:
                    continue  # no map, or a projection stack (not one map)
                where = entry.maps if entry.maps is not None else entry.png
                path = str(where.relative_to(results_dir)) if where is not None else ""
                if entry.row is not None:
                    path += f"/maps.npy#{entry.row}"
                maps.setdefault(image_id, {})[method] = {
                    "path": path, "target": entry.target, "map": encode_map(downsample(raw))}
        data["models"][name] = {
            "sha256": card.get("sha256", ""),
            "source": card.get("source", ""),
            "config": (config.get("models") or {}).get(name, {}),
            "predictions": {k: v[:5] for k, v in sorted(model.predictions.items())},
            "maps": maps,
            "failed": model.failed,
        }
    return data


# --------------------------------------------------------------------------- comparison


def _top1(top: list[dict[str, Any]]) -> dict[str, Any] | None:
    return top[0] if top else None


def compare_predictions(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict:
    """Top-1 then and now, whether it changed (class or label), and the probability delta of
    the earlier top-1 class (None when it left the listed top-k)."""
    was, now = _top1(before), _top1(after)
    row: dict[str, Any] = {"before": was, "after": now, "changed": False, "prob_delta": None}
    if was is None or now is None:
        row["changed"] = was is not now
        return row
    row["changed"] = (was["index"], was["label"]) != (now["index"], now["label"])
    same = next((t for t in after if t["index"] == was["index"]), None)
    if same is not None:
        row["prob_delta"] = float(same["prob"]) - float(was["prob"])
    return row


def compare(base: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The "What changed since the last audit" data: per model, checksum, config, predictions and
    map correlations per image x method."""
    out: dict[str, Any] = {
        "run_id": current.get("run_id", ""),
        "baseline": base.get("run_id", ""),
        "baseline_created": base.get("created", ""),
        "config_changes": config_diff(base.get("config", {}), current.get("config", {})),
        "models": {},
    }
    for name in sorted(set(base["models"]) | set(current["models"])):
        old, new = base["models"].get(name), current["models"].get(name)
        if old is None or new is None:
            out["models"][name] = {"status": "new" if old is None else "removed"}
            continue
        rows = []
        for image_id in sorted(set(old["predictions"]) | set(new["predictions"])):
            row = compare_predictions(old["predictions"].get(image_id, []),
                                      new["predictions"].get(image_id, []))  # fmt: skip
            row["id"] = image_id
            row["maps"] = {}
            old_maps, new_maps = old["maps"].get(image_id, {}), new["maps"].get(image_id, {})
            for method in sorted(set(old_maps) & set(new_maps)):
                corr = map_correlation(decode_map(old_maps[method]["map"]),
                                       decode_map(new_maps[method]["map"]))  # fmt: skip
                row["maps"][method] = corr
            rows.append(row)
        pearsons = [c["pearson"] for r in rows for c in r["maps"].values()
                    if c["pearson"] is not None]  # fmt: skip
        out["models"][name] = {
            "status": "compared",
            "sha256": {"before": old.get("sha256", ""), "after": new.get("sha256", ""),
                       "changed": old.get("sha256", "") != new.get("sha256", "")},
            "config_changes": config_diff(old.get("config", {}), new.get("config", {})),
            "images": rows,
            "top1_changed": sum(1 for r in rows if r["changed"]),
            "min_pearson": min(pearsons) if pearsons else None,
            "methods": sorted({m for r in rows for m in r["maps"]}),
        }  # fmt: skip
    return out


# --------------------------------------------------------------------------- runs index


INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} · audit runs</title>
<style>{{ css }}</style></head>
<body><main>
<div class="pagehead"><h1>{{ title }}: audit runs</h1>
<p class="lead">{{ runs | length }} stamped run{{ '' if runs | length == 1 else 's' }}, newest
first. Each keeps its own report; the per-image artifacts are shared.</p></div>
<div class="tablewrap"><table class="data sortable runs">
<thead><tr><th>Run</th><th>Date</th><th>Models</th><th>Images</th><th>Failures</th>
<th>Compared with</th></tr></thead>
<tbody>
{% for r in runs %}<tr>
<td><a href="{{ r.report }}"><b>{{ r.run_id }}</b></a></td><td>{{ r.created }}</td>
<td>{% for m in r.models %}{{ m.name }}
<span class="small">sha256 {{ m.sha256[:12] }}</span>{% if not loop.last %}<br>{% endif %}
{% endfor %}</td>
<td>{{ r.images }}</td><td>{{ r.failures }}</td>
<td>{% if r.baseline %}{{ r.baseline }}{% if r.changes is not none %}
<span class="small">({{ r.changes }})</span>{% endif %}{% else %}—{% endif %}</td>
</tr>{% else %}<tr><td colspan="6">No stamped runs yet.</td></tr>{% endfor %}
</tbody></table></div>
</main></body></html>
"""


def _changes(audit_path: Path) -> str | None:
    if not audit_path.exists():
        return None
    data = json.loads(audit_path.read_text(encoding="utf-8"))
    models = [m for m in data.get("models", {}).values() if m.get("status") == "compared"]
    checksums = sum(1 for m in models if m["sha256"]["changed"])
    top1 = sum(m["top1_changed"] for m in models)
    return (f"{checksums} checksum change{'' if checksums == 1 else 's'}, "
            f"{top1} top-1 change{'' if top1 == 1 else 's'}")  # fmt: skip


def runs_table(runs_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for run_id in reversed(available_runs(runs_dir)):
        snap = json.loads((runs_dir / run_id / "snapshot.json").read_text(encoding="utf-8"))
        models = [{"name": n, "sha256": m.get("sha256", "")} for n, m in snap["models"].items()]
        failures = len(snap.get("failed", [])) + sum(
            len(m.get("failed", [])) for m in snap["models"].values()
        )
        rows.append({"run_id": run_id, "created": snap.get("created", ""),
                     "report": snap.get("report", f"{run_id}/report/index.html"),
                     "models": models, "images": len(snap.get("images", [])),
                     "failures": failures, "baseline": snap.get("baseline", ""),
                     "changes": _changes(runs_dir / run_id / "audit.json")})  # fmt: skip
    return rows


def write_runs_index(runs_dir: str | Path, out: str | Path, title: str = "cnnviz") -> Path:
    """`{output}/runs/index.html`: every stamped run with its date, models, images, failures."""
    from jinja2 import Environment

    from .artifacts import write_with
    from .report.builder import assets

    runs_dir = Path(runs_dir)
    css, _ = assets()
    html = (
        Environment(autoescape=True)
        .from_string(INDEX)
        .render(runs=runs_table(runs_dir), title=title, css=css)
    )
    return write_with(Path(out), lambda tmp: tmp.write_text(html, encoding="utf-8"))
