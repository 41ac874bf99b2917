"""The HTML report: an index page and one page per model, built from whatever results exist.

Each model page is a list of sections. A section builder looks at the results folder and returns
`Section`s (or nothing, when its results are absent); each section is drawn by one small partial
template. A new method plugs in by adding a builder to SECTION_BUILDERS (and a partial); result
folders no builder claims still appear, as a plain gallery, so no picture is ever left out.

Pictures are referenced by relative links (os.path.relpath from the report folder), nothing is
copied except small thumbnails, and no JavaScript is needed: the report opens from disk and keeps
working when the results folder is moved or zipped whole.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..artifacts import read_json, write_with
from ..errors import ImageError

TEMPLATES = Path(__file__).parent / "templates"
PACKAGES = (
    ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")),
    ("onnx", ("onnx",)),
    ("numpy", ("numpy",)),
    ("pillow", ("pillow",)),
    ("matplotlib", ("matplotlib",)),
    ("jinja2", ("jinja2",)),
    ("scikit-image", ("scikit-image",)),
)

# One line per method folder: how to read its pictures (used by the generic gallery).
METHOD_NOTES = {
    "gradcam": "Grad-CAM: bright regions raised the class score most (last conv layer).",
    "saliency": "Gradient saliency: |d class score / d pixel|; bright pixels matter most.",
    "guided": "Guided backpropagation: positive evidence for the class, at pixel resolution.",
    "deconvnet": "Deconvnet projection of a hidden feature back to pixel space.",
    "occlusion": "Occlusion: drop in class probability when a patch is covered.",
    "filters": "Filter visualization: an input optimized to excite one filter.",
    "atlas": "Feature atlas: the images that excite each channel most.",
}


STEP_NAMES = {"shards": "staging", "predictions": "predictions", "activations": "activations"}


@dataclass
class Figure:
    """One picture on the page, with a one-line caption saying how to read it."""

    src: str
    caption: str
    href: str | None = None  # link target (e.g. the full-size picture); src when None


@dataclass
class Section:
    """A block of a model page, drawn by `templates/{template}` with `section` in scope."""

    id: str
    title: str
    template: str
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class ModelContext:
    """What a section builder may look at for one model."""

    name: str
    results_dir: Path
    out_dir: Path
    card: dict[str, Any] | None
    images: dict[str, dict[str, Any]]  # image id -> {"source", "thumb", "full"}
    config: dict[str, Any]
    provenance: dict[str, Any]
    claimed: set[str] = field(default_factory=set)  # folders of results/{model}/ already shown

    @property
    def model_dir(self) -> Path:
        return self.results_dir / self.name

    def href(self, path: str | Path) -> str:
        """A URL for `path`, relative to the report folder."""
        return relative_href(path, self.out_dir)


def relative_href(path: str | Path, out_dir: Path) -> str:
    """A URL-quoted relative link from the report folder `out_dir` to `path`."""
    rel = os.path.relpath(Path(path).resolve(), out_dir.resolve())
    return quote(Path(rel).as_posix())


SectionBuilder = Callable[[ModelContext], "Section | list[Section] | None"]


# --------------------------------------------------------------------------- sections


def predictions_section(ctx: ModelContext) -> Section | None:
    folder = ctx.model_dir / "predictions"
    files = sorted(folder.glob("*.json"))
    if not files:
        return None
    ctx.claimed.add("predictions")
    rows = []
    for path in files:
        for entry in read_json(path).get("images", []):
            image = ctx.images.get(entry["id"], {})
            rows.append(
                {
                    "id": entry["id"],
                    "source": image.get("source", ""),
                    "thumb": image.get("thumb"),
                    "full": image.get("full"),
                    "top": [
                        {**t, "percent": f"{100.0 * float(t['prob']):.1f}%"}
                        for t in entry.get("top", [])
                    ],
                }
            )
    k = max((len(r["top"]) for r in rows), default=0)
    return Section(
        "predictions",
        "Predictions",
        "_predictions.html",
        {"rows": rows, "k": k},
        note=f"The model's top-{k} classes per image with their probabilities; the thumbnail "
        "links to the image as staged (before resizing and cropping).",
    )


def activations_section(ctx: ModelContext) -> Section | None:
    folder = ctx.model_dir / "activations"
    if not folder.is_dir():
        return None
    ctx.claimed.add("activations")
    stats_files = [
        p for p in sorted(folder.rglob("*.json")) if not any(q.startswith(".") for q in p.parts)
    ]
    layers: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    shown: set[Path] = set()
    eps = None
    for path in stats_files:
        data = read_json(path)
        if "layers" not in data or "images" not in data:
            continue
        layers = layers or data["layers"]
        eps = data.get("eps", eps)
        for entry in data["images"]:
            image_dir = path.parent / entry["id"]
            figures, channel_figures = _activation_figures(ctx, image_dir, entry, data["layers"])
            shown.update(image_dir.glob("*.png"))
            per_image.append({"id": entry["id"], "layers": figures, "channels": channel_figures})
    sparsity = []
    for plot in sorted(folder.rglob("sparsity*.png")):
        shown.add(plot)
        sparsity.append(
            Figure(
                ctx.href(plot),
                "Fraction of blank channels (never above eps for this image) per conv layer, "
                "shallow to deep; thin lines: single images, thick: their mean.",
            )
        )
    others = [
        Figure(
            ctx.href(p),
            f"{p.relative_to(folder).as_posix()}: an activation picture "
            "that no stats file describes (left over from an earlier run?).",
        )
        for p in sorted(folder.rglob("*.png"))
        if p not in shown
    ]
    return Section(
        "activations",
        "Activations",
        "_activations.html",
        {"layers": layers, "images": per_image, "sparsity": sparsity, "others": others,
         "eps": eps},
        note="Every conv layer's output for each image, one tile per channel in row-major order "
        "(channel 0 top left), each tile scaled to its own min..max (viridis: dark purple = "
        "low, yellow = high). Hatched grey tiles are blank channels: zero everywhere.",
    )  # fmt: skip


def _activation_figures(
    ctx: ModelContext, image_dir: Path, entry: dict[str, Any], layers: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Figure]]:
    figures = []
    stats = entry.get("layers", {})
    for row in layers:
        grid = image_dir / f"{row['name']}.png"
        if not grid.exists():
            continue
        s = stats.get(row["name"], {})
        shape = "x".join(str(v) for v in row.get("shape", []))
        blank = s.get("blank_fraction")
        blank_text = f"{100 * blank:.0f}% blank" if blank is not None else "no stats"
        figures.append(
            {
                "name": row["name"],
                "depth": row.get("depth"),
                "blank": blank_text,
                "figure": Figure(
                    ctx.href(grid),
                    f"{row['name']} (depth {row.get('depth')}, {shape}): all channels for "
                    f"{entry['id']}; {blank_text}, max {s.get('max', float('nan')):.3g}.",
                ),
            }
        )
    channel_figures = [
        Figure(
            ctx.href(p),
            f"{p.stem.rsplit('_ch', 1)[0]}, channel {p.stem.rsplit('_ch', 1)[1]} for "
            f"{entry['id']}, enlarged (viridis, own min..max).",
        )
        for p in sorted(image_dir.glob("*_ch*.png"), key=_channel_key)
    ]
    return figures, channel_figures


def _channel_key(path: Path) -> tuple[str, int]:
    layer, _, channel = path.stem.rpartition("_ch")
    return layer, int(channel) if channel.isdigit() else -1


def gallery_sections(ctx: ModelContext) -> list[Section]:
    """Any other result folder of the model: its pictures, grouped by subfolder."""
    sections = []
    if not ctx.model_dir.is_dir():
        return sections
    for folder in sorted(p for p in ctx.model_dir.iterdir() if p.is_dir()):
        if folder.name in ctx.claimed or folder.name.startswith("."):
            continue
        pictures = sorted(folder.rglob("*.png"))
        if not pictures:
            continue
        ctx.claimed.add(folder.name)
        note = METHOD_NOTES.get(folder.name, f"Pictures written by the {folder.name} step.")
        figures = [Figure(ctx.href(p), _gallery_caption(ctx, folder, p, note)) for p in pictures]
        sections.append(
            Section(f"m-{folder.name}", folder.name, "_gallery.html", {"figures": figures}, note)
        )
    return sections


def _gallery_caption(ctx: ModelContext, folder: Path, picture: Path, note: str) -> str:
    """ "{method}: image ..., class ... (label), layer ...", from the JSON beside the PNG if any."""
    info_path = picture.with_suffix(".json")
    info = read_json(info_path) if info_path.exists() else {}
    if not isinstance(info, dict) or "image" not in info:
        return f"{folder.name}: {picture.relative_to(folder).with_suffix('').as_posix()}. {note}"
    parts = [f"image {info['image']}"]
    if "target" in info:
        labels = (ctx.card or {}).get("labels", [])
        target = int(info["target"])
        label = f" ({labels[target]})" if 0 <= target < len(labels) else ""
        parts.append(f"class {target}{label}")
    if "layer" in info:
        parts.append(f"layer {info['layer']}")
    return f"{info.get('method', folder.name)}: {', '.join(parts)}. {note}"


def failed_section(ctx: ModelContext) -> Section | None:
    """Images that could not be used, from the staging manifests and this model's steps."""
    seen: set[tuple[str, str]] = set()
    rows = []
    sources = [ctx.results_dir / "images" / "shards"]
    sources += [ctx.model_dir / step for step in ("predictions", "activations")]
    for folder in sources:
        for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
            for item in read_json(path).get("failed", []) or []:
                key = (str(item.get("source", "")), str(item.get("error", "")))
                if key not in seen:
                    seen.add(key)
                    rows.append(
                        {"source": key[0], "error": key[1], "step": STEP_NAMES[folder.name]}
                    )
    if not rows:
        return None
    return Section(
        "failed", "Failed images", "_failed.html", {"rows": rows},
        note="These inputs were skipped; the reason says what to fix. The other images ran.",
    )  # fmt: skip


def provenance_section(ctx: ModelContext) -> Section:
    card = ctx.card or {}
    checksum = card.get("sha256")
    onnx_file = ctx.results_dir / "models" / ctx.name / card.get("onnx", "model.onnx")
    check = "model file missing"
    if onnx_file.exists() and checksum:
        check = "matches the file" if _sha256(onnx_file) == checksum else "DOES NOT match the file"
    model_rows = [
        ("name", card.get("name", ctx.name)),
        ("source", card.get("source", "unknown")),
        ("weights", card.get("weights", "unknown")),
        ("sha256", f"{checksum or 'unknown'} ({check})"),
        ("opset", card.get("opset", "")),
        ("input", _describe_io(card.get("input"))),
        ("output", _describe_io(card.get("output"))),
        ("conv layers", len(card.get("layers", []))),
        ("verification", _describe_verification(card.get("verification"))),
        ("exporter", ", ".join(f"{k} {v}" for k, v in (card.get("exporter") or {}).items())),
        ("exported", card.get("created", "")),
    ]
    return Section(
        "provenance", "Provenance", "_provenance.html",
        {"model": [(k, str(v)) for k, v in model_rows if v not in ("", None)],
         "run": run_rows(ctx.provenance), "config": config_yaml(ctx.config),
         "card_missing": ctx.card is None},
        note="What produced this page: the model file, the software and the config as run.",
    )  # fmt: skip


SECTION_BUILDERS: list[SectionBuilder] = [
    predictions_section,
    activations_section,
    gallery_sections,
    failed_section,
    provenance_section,
]


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe_io(io: dict[str, Any] | None) -> str:
    if not io:
        return ""
    parts = [str(io.get("name", ""))]
    if "shape" in io:
        parts.append("[" + ", ".join(map(str, io["shape"])) + "]")
    for key in ("dtype", "kind", "num_classes"):
        if key in io:
            parts.append(f"{key} {io[key]}")
    return " ".join(parts)


def _describe_verification(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    text = f"against {v.get('reference', '?')} on {v.get('image', '?')}"
    if "max_abs_diff" in v:
        text += f": max |diff| {v['max_abs_diff']:.3g} (tolerance {v.get('tolerance', '?')})"
    return text


def package_versions() -> dict[str, str]:
    from .. import __version__

    versions = {"python": platform.python_version(), "cnnviz": __version__}
    for label, dists in PACKAGES:
        for dist in dists:
            try:
                versions[label] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions[label] = "not installed"
    return versions


def run_rows(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """Date, duration and package versions of the run, then any other provenance given."""
    rows = [("date", str(provenance.get("date", time.strftime("%Y-%m-%dT%H:%M:%S%z"))))]
    duration = provenance.get("duration_s", provenance.get("duration"))
    if duration is not None:
        rows.append(("duration", _format_duration(duration)))
    versions = {**package_versions(), **(provenance.get("versions") or {})}
    rows += [(name, str(v)) for name, v in versions.items()]
    skip = {"date", "duration", "duration_s", "versions"}
    rows += [(str(k), str(v)) for k, v in provenance.items() if k not in skip]
    return rows


def _format_duration(value: Any) -> str:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def config_yaml(config: dict[str, Any]) -> str:
    if not config:
        return "(not recorded)"
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _staged_images(results_dir: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """image id -> source, full-size link and a thumbnail (written under out_dir/thumbs)."""
    from ..render import thumbnail

    images: dict[str, dict[str, Any]] = {}
    shards = results_dir / "images" / "shards"
    entries = []
    for path in sorted(shards.glob("*.json")) if shards.is_dir() else []:
        entries.extend(read_json(path).get("images", []))
    staged = results_dir / "images"
    known = {e["id"]: e for e in entries}
    for png in sorted(staged.glob("*.png")) if staged.is_dir() else []:
        known.setdefault(png.stem, {"id": png.stem, "source": ""})
    for image_name, entry in known.items():
        full = staged / f"{image_name}.png"
        if not full.exists():
            continue
        thumb = out_dir / "thumbs" / f"{image_name}.png"
        try:
            if not thumb.exists() or thumb.stat().st_mtime < full.stat().st_mtime:
                thumbnail(full, thumb)
        except ImageError:
            thumb = full
        images[image_name] = {
            "source": entry.get("source", ""),
            "thumb": relative_href(thumb, out_dir),
            "full": relative_href(full, out_dir),
        }
    return images


def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def model_sections(ctx: ModelContext, builders: Iterable[SectionBuilder]) -> list[Section]:
    sections: list[Section] = []
    for builder in builders:
        made = builder(ctx)
        if made is None:
            continue
        sections.extend(made if isinstance(made, list) else [made])
    return sections


# --------------------------------------------------------------------------- entry point


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
    models: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    index: str | Path | None = None,
) -> Path:
    """Write out_dir/index.html and out_dir/{model}.html for each model; returns the index path.

    `index` (a file path) may be given instead of `out_dir`; the model pages go beside it.
    `models` defaults to every folder under results/models/.
    """
    results_dir = Path(results_dir)
    if index is not None:
        index_path = Path(index)
        out_dir = index_path.parent
    else:
        out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
        index_path = out_dir / "index.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or {}
    provenance = dict(provenance or {})
    if models is None:
        models_root = results_dir / "models"
        found = models_root.iterdir() if models_root.is_dir() else []
        models = sorted(p.name for p in found if p.is_dir())

    env = _environment()
    images = _staged_images(results_dir, out_dir)
    summaries = []
    for name in models:
        card_path = results_dir / "models" / name / "model.json"
        card = read_json(card_path) if card_path.exists() else None
        ctx = ModelContext(name, results_dir, out_dir, card, images, config, provenance)
        sections = model_sections(ctx, SECTION_BUILDERS)
        page = f"{name}.html"
        html = env.get_template("model.html").render(
            title=f"cnnviz: {name}", model=name, card=card or {}, sections=sections,
            index_href=quote(os.path.relpath(index_path, out_dir)),
        )  # fmt: skip
        _write_text(out_dir / page, html)
        summaries.append(
            {
                "name": name,
                "href": quote(page),
                "source": (card or {}).get("source", "no model.json"),
                "weights": (card or {}).get("weights", ""),
                "sections": [s.title for s in sections if s.id != "provenance"],
                "failed": next((len(s.data["rows"]) for s in sections if s.id == "failed"), 0),
            }
        )
    html = env.get_template("index.html").render(
        title="cnnviz report", models=summaries, images=len(images),
        run=run_rows(provenance), config=config_yaml(config),
    )  # fmt: skip
    return _write_text(index_path, html)


def _write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
