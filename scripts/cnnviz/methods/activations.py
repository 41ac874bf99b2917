"""Intermediate activations (seed part 1): every conv layer's output, channel by channel.

One ONNX Runtime session exposes all requested layer tensors as extra graph outputs, so a single
forward pass per batch yields every layer. Per image and layer we keep three numbers:

- blank_fraction: the share of channels that are *blank* for this image. A channel is blank when
  its largest absolute activation over all positions is <= eps (absolute; 1e-6 by default,
  configurable). After a ReLU that means the channel never fired; for a layer without an
  activation it means the channel is zero everywhere. An absolute threshold keeps the verdict
  about one channel independent of the other channels in its layer.
- mean: the mean activation over channels and positions.
- max: the largest activation.

The seed's observation is that deeper layers are sparser: more channels are blank for a given
image. `sparsity_plot` draws exactly that, blank fraction against layer depth.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..artifacts import read_json, write_json
from ..errors import ConfigError
from ..failures import check_input, failure_of
from ..graph import expose
from ..images import failure_recorder, read_manifest, shard_batches
from ..modelcard import find_layer, load_card, model_path
from ..render import BLANK_EPS, is_blank, save_figure, save_grid_png
from ..runtime import make_session, run_batched

Layers = str | Sequence[str]
CHANNEL_SIDE = 224  # single-channel views are enlarged to at least this many pixels


def select_layers(card: dict[str, Any], layers: Layers = "all") -> list[dict[str, Any]]:
    """Layer-table rows for "all" or a list of names, in graph order, without repeats."""
    if isinstance(layers, str):
        if layers != "all":
            layers = [layers]
        else:
            return list(card["layers"])
    wanted = {find_layer(card, name)["name"] for name in layers}
    return [row for row in card["layers"] if row["name"] in wanted]


def layer_session(
    model: onnx.ModelProto,
    rows: Sequence[dict[str, Any]],
    device: str = "auto",
    threads: int | None = None,
) -> ort.InferenceSession:
    """One session whose outputs include every row's tensor."""
    return make_session(expose(model, [row["tensor"] for row in rows]), device, threads)


def run_layers(
    session: ort.InferenceSession,
    card: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    batch: np.ndarray,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """{layer name: float32 [N, C, H, W]} for a preprocessed batch [N, 3, H, W]."""
    tensors = [row["tensor"] for row in rows]
    outs = run_batched(session, {card["input"]["name"]: batch}, tensors, batch_size)
    return {row["name"]: out for row, out in zip(rows, outs, strict=True)}


def extract(
    model: onnx.ModelProto,
    card: dict[str, Any],
    batch: np.ndarray,
    layers: Layers = "all",
    device: str = "auto",
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """{layer name: [N, C, H, W]} for `layers` ("all" or names), from one session."""
    rows = select_layers(card, layers)
    session = layer_session(model, rows, device)
    return run_layers(session, card, rows, np.asarray(batch, dtype=np.float32), batch_size)


Grids = str | dict[str, int] | Sequence[str]


def grid_layers(rows: Sequence[dict[str, Any]], grids: Grids = "all") -> list[str]:
    """The layers (of `rows`, graph order) whose channel grid is drawn per image: "all";
    {"spread": k}: k layers spread from shallow to deep (the first and the last among them);
    or a list of names. The workflow turns the config's `auto` into one of these (all layers up
    to `activations.grids_all_up_to` images in the run, else `grids_spread` of them)."""
    names = [row["name"] for row in rows]
    if grids == "all":
        return names
    if isinstance(grids, dict):
        if set(grids) != {"spread"} or int(grids["spread"]) < 0:
            raise ConfigError(f"activations.grids: {grids!r}; use all, auto or layer names")
        count = min(int(grids["spread"]), len(names))
        picks = np.linspace(0, len(names) - 1, count).round().astype(int) if count else []
        return list(dict.fromkeys(names[p] for p in picks))
    if isinstance(grids, str):
        grids = [grids]
    unknown = [g for g in grids if g not in names]
    if unknown:
        raise ConfigError(f"activations.grids: {unknown} are not among the layers "
                          f"(activations.layers); known: {', '.join(names)}")
    return [n for n in names if n in set(grids)]


def layer_stats(act: np.ndarray, eps: float = BLANK_EPS) -> dict[str, float]:
    """blank_fraction / mean / max of one image's activation [C, H, W] (module docstring)."""
    return {
        "blank_fraction": float(is_blank(act, eps).mean()),
        "mean": float(act.mean()),
        "max": float(act.max()),
    }


class _Progress:
    """Images done / total and rate on stderr, at most every `every` seconds (and at the end)."""

    def __init__(self, label: str, total: int, every: float = 10.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(f"{self.label}: {done}/{self.total} images, {rate:.2f} img/s", file=sys.stderr)


def _check_channels(
    channels: dict[str, Sequence[int]], rows: Sequence[dict[str, Any]]
) -> dict[str, list[int]]:
    checked = {}
    by_name = {row["name"]: row for row in rows}
    for layer, wanted in channels.items():
        row = by_name[layer]
        count = int(row["shape"][0])
        bad = [c for c in wanted if not 0 <= int(c) < count]
        if bad:
            raise ConfigError(
                f"activations.channels: layer {layer!r} has channels 0..{count - 1}; "
                f"{bad} are out of range"
            )
        checked[layer] = [int(c) for c in wanted]
    return checked


def activations_shard(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    layers: Layers = "all",
    channels: dict[str, Sequence[int]] | None = None,
    device: str = "auto",
    batch_size: int = 4,
    blank_eps: float = BLANK_EPS,
    threads: int | None = None,
    grids: Grids = "all",
) -> dict[str, Any]:
    """Channel grids, chosen single channels and per-layer stats for one shard of images.

    Writes `out_dir/{image_id}/{layer}.png` (all channels) for the layers `grids` names (see
    `grid_layers`), `out_dir/{image_id}/{layer}_ch{c}.png` for each channel in
    `channels[layer]`, and the stats of every layer in `out_dir/{shard}.json` (its "grids" lists
    the drawn layers). Images are run `batch_size` at a time, so memory holds one batch's
    activations, not the shard's.
    """
    eps = blank_eps
    card = load_card(model_dir)
    model = onnx.load(str(model_path(model_dir, card)))
    channels = {find_layer(card, k)["name"]: v for k, v in (channels or {}).items()}
    rows = select_layers(card, layers)
    extra = set(channels) - {row["name"] for row in rows}
    if extra:
        rows = select_layers(card, [row["name"] for row in rows] + sorted(extra))
    channels = _check_channels(channels, rows)
    drawn = set(grid_layers(rows, grids))
    session = layer_session(model, rows, device, threads)

    out_dir = Path(out_dir)
    manifest = Path(manifest)
    shard = read_manifest(manifest)
    failed = list(shard["failed"])
    entries = shard["images"]
    progress = _Progress(f"activations {card.get('name', '')} {manifest.stem}", len(entries))
    images: list[dict[str, Any]] = []
    done = 0
    record = failure_recorder(failed)
    for ids, inputs in shard_batches(entries, card["preprocess"], batch_size, record):
        acts = run_layers(session, card, rows, inputs, batch_size)
        for n, image_name in enumerate(ids):
            stats = {}
            for row in rows:
                act = acts[row["name"]][n]
                stats[row["name"]] = layer_stats(act, eps)
                folder = out_dir / image_name
                if row["name"] in drawn:
                    save_grid_png(folder / f"{row['name']}.png", act, eps=eps)
                for c in channels.get(row["name"], []):
                    path = folder / f"{row['name']}_ch{c}.png"
                    save_grid_png(path, act[c], eps=eps, min_side=CHANNEL_SIDE)
            images.append({"id": image_name, "layers": stats})
        del acts
        done += len(ids)
        progress.update(done)
    progress.update(len(entries))
    data = {
        "model": card.get("name", Path(model_dir).name),
        "eps": eps,
        "layers": [
            {
                "name": row["name"],
                "depth": int(row.get("depth", i)),
                "shape": list(row["shape"]),
                "tensor": row["tensor"],
                "activation": row.get("activation"),
            }
            for i, row in enumerate(rows)
        ],
        "channels": channels,
        "grids": [row["name"] for row in rows if row["name"] in drawn],
        "images": images,
        "failed": failed,
    }
    write_json(out_dir / f"{manifest.stem}.json", data)
    return data


def sparsity_plot(stats_jsons: Sequence[str | Path], out_png: str | Path) -> Path:
    """Blank fraction against layer depth: one thin line per image, the mean over images thick.

    `stats_jsons` are shard stats files, or folders holding them (every *.json directly inside).
    """
    from matplotlib.figure import Figure

    layers: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    model = ""
    files: list[Path] = []
    entries = [Path(p) for p in stats_jsons]
    usable = [entry for entry in entries if failure_of(entry) is None]
    if entries and not usable:
        check_input(entries[0], "every activations job")
    for entry in usable:
        files.extend(sorted(entry.glob("*.json")) if entry.is_dir() else [entry])
    for path in files:
        data = read_json(path)
        if "layers" not in data or "images" not in data:
            continue
        layers = layers or data["layers"]
        model = model or data.get("model", "")
        images.extend(data["images"])
    depth = np.array([row["depth"] for row in layers], dtype=float)
    names = [row["name"] for row in layers]
    curves = np.array(
        [[img["layers"].get(n, {}).get("blank_fraction", np.nan) for n in names] for img in images]
    ).reshape(len(images), len(names))
    # Blank means "never fired": meaningful after a ReLU-like activation. Linear layers (e.g.
    # MobileNet's projection convs) are almost never blank and would zig-zag the curve.
    gated = np.array([row.get("activation", "Relu") is not None for row in layers], dtype=bool)
    linear_note = ""
    if gated.any() and not gated.all():
        linear_note = f"{int((~gated).sum())} layer(s) without an activation not plotted"
        depth, curves = depth[gated], curves[:, gated]
        names = [n for n, g in zip(names, gated, strict=True) if g]

    figure = Figure(figsize=(8, 4.6), dpi=100)
    axes = figure.add_subplot()
    for n, curve in enumerate(curves):
        label = "single images" if n == 0 else None
        axes.plot(depth, curve, color="tab:blue", linewidth=0.7, alpha=0.4, label=label)
    if len(curves):
        axes.plot(
            depth, np.nanmean(curves, axis=0), color="black", linewidth=2.5,
            label=f"mean over {len(curves)} image(s)",
        )  # fmt: skip
        axes.legend(loc="upper left", title=linear_note or None, title_fontsize=8)
    else:
        axes.text(0.5, 0.5, "no images", ha="center", va="center", transform=axes.transAxes)
    if len(depth):
        step = max(1, int(np.ceil(len(depth) / 8)))
        ticks = list(range(0, len(depth), step))
        if ticks[-1] != len(depth) - 1:
            if len(ticks) > 1 and len(depth) - 1 - ticks[-1] < step / 2:
                ticks.pop()  # too close to the last layer's label
            ticks.append(len(depth) - 1)
        axes.set_xticks(
            depth[ticks], [f"{names[i]} ({int(depth[i])})" for i in ticks],
            rotation=25, ha="right", fontsize=7,
        )  # fmt: skip
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("conv layer (depth), input to output")
    axes.set_ylabel("fraction of blank channels")
    axes.set_title(f"{model}: blank channels vs depth".strip(": "))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(out_png, figure)
