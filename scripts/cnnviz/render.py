"""Pictures from arrays: channel grids, single channels, heat-map overlays, thumbnails, PNG writes.

Grids are assembled with numpy and a colour-map lookup table, not a matplotlib figure per channel:
a layer with 1280 channels renders in milliseconds. Colour maps are perceptually uniform
(viridis for activations, inferno for heat maps). PNGs are written without metadata, so the same
array always gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .artifacts import write_with

ACTIVATION_CMAP = "viridis"
HEAT_CMAP = "inferno"
RELEVANCE_CMAP = "bwr"  # diverging: blue < 0, white = 0, red > 0 (zennit's and captum's choice)
BLANK_EPS = 1e-6  # a channel whose max |value| is <= this is blank (see is_blank)
SEPARATOR = 2  # px between tiles
BACKGROUND = (255, 255, 255)  # separators and unused grid cells
BLANK_DARK = (56, 56, 56)  # a blank channel: dark grey with lighter diagonal hatching
BLANK_LIGHT = (96, 96, 96)
HATCH_PERIOD = 6


def lut(name: str) -> np.ndarray:
    """A [256, 3] uint8 lookup table for a matplotlib colour map."""
    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def colorize(values: np.ndarray, cmap: str = ACTIVATION_CMAP) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)); out-of-range values are clipped."""
    index = np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0).astype(np.intp)
    return lut(cmap)[index]


def is_blank(act: np.ndarray, eps: float = BLANK_EPS) -> np.ndarray:
    """[C, H, W] -> bool [C]: True where a channel's max |activation| is <= eps (absolute)."""
    flat = np.abs(act.reshape(act.shape[0], -1))
    peak = flat.max(axis=1) if flat.shape[1] else np.zeros(act.shape[0])
    return peak <= eps


def normalize_channels(act: np.ndarray) -> np.ndarray:
    """Each channel of [C, H, W] scaled to its own [min, max] -> [0, 1].

    A channel with no variation (max - min within float noise of its magnitude) maps to 0
    instead of amplifying rounding noise into a pattern.
    """
    act = act.astype(np.float32, copy=False)
    lo = act.min(axis=(1, 2), keepdims=True)
    hi = act.max(axis=(1, 2), keepdims=True)
    span = hi - lo
    scale = np.maximum(np.abs(hi), np.abs(lo))
    flat = span <= np.maximum(scale * 1e-6, np.finfo(np.float32).tiny)
    out = (act - lo) / np.where(flat, 1.0, span)
    return np.where(flat, 0.0, out).astype(np.float32)


def _hatch(height: int, width: int) -> np.ndarray:
    """bool [H, W]: the lighter diagonal stripes of a blank tile."""
    rows, cols = np.indices((height, width))
    return ((rows + cols) % HATCH_PERIOD) < max(1, HATCH_PERIOD // 3)


def blank_tile(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: the hatched dark-grey tile that marks a blank channel."""
    stripe = _hatch(height, width)[..., None]
    return np.where(stripe, np.uint8(BLANK_LIGHT), np.uint8(BLANK_DARK)).astype(np.uint8)


def grid_shape(channels: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid: cols = ceil(sqrt(C))."""
    cols = max(1, math.ceil(math.sqrt(channels)))
    return max(1, math.ceil(channels / cols)), cols


def _block_mean(act: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return act
    c, h, w = act.shape
    h2, w2 = max(1, h // factor), max(1, w // factor)
    cut = act[:, : h2 * factor, : w2 * factor]
    return cut.reshape(c, h2, factor, w2, factor).mean(axis=(2, 4))


LEVELS = 253  # colour-map steps in a grid palette; 3 more entries: blank dark/light, background
_BLANK_DARK_INDEX, _BLANK_LIGHT_INDEX, _BACKGROUND_INDEX = LEVELS, LEVELS + 1, LEVELS + 2


def grid_palette(cmap: str = ACTIVATION_CMAP) -> np.ndarray:
    """[256, 3] uint8: LEVELS colour-map steps, then blank dark, blank light, background."""
    steps = colormaps[cmap](np.linspace(0.0, 1.0, LEVELS))[:, :3]
    colours = (steps * 255.0 + 0.5).astype(np.uint8)
    extra = np.array([BLANK_DARK, BLANK_LIGHT, BACKGROUND], dtype=np.uint8)
    return np.concatenate([colours, extra])


def channel_grid_indices(
    act: np.ndarray,
    target_width: int = 768,
    max_width: int = 1024,
    eps: float = BLANK_EPS,
) -> np.ndarray:
    """The grid of `channel_grid` as uint8 indices into `grid_palette` ([H, W])."""
    act = np.asarray(act, dtype=np.float32)
    if act.ndim != 3:
        raise ValueError(f"channel_grid expects [C, H, W], got shape {act.shape}")
    blank = is_blank(act, eps)
    rows, cols = grid_shape(act.shape[0])
    natural = cols * act.shape[2]
    down = math.ceil(natural / max_width) if natural > max_width else 1
    small = _block_mean(act, down)
    up = max(1, target_width // (cols * small.shape[2])) if down == 1 else 1
    tiles = np.rint(normalize_channels(small) * (LEVELS - 1)).astype(np.uint8)
    if up > 1:
        tiles = tiles.repeat(up, axis=1).repeat(up, axis=2)
    th, tw = tiles.shape[1:3]
    hatch = np.where(_hatch(th, tw), _BLANK_LIGHT_INDEX, _BLANK_DARK_INDEX)
    tiles[blank] = hatch.astype(np.uint8)
    sep = SEPARATOR
    out = np.full((rows * (th + sep) - sep, cols * (tw + sep) - sep), _BACKGROUND_INDEX, np.uint8)
    for index in range(act.shape[0]):
        r0, c0 = divmod(index, cols)
        top, left = r0 * (th + sep), c0 * (tw + sep)
        out[top : top + th, left : left + tw] = tiles[index]
    return out


def channel_grid(
    act: np.ndarray,
    target_width: int = 768,
    max_width: int = 1024,
    eps: float = BLANK_EPS,
    cmap: str = ACTIVATION_CMAP,
) -> np.ndarray:
    """All channels of one layer's activation [C, H, W] as one uint8 RGB picture.

    Channels are tiled row-major (channel 0 top-left) in a near-square grid with SEPARATOR-px
    white gaps; each channel is normalized to its own [min, max] and coloured with `cmap`; blank
    channels (see `is_blank`) are hatched dark grey. Small maps are enlarged by an integer
    nearest-neighbour factor so the grid is about `target_width` px wide (a 7x7 map stays
    readable); large ones are block-averaged down so it stays under `max_width`.
    """
    return grid_palette(cmap)[channel_grid_indices(act, target_width, max_width, eps)]


def channel_image(
    channel: np.ndarray, min_side: int = 224, eps: float = BLANK_EPS, cmap: str = ACTIVATION_CMAP
) -> np.ndarray:
    """One channel [H, W] as uint8 RGB, enlarged (integer, nearest) to at least `min_side`."""
    indices = channel_grid_indices(np.asarray(channel)[None], min_side, 1 << 30, eps)
    return grid_palette(cmap)[indices]


def save_grid_png(
    path: str | Path,
    act: np.ndarray,
    eps: float = BLANK_EPS,
    cmap: str = ACTIVATION_CMAP,
    min_side: int | None = None,
) -> Path:
    """`channel_grid(act)` (or `channel_image` of a [H, W] map with `min_side`) as a palette PNG.

    Same pixels as the RGB picture, a third of the bytes and several times faster to write.
    """
    if min_side is not None:
        indices = channel_grid_indices(np.asarray(act)[None], min_side, 1 << 30, eps)
    else:
        indices = channel_grid_indices(act, eps=eps)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(grid_palette(cmap).reshape(-1).tolist())
    return save_png(path, picture)


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = HEAT_CMAP
) -> np.ndarray:
    """Blend a heat map [h, w] in [0, 1] (bilinearly resized to the image) over uint8 [H, W, 3]."""
    image = np.asarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (height, width):
        heat = np.asarray(
            Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        )
    colour = colorize(heat, cmap).astype(np.float32)
    blended = (1.0 - alpha) * image[..., :3].astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def signed_rgb(grad: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """[3, H, W] signed -> uint8 [H, W, 3] with grey = 0, scaled by a robust max |value|."""
    grad = np.asarray(grad, dtype=np.float32)
    scale = float(np.percentile(np.abs(grad), percentile)) if grad.size else 0.0
    if scale <= 0:
        scale = float(np.abs(grad).max()) or 1.0
    unit = np.clip(grad / scale, -1.0, 1.0)
    return np.rint((unit.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


def relevance_picture(view: np.ndarray, raw: np.ndarray, percentile: float = 99.5,
                      alpha: float = 0.8) -> np.ndarray:
    """A signed [H, W] attribution (relevance, DeepLIFT, input x gradient) in a diverging
    colour map, red = for the class, blue = against, white = 0, symmetric about 0 and scaled by
    a robust max |value|, over a grey copy of `view` (at the view's resolution)."""
    raw = np.asarray(raw, dtype=np.float32)
    scale = float(np.percentile(np.abs(raw), percentile)) if raw.size else 0.0
    if scale <= 0:
        scale = float(np.abs(raw).max()) or 1.0
    unit = np.clip(raw / scale, -1.0, 1.0) * 0.5 + 0.5
    grey = np.asarray(view, np.uint8)[..., :3].mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    return overlay(grey.astype(np.uint8), unit, alpha, RELEVANCE_CMAP)


def map_picture(view: np.ndarray, raw: np.ndarray, signed: np.ndarray | None,
                kind: str | None = None) -> np.ndarray:
    """What people see of one explanation map: kind "relevance": the signed raw map in a
    diverging colour map (relevance_picture); a signed [3, H, W] signal as RGB (grey = 0) at
    the model's input size; else the raw [H, W] map's positive part, scaled to [0, 1], over
    `view` (the image the model saw, at its own resolution)."""
    from .methods.common import normalize_map

    if kind == "relevance":
        return relevance_picture(view, raw)
    if signed is not None:
        return signed_rgb(signed)
    return overlay(view, normalize_map(np.maximum(raw, 0)))


PNG_LEVEL = 1


def to_pil(picture: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture
    array = np.asarray(picture)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def save_png(path: str | Path, rgb: np.ndarray | Image.Image) -> Path:
    """Write uint8 [H, W, 3] (or [H, W], or a PIL image) as PNG atomically, with no metadata.

    zlib level 1: on activation grids 3.4x faster to write than PIL's default level 6 for 6%
    more bytes (benchmarks/PIPELINE.md: picture writes were the largest cost outside compute).
    """
    picture = to_pil(rgb)
    picture.info = {}
    return write_with(path, lambda tmp: picture.save(tmp, format="PNG", compress_level=PNG_LEVEL))


def thumbnail(path_in: str | Path, path_out: str | Path, max_side: int = 160) -> Path:
    """A PNG no larger than max_side x max_side, aspect kept."""
    from .images import load_image

    picture = load_image(path_in)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return save_png(path_out, picture)


def save_figure(path: str | Path, figure: Any) -> Path:
    """Save a matplotlib figure as PNG atomically, without the Software/date metadata."""
    return write_with(
        path, lambda tmp: figure.savefig(tmp, format="png", metadata={"Software": None})
    )
