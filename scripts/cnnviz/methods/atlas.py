"""The feature atlas (seed part 2 at dataset scale; Zeiler & Fergus 2014, fig. 2).

For a layer, each shown channel's k strongest activations over all the run's images (one per
image: "each cell is a different training sample"), each as its deconvnet projection beside the
image patch under the unit's receptive field. A map-reduce, so it scales to many images:

- map (per shard): one forward session exposing the layers; images in batches of `batch_size`;
  per image and channel its strongest unit; a per-channel top-k kept across batches. Writes
  `shards/{shard}.json`: per layer, per channel at most k entries [value, pre, image, y, x].
- reduce (per model): merges the shard files one at a time into the global top-k, picks the
  channels to show (most active, most selective - see `selectivity` - first, or named), loads
  only the winning images, projects each winner alone (under `atlas.policy`:
  projection_policy; seeded with its value at its position), crops projection and image to the
  unit's receptive field (`cnnviz.receptive`) and tiles them: per channel a grid of projections
  and a grid of patches side by side. Writes `{layer}.png` + `{layer}.json`, and per shown
  channel a strip `{layer}/ch{c:04d}.png` (rank j's projection above its patch in column j) for
  the report's page of the layer, which links each column to its image.

Order (a total order, so the merge of shards is the top-k of all images, whatever the sharding):
value descending, then the pre-activation descending (a ReLU6 layer saturates at exactly 6: its
conv output still ranks the tied units), then image id, then position (y, x). Within one image
a channel's unit is chosen by the same keys. Memory is bounded by the batch (map) and by
channels x k (reduce), never by the number of images.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..artifacts import read_json, write_json, write_with
from ..errors import ConfigError, ImageError, ModelError
from ..failures import check_input, failure_of, upstream_message
from .projection_policy import resolve as resolve_policy

log = logging.getLogger("cnnviz.atlas")

FORMAT = "cnnviz.atlas.shard/1"
CHANNEL_MODES = ("most_active", "most_selective", "first")
CELL = 48  # px per projection / patch tile
SEP = 1  # px between tiles
GAP = 6  # px between a channel's projections and its patches
MARGIN = 10  # px between channel blocks
LABEL_H = 13  # px of text above a block
EMPTY = (232, 232, 232)  # an unused cell (fewer than k images)


# ---- the running top-k ---------------------------------------------------------------------
@dataclass
class TopK:
    """Per channel the k best (value, pre, image id, y, x), best first; `filled` marks real ones."""

    value: np.ndarray  # [C, k] float64
    pre: np.ndarray  # [C, k] float64
    image: np.ndarray  # [C, k] str
    y: np.ndarray  # [C, k] int64
    x: np.ndarray  # [C, k] int64
    filled: np.ndarray  # [C, k] bool

    @classmethod
    def empty(cls, channels: int, k: int) -> TopK:
        shape = (channels, k)
        return cls(np.full(shape, -np.inf), np.full(shape, -np.inf), np.full(shape, ""),
                   np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, bool))

    @property
    def channels(self) -> int:
        return self.value.shape[0]

    @property
    def k(self) -> int:
        return self.value.shape[1]

    def push(self, other: TopK) -> None:
        """Keep the k best of self and `other` (same channels) per channel, in the atlas order."""
        if other.channels != self.channels:
            raise ModelError(f"top-k of {other.channels} channels merged into {self.channels}")
        both = {name: np.concatenate([getattr(self, name), getattr(other, name)], axis=1)
                for name in ("value", "pre", "image", "y", "x", "filled")}
        order = np.lexsort((both["x"], both["y"], both["image"], -both["pre"], -both["value"],
                            ~both["filled"]), axis=1)[:, : self.k]
        for name, array in both.items():
            setattr(self, name, np.take_along_axis(array, order, axis=1))

    def entries(self, channel: int) -> list[dict[str, Any]]:
        keep = self.filled[channel]
        return [{"image": str(i), "value": float(v), "pre": float(p), "position": [int(a), int(b)]}
                for v, p, i, a, b in zip(self.value[channel][keep], self.pre[channel][keep],
                                         self.image[channel][keep], self.y[channel][keep],
                                         self.x[channel][keep], strict=True)]

    def to_json(self, ids: Sequence[str]) -> list[list[list]]:
        """Per channel [[value, pre, image index into `ids`, y, x], ...] (filled entries only)."""
        index = {image_id: i for i, image_id in enumerate(ids)}
        return [[[float(v), float(p), index[str(i)], int(a), int(b)]
                 for v, p, i, a, b, f in zip(self.value[c], self.pre[c], self.image[c],
                                             self.y[c], self.x[c], self.filled[c], strict=True)
                 if f] for c in range(self.channels)]  # fmt: skip

    @classmethod
    def from_json(cls, channels: list[list[list]], ids: Sequence[str], k: int) -> TopK:
        top = cls.empty(len(channels), k)
        counts = np.array([min(len(entries), k) for entries in channels], np.int64)
        rows = [row for entries in channels for row in entries[:k]]
        if not rows:
            return top
        flat = np.array(rows, dtype=np.float64)  # float64 holds the float32 values exactly
        c = np.repeat(np.arange(len(channels)), counts)
        j = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        top.value[c, j], top.pre[c, j] = flat[:, 0], flat[:, 1]
        top.y[c, j], top.x[c, j] = flat[:, 3].astype(np.int64), flat[:, 4].astype(np.int64)
        top.filled[c, j] = True
        names = np.asarray(list(ids), dtype=str)
        top.image = np.full((len(channels), k), "", dtype=names.dtype)  # wide enough for ids
        top.image[c, j] = names[flat[:, 2].astype(np.int64)]
        return top


def unit_maxima(act: np.ndarray, pre: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per image and channel of [N, C, h, w] its strongest unit: (value, pre, y, x), each [N, C].

    Strongest: the largest activation, then the largest pre-activation (`pre`, same shape) among
    the tied units, then the first in raster order. Non-finite values never win.
    """
    n, c, h, w = act.shape
    flat = act.reshape(n, c, h * w).astype(np.float64)
    flat = np.where(np.isfinite(flat), flat, -np.inf)
    rank = flat if pre is None else pre.reshape(n, c, h * w).astype(np.float64)
    peak = flat.max(axis=2, keepdims=True)
    tied = flat == peak
    score = np.where(tied & np.isfinite(rank), rank, -np.inf)  # pre-activation of tied units
    best = score.max(axis=2, keepdims=True)
    where = np.argmax(tied & (score == best), axis=2)  # first in raster order among the best
    value = peak[..., 0]
    pre_at = np.take_along_axis(rank, where[..., None], axis=2)[..., 0]
    pre_at = np.where(np.isfinite(pre_at), pre_at, value)  # a NaN conv output: rank by value
    return value, pre_at, where // w, where % w


def batch_topk(ids: Sequence[str], act: np.ndarray, pre: np.ndarray | None, k: int) -> TopK:
    """The k best of one batch ([N, C, h, w]; one candidate per image and channel)."""
    value, pre_at, y, x = unit_maxima(act, pre)
    channels = act.shape[1]
    images = np.broadcast_to(np.asarray(list(ids), dtype=str)[:, None], value.shape)
    top = TopK(value.T.copy(), pre_at.T.copy(), images.T.copy(), y.T.copy(), x.T.copy(),
               np.isfinite(value).T.copy())
    result = TopK.empty(channels, k)
    result.push(top)
    return result


# ---- layers and options --------------------------------------------------------------------
def atlas_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The config's atlas section with defaults filled in and checked."""
    from ..config import section_defaults

    merged = {**section_defaults("atlas"), **(options or {})}
    if int(merged["top_k"]) < 1 or int(merged["count"]) < 1:
        raise ConfigError(f"atlas: top_k and count must be >= 1, got {merged['top_k']}, "
                          f"{merged['count']}")
    if merged["channels"] not in CHANNEL_MODES:
        raise ConfigError(f"atlas.channels {merged['channels']!r}: use one of {CHANNEL_MODES} "
                          "(and atlas.named for chosen channels per layer)")
    return merged


def atlas_layers(card: dict[str, Any], layers: str | Sequence[str] = "auto") -> list[dict]:
    """Layer-table rows: "auto" = three layers spread shallow to deep, or the named layers."""
    from ..modelcard import find_layer
    from .explain import spread_layers

    if layers in (None, "auto"):
        names = spread_layers(card, 3)
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
    rows = [find_layer(card, name) for name in names]
    return list({row["name"]: row for row in rows}.values())


def _pre_tensor(row: dict[str, Any]) -> str | None:
    pre = row.get("conv_output")
    return pre if pre and pre != row["tensor"] else None


def _seed_tensor(row: dict[str, Any]) -> str:
    """Where a unit's projection starts: its conv output when the layer has one. The same
    projection as from the activation wherever the activation's slope is 1 (a positive ReLU
    unit, ReLU6 below 6), but a saturated unit (ReLU6 at 6: most top units of EfficientNet-
    Lite0's most active channels) would otherwise project through its own zero slope to a flat
    picture under guided backprop or the gradient."""
    return _pre_tensor(row) or row["tensor"]


# ---- map -----------------------------------------------------------------------------------
def map_shard(
    model_dir: str | Path,
    manifest: str | Path,
    out: str | Path,
    layers: str | Sequence[str] = "auto",
    top_k: int = 9,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Each channel's top-k activations in one shard, for each atlas layer; writes `out`."""
    from ..graph import cut_at
    from ..images import read_manifest
    from ..modelcard import load_card, model_path
    from ..runtime import make_session

    started = time.perf_counter()
    card = load_card(model_dir)
    model = onnx.load(str(model_path(model_dir, card)))
    rows = atlas_layers(card, layers)
    names = list(dict.fromkeys([r["tensor"] for r in rows] +
                               [p for p in map(_pre_tensor, rows) if p]))
    session = make_session(cut_at(model, names), device, threads)
    feed = session.get_inputs()[0].name
    shard = read_manifest(manifest)
    tops = {row["name"]: None for row in rows}
    ids: list[str] = []
    failed = [dict(f, stage="staging") for f in shard.get("failed", [])]
    for batch_ids, inputs in _batches(shard["images"], card["preprocess"], batch_size, failed):
        real = len(batch_ids)
        if real < batch_size:  # every run has the same shape: results never depend on sharding
            pad = np.zeros((batch_size - real, *inputs.shape[1:]), np.float32)
            inputs = np.concatenate([inputs, pad])
        values = dict(zip(names, session.run(names, {feed: inputs}), strict=True))
        for row in rows:
            act = values[row["tensor"]][:real]
            pre = values[_pre_tensor(row)][:real] if _pre_tensor(row) else None
            candidates = batch_topk(batch_ids, act, pre, top_k)
            if tops[row["name"]] is None:
                tops[row["name"]] = candidates
            else:
                tops[row["name"]].push(candidates)
        ids.extend(batch_ids)
    result = {
        "format": FORMAT,
        "model": card.get("name"),
        "manifest": Path(manifest).name,
        "top_k": int(top_k),
        "images": ids,
        "failed": failed,
        "layers": {
            row["name"]: {
                "tensor": row["tensor"],
                "shape": row.get("shape"),
                "channels": tops[row["name"]].to_json(ids) if tops[row["name"]] is not None
                else [[] for _ in range(_channels(row))],
            }
            for row in rows
        },
    }
    text = json.dumps(result, separators=(",", ":")) + "\n"
    write_with(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("atlas map: %d images, %d layers, %.2f s", len(ids), len(rows),
             time.perf_counter() - started)
    return result


def _channels(row: dict[str, Any]) -> int:
    shape = row.get("shape")
    if not shape:
        raise ModelError(f"layer {row['name']!r} has no shape in model.json; rerun the export")
    return int(shape[0])


def _batches(
    entries: Sequence[dict[str, Any]], pre: dict[str, Any], size: int, failed: list[dict]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, inputs [n <= size, 3, H, W]) read lazily; unreadable images go to `failed`."""
    from ..images import shard_batches

    def record(entry: dict[str, Any], error: ImageError) -> None:
        failed.append({"image": entry["id"], "error": str(error), "stage": "atlas"})

    return shard_batches(entries, pre, size, record)


# ---- reduce: merging -----------------------------------------------------------------------
def merge_shards(
    shard_files: Iterable[str | Path], layers: Sequence[str], k: int
) -> tuple[dict[str, TopK], list[str], list[dict]]:
    """({layer: global TopK}, image ids ranked, failures), reading one shard file at a time."""
    tops: dict[str, TopK] = {}
    ids: list[str] = []
    failed: list[dict] = []
    shard_files = list(shard_files)
    if shard_files and all(failure_of(path) for path in shard_files):
        check_input(shard_files[0], "every atlas-map job")
    for path in shard_files:
        record = failure_of(path)
        if record is not None:
            error = upstream_message(record, "atlas-map")
            failed.append({"shard": Path(path).stem, "error": error})
            continue
        shard = read_json(path)
        if shard.get("format") != FORMAT:
            raise ModelError(f"{path} is not an atlas shard file ({FORMAT}); rerun atlas-map")
        for layer in layers:
            if layer not in shard["layers"]:
                raise ConfigError(f"{path} has no layer {layer!r} (it has "
                                  f"{', '.join(shard['layers'])}); rerun atlas-map for it")
            part = TopK.from_json(shard["layers"][layer]["channels"], shard["images"], k)
            if layer not in tops:
                tops[layer] = TopK.empty(part.channels, k)
            tops[layer].push(part)
        ids.extend(shard["images"])
        failed.extend(shard.get("failed", []))
    return tops, ids, failed


def selectivity(top: TopK) -> np.ndarray:
    """[C] how peaked each channel's top activations are across images: 1 - mean(top-k) / top-1.

    The mean is over the channel's kept entries (its k best images, one unit each; fewer when
    the run has fewer images). 0: the k images excite it equally (a channel that fires on
    anything); towards 1: one image stands out (a detector of something rare). The values are
    the pre-activations that rank the entries (the conv output; equal to the activation unless
    it saturates): a ReLU6 channel whose k images all reach 6 would otherwise score 0 whatever
    its conv outputs (on EfficientNet-Lite0 most of the most active channels do). A channel
    whose top value is not positive, or that has no image, scores 0: the ratio means nothing
    there.
    """
    filled = top.filled
    values = np.where(filled, top.pre, 0.0)
    count = filled.sum(axis=1)
    mean = values.sum(axis=1) / np.maximum(count, 1)
    best = np.where(filled[:, 0], top.pre[:, 0], 0.0)
    usable = (best > 0) & np.isfinite(best) & np.isfinite(mean)
    ratio = np.divide(mean, best, out=np.ones_like(mean), where=usable)
    return np.where(usable, 1.0 - ratio, 0.0)


def choose_channels(
    top: TopK, mode: str = "most_active", count: int = 16, named: Sequence[int] | None = None,
    layer: str = "?",
) -> list[int]:
    """The channels to show: `named` ones, else the first `count`, or the `count` with the
    highest top activation over the dataset (most_active; same order as the atlas entries) or
    the highest `selectivity` (most_selective; ties: the higher top activation). Last ties:
    lower index."""
    if named:
        bad = [c for c in named if not 0 <= int(c) < top.channels]
        if bad:
            raise ConfigError(f"atlas.named[{layer!r}]: channels {bad} out of range "
                              f"0..{top.channels - 1}")
        return [int(c) for c in dict.fromkeys(named)]
    if mode == "first":
        return list(range(min(count, top.channels)))
    if mode not in CHANNEL_MODES:
        raise ConfigError(f"atlas.channels {mode!r}: use one of {CHANNEL_MODES}")
    index = np.arange(top.channels)
    keys = [index, -top.pre[:, 0], -top.value[:, 0]]
    if mode == "most_selective":
        keys.append(-selectivity(top))
    order = np.lexsort((*keys, ~top.filled[:, 0]))
    return [int(c) for c in order[:count]]


# ---- reduce: projections and pictures ------------------------------------------------------
def project_units(
    runner: Any, inputs: np.ndarray, units: Sequence[tuple[int, int, int, float]]
) -> np.ndarray:
    """[n, 3, H, W]: each unit (channel, y, x, value) of image inputs[i] projected alone.

    The seed is zero except the unit's value at its position; `runner` runs the layer's
    `projections.unit_projection_graph`.
    """
    width = int(runner.graph.metadata["map_width"])
    channels = np.array([c for c, _, _, _ in units], np.int64)
    positions = np.array([y * width + x for _, y, x, _ in units], np.int64)
    values = np.array([v for _, _, _, v in units], np.float32)
    feeds = {"images": np.asarray(inputs, np.float32), "channels": channels,
             "positions": positions, "values": values}
    return runner.run(feeds)["projections"]


def _fit(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: `rgb` scaled to fit (nearest when enlarging a lot), centred."""
    from PIL import Image

    h, w = rgb.shape[:2]
    out = np.full((size, size, 3), 255, np.uint8)
    if h == 0 or w == 0:
        return out
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    small = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(shape, method))
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def _cells(tiles: Sequence[np.ndarray], k: int, cell: int) -> np.ndarray:
    """A near-square grid of k cells (row-major, best first); unused cells are EMPTY."""
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    grid = np.full((rows * (cell + SEP) - SEP, cols * (cell + SEP) - SEP, 3), 255, np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        top, left = r * (cell + SEP), c * (cell + SEP)
        grid[top : top + cell, left : left + cell] = tiles[i] if i < len(tiles) else EMPTY
    return grid


def channel_strip(projections: Sequence[np.ndarray], patches: Sequence[np.ndarray], k: int,
                  cell: int = CELL) -> np.ndarray:
    """uint8 [2 cell + SEP, k (cell + SEP) - SEP, 3]: column j = rank j's projection above its
    patch (EMPTY where the channel has fewer than k images)."""
    strip = np.full((2 * cell + SEP, k * (cell + SEP) - SEP, 3), 255, np.uint8)
    for j in range(k):
        left = j * (cell + SEP)
        for top, tiles in ((0, projections), (cell + SEP, patches)):
            strip[top : top + cell, left : left + cell] = tiles[j] if j < len(tiles) else EMPTY
    return strip


def atlas_picture(blocks: Sequence[dict[str, Any]], k: int, cell: int = CELL) -> np.ndarray:
    """uint8 RGB: channels in a near-square grid; each a label, then k projections | k patches."""
    from PIL import Image, ImageDraw

    sample = _cells([], k, cell)
    bh, bw = sample.shape[0] + LABEL_H, 2 * sample.shape[1] + GAP
    n = max(1, len(blocks))
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    width = cols * (bw + MARGIN) + MARGIN
    height = rows * (bh + MARGIN) + MARGIN
    canvas = np.full((height, width, 3), 255, np.uint8)
    for i, block in enumerate(blocks):
        r, c = divmod(i, cols)
        top, left = MARGIN + r * (bh + MARGIN), MARGIN + c * (bw + MARGIN)
        canvas[top + LABEL_H : top + bh, left : left + sample.shape[1]] = _cells(
            block["projections"], k, cell)
        canvas[top + LABEL_H : top + bh, left + sample.shape[1] + GAP : left + bw] = _cells(
            block["patches"], k, cell)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, block in enumerate(blocks):
        r, c = divmod(i, cols)
        top, left = MARGIN + r * (bh + MARGIN), MARGIN + c * (bw + MARGIN)
        draw.text((left, top), block["label"], fill=(0, 0, 0))
    return np.asarray(picture)


def unit_window(fields: Any, position: Sequence[int], size: Sequence[int],
                projection: np.ndarray) -> tuple[list[int], list[int]]:
    """(box, window) of a unit, [y0, y1, x0, x1) in input pixels each.

    box: its receptive field clipped to the image (or, without `fields`, where its projection
    is non-zero). window: what a tile shows: the whole field, part of it off the image near a
    border (so every tile of a layer has the same scale), or the whole image where the field is
    larger than the image.
    """
    from ..receptive import unit_box
    from .projections import support_bbox

    if fields is None:
        box = support_bbox(projection)
        return box, box
    window: list[int] = []
    for field, u, extent in zip(fields, position, size, strict=True):
        start = field.offset + int(u) * field.stride if field.size <= extent else 0
        window += [start, start + min(field.size, extent)]
    return unit_box(fields, position, size), window


def crop_window(picture: np.ndarray, window: Sequence[int], fill: float) -> np.ndarray:
    """picture [H, W, ...] cut to window [y0, y1, x0, x1), `fill` where it leaves the picture."""
    y0, y1, x0, x1 = window
    h, w = picture.shape[:2]
    out = np.full((y1 - y0, x1 - x0, *picture.shape[2:]), fill, picture.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = picture[sy0:sy1, sx0:sx1]
    return out


def reduce_atlas(
    model_dir: str | Path,
    shard_files: Sequence[str | Path],
    manifests: Sequence[str | Path],
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Merge the shards, project the winners of the chosen channels, write `{layer}.png/.json`."""
    from ..modelcard import load_card, model_path

    opts = atlas_options(options)
    card = load_card(model_dir)
    model = onnx.load(str(model_path(model_dir, card)))
    rows = atlas_layers(card, opts["layers"])
    names = [row["name"] for row in rows]
    for key in opts["named"] or {}:
        if key not in names:
            log.warning("atlas.named: layer %r is not an atlas layer (%s); ignored", key, names)
    k = int(opts["top_k"])
    started = time.perf_counter()
    tops, ranked, failed = merge_shards(shard_files, names, k)
    log.info("atlas reduce: merged %d shards (%d images) in %.2f s", len(shard_files),
             len(ranked), time.perf_counter() - started)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _image_paths(manifests, {i for top in tops.values() for i in top.image[top.filled]})
    done = []
    for row in rows:
        top = tops.get(row["name"]) or TopK.empty(_channels(row), k)
        named = (opts["named"] or {}).get(row["name"])
        chosen = choose_channels(top, opts["channels"], int(opts["count"]), named, row["name"])
        runner = None
        policy, why = resolve_policy(model, row["tensor"], opts["policy"])
        if top.filled[chosen].any():  # one layer's graph at a time: memory of one
            from ..runner import Runner
            from .projections import unit_projection_graph

            graph = unit_projection_graph(model, _seed_tensor(row), max(1, batch_size), policy)
            runner = Runner(graph, device, threads)
        info = _layer_atlas(model, card, row, top, chosen, paths, runner, out_dir, batch_size)
        del runner
        info.update({"seeded_at": _seed_tensor(row),
                     "selection": "named" if named else opts["channels"],
                     "images_ranked": len(ranked), "policy": policy, "policy_reason": why})
        if failed:
            info["failed"] = sorted(failed, key=lambda f: json.dumps(f, sort_keys=True))
        write_json(out_dir / f"{row['name']}.json", info)
        done.append(info)
    log.info("atlas reduce: %d layers in %.2f s", len(done), time.perf_counter() - started)
    return done


def _image_paths(manifests: Sequence[str | Path], wanted: set[str]) -> dict[str, str]:
    """id -> staged PNG path for the winning images only."""
    from ..images import read_manifest

    found: dict[str, str] = {}
    for manifest in manifests:
        for entry in read_manifest(manifest)["images"]:
            if entry["id"] in wanted:
                found[entry["id"]] = entry["path"]
    missing = sorted(wanted - set(found))
    if missing:
        raise ConfigError(f"atlas: images {missing[:5]} are in the shard files but in none of "
                          "the manifests given; pass every shard's manifest")
    return found


def _layer_atlas(
    model: onnx.ModelProto,
    card: dict[str, Any],
    row: dict[str, Any],
    top: TopK,
    chosen: list[int],
    paths: dict[str, str],
    runner: Any,
    out_dir: Path,
    batch_size: int,
) -> dict[str, Any]:
    from ..images import display_image, load_image, preprocess
    from ..receptive import receptive_field
    from ..render import save_png
    from .backprop import signed_rgb

    pre = card["preprocess"]
    size = [int(v) for v in pre["size"]]
    try:
        fields = receptive_field(model, row["tensor"], size)
        field_info: dict[str, Any] | None = {
            "size": [f.size for f in fields], "stride": [f.stride for f in fields],
            "offset": [f.offset for f in fields]}
    except ModelError as error:
        log.warning("layer %s: %s; cropping to the projection's support instead", row["name"],
                    error)
        fields, field_info = None, None
    units = [(c, j, e) for c in chosen for j, e in enumerate(top.entries(c))]
    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # only this layer's winners
    for image_id in dict.fromkeys(e["image"] for _, _, e in units):
        picture = load_image(paths[image_id])
        images[image_id] = (preprocess(picture, pre), display_image(picture, pre))
    tiles: dict[int, dict[str, list]] = {c: {"projections": [], "patches": []} for c in chosen}
    boxes: dict[tuple[int, int], list[int]] = {}
    step = max(1, batch_size)
    for start in range(0, len(units), step):
        part = units[start : start + step]
        x = np.stack([images[e["image"]][0] for _, _, e in part])
        grads = project_units(runner, x, [(c, *e["position"], e["value"]) for c, _, e in part])
        for (c, j, e), grad in zip(part, grads, strict=True):
            box, window = unit_window(fields, e["position"], size, grad)
            boxes[(c, j)] = box
            proj = crop_window(grad.transpose(1, 2, 0), window, 0.0).transpose(2, 0, 1)
            tiles[c]["projections"].append(_fit(signed_rgb(proj), CELL))
            patch = crop_window(images[e["image"]][1], window, 255)
            tiles[c]["patches"].append(_fit(patch, CELL))
    blocks, channels = [], []
    peaked = selectivity(top)
    strips = out_dir / row["name"]
    for old in strips.glob("ch*.png") if strips.is_dir() else []:  # an earlier choice's
        old.unlink()
    for c in chosen:
        entries = top.entries(c)
        blocks.append({"label": _label(c, entries), **tiles[c]})
        strip = f"{row['name']}/ch{c:04d}.png"
        save_png(out_dir / strip, channel_strip(tiles[c]["projections"], tiles[c]["patches"],
                                                top.k))  # fmt: skip
        channels.append({
            "channel": c,
            "selectivity": _round(float(peaked[c])),
            "strip": strip,
            "images": [e["image"] for e in entries],
            "top": [{"image": e["image"], "value": _round(e["value"]),
                     "pre": _round(e["pre"]), "position": e["position"],
                     "box": boxes[(c, j)]} for j, e in enumerate(entries)],
        })
    save_png(out_dir / f"{row['name']}.png", atlas_picture(blocks, top.k))
    return {
        "method": "atlas",
        "model": card.get("name"),
        "layer": row["name"],
        "tensor": row["tensor"],
        "shape": row.get("shape"),
        "top_k": top.k,
        "count": len(chosen),
        "receptive_field": field_info,
        "box": "receptive field" if field_info else "projection support",
        "box_units": "model input pixels [y0, y1, x0, x1), half-open",
        "strip": {"cell": CELL, "sep": SEP, "rows": ["projection", "patch"],
                  "path": "per channel, relative to this file"},
        "channels": channels,
    }


def _label(channel: int, entries: list[dict[str, Any]]) -> str:
    """'ch 12  6 (pre 9.1)': the channel and its top activation (with the conv output when an
    activation such as ReLU6 saturates)."""
    if not entries:
        return f"ch {channel}  (no images)"
    top = entries[0]
    text = f"ch {channel}  max {top['value']:.3g}"
    return text + (f" (pre {top['pre']:.3g})" if top["pre"] != top["value"] else "")


def _round(value: float) -> float:
    return float(f"{value:.6g}")
