"""Reading, checking and preprocessing input images.

Every image becomes 8-bit RGB on the way in (`load_image`), so the rest of cnnviz sees one kind of
picture. Conversions, chosen once here:

- transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white, the way a
  browser shows the picture, rather than dropping alpha (which exposes whatever colour the
  invisible pixels happen to hold, often black);
- 16-bit greyscale (I;16*) is scaled by 1/257 (65535 -> 255); 32-bit integer (I) is treated the
  same when any value exceeds 255, otherwise read as 8-bit values; float (F) is read as [0, 1] when
  its maximum is <= 1, else clipped to [0, 255];
- CMYK, YCbCr, LAB, HSV, 1-bit and palette images use Pillow's own conversion to RGB;
- the EXIF orientation tag is applied, so a phone photo is upright;
- images above `PIL.Image.MAX_IMAGE_PIXELS` are refused (ImageError), not merely warned about;
- an animated GIF, a multi-page TIFF, ...: the first frame (staging says so in its record);
- staging keeps an image larger than STAGE_MAX_SIDE pixels on its longer side at that size (for
  display and memory: every later job reads the staged copy), and records the original size.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .artifacts import read_json, write_json, write_with
from .errors import ConfigError, ImageError
from .plan import (  # noqa: F401
    IMAGE_SUFFIXES,
    STAGE_MAX_SIDE,
    assign_ids,
    discover_images,
    image_id,
)

# skimage.data photos usable as sample inputs: name -> how to get the array.
SAMPLE_IMAGES: dict[str, str] = {
    "chelsea": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "stereo_motorcycle": "stereo_motorcycle",  # a (left, right, disparity) tuple: left is used
    "camera": "camera",
    "coins": "coins",
    "moon": "moon",
    "clock": "clock",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
}

_FIX = "check that it is a complete image file (PNG, JPEG, ...) or remove it from the inputs"


# --------------------------------------------------------------------------- loading


def load_image(path: str | Path) -> Image.Image:
    """Read `path` as an upright 8-bit RGB image (see the module docstring for conversions)."""
    return read_image(path)[0]


# Formats Pillow reads only with a plugin installed.
_PLUGIN_HINTS = {
    ".heic": "HEIC needs the pillow-heif package (pip install pillow-heif) or a conversion to JPEG",
    ".heif": "HEIF needs the pillow-heif package (pip install pillow-heif) or a conversion to JPEG",
    ".avif": "AVIF needs a Pillow built with AVIF support (Pillow >= 11.2) or a conversion to PNG",
}


def read_image(path: str | Path, max_side: int | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """`load_image`, and what staging records: the frame count of an animated or multi-page
    file (the first frame is used) and, with `max_side`, the original size of an image that was
    reduced to `max_side` pixels on its longer side."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise ImageError(
                f"image {path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                "fix the link or remove it"
            )
        if glob.has_magic(str(path)):
            raise ImageError(
                f"images: the pattern {path} matches no file; check the folder and the pattern"
            )
        raise ImageError(f"image {path}: file not found; check the path in the images config")
    if path.is_dir():
        raise ImageError(f"image {path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image {path}: file is empty (0 bytes); {_FIX}")
    info: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_size(path, opened.size)
                frames = int(getattr(opened, "n_frames", 1) or 1)
                if frames > 1:
                    info["frames"] = frames
                    info["note"] = f"the first of {frames} frames (or pages) is used"
                if max_side and max(opened.size) > max_side:
                    info["original_size"] = list(opened.size)
                    if opened.format == "JPEG":  # decode at 1/2, 1/4, 1/8 when that suffices
                        scale = max_side / max(opened.size)
                        opened.draft("RGB", (int(opened.width * scale), int(opened.height * scale)))
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                rgb = to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {path}: too large to read safely ({exc}); downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        hint = _PLUGIN_HINTS.get(path.suffix.lower(), _FIX)
        raise ImageError(f"image {path}: not an image format Pillow can read; {hint}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image {path}: cannot be decoded ({exc}); {_FIX}") from exc
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if "original_size" in info:
        width, height = info["original_size"]
        info["note"] = "; ".join(
            filter(None, [info.get("note"), f"reduced from {width}x{height} for display"])
        )
    return rgb, info


def _check_size(path: Path, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(
            f"image {path}: {size[0]}x{size[1]} pixels is over the limit of {limit} "
            "(a possible decompression bomb); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust the file"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB (a new, loaded image)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return _on_white(image.convert("RGBA"))
    if mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return _grey_to_rgb(grey)
    if mode == "I":
        grey = np.asarray(image, dtype=np.float64)
        if grey.size and grey.max() > 255:
            grey = np.clip(grey, 0, 65535) / 257.0
        return _grey_to_rgb(grey)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        finite = grey[np.isfinite(grey)]
        if finite.size and finite.max() <= 1.0:
            grey = grey * 255.0
        return _grey_to_rgb(np.nan_to_num(grey))
    return image.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey8] * 3, axis=-1), mode="RGB")


# --------------------------------------------------------------------------- preprocessing


def model_view(image: Image.Image, pre: dict[str, Any]) -> Image.Image:
    """Resize and crop `image` exactly as the model input expects (before any normalization).

    `center_crop` follows torchvision's Resize(resize_to) + CenterCrop(size) on a PIL image:
    the shorter side becomes `resize_to` (the longer one int(resize_to * long / short)), bilinear,
    then the centre `size` is cut with offsets round((side - crop) / 2).
    """
    height, width = (int(v) for v in pre["size"])
    mode = pre.get("resize", "center_crop")
    if mode == "stretch":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    if mode != "center_crop":
        raise ConfigError(
            f"preprocess.resize {mode!r} is not one of center_crop, stretch; fix the model's "
            "preprocess in the config (models.<name>.preprocess.resize)"
        )
    short_to = int(pre.get("resize_to", max(height, width)))
    if short_to < max(height, width):
        raise ConfigError(
            f"preprocess.resize_to {short_to} is smaller than the crop size {height}x{width}; "
            "set models.<name>.preprocess.resize_to >= the larger crop side in the config"
        )
    w, h = image.size
    if w <= h:
        new_w, new_h = short_to, int(short_to * h / w)
    else:
        new_w, new_h = int(short_to * w / h), short_to
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def crop_box(size: tuple[int, int], pre: dict[str, Any]) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of an image of `size` (w, h) that the model sees,
    in the image's own pixels: maps computed at model input size go back onto this box."""
    width, height = size
    crop_h, crop_w = (int(v) for v in pre["size"])
    if pre.get("resize", "center_crop") == "stretch":
        return (0.0, 0.0, float(width), float(height))
    short_to = int(pre.get("resize_to", max(crop_h, crop_w)))
    if width <= height:
        new_w, new_h = short_to, int(short_to * height / width)
    else:
        new_w, new_h = int(short_to * width / height), short_to
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


def original_view(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """uint8 [h, w, 3]: the part of the image the model saw, at the image's own resolution
    (for overlays "on the original image": no downscaling to the model's input size)."""
    box = tuple(int(round(v)) for v in crop_box(image.size, pre))
    return np.asarray(image.convert("RGB").crop(box), dtype=np.uint8).copy()


def display_image(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """uint8 [H, W, 3]: exactly the crop the model saw, in RGB, for overlays."""
    return np.asarray(model_view(image.convert("RGB"), pre), dtype=np.uint8).copy()


def preprocess(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """float32 [3, H, W] model input, channels in RGB order: crop, / scale, (x - mean) / std.

    This is the input of every exported model.onnx, whatever the model was made for: a model
    for BGR (channel_order), NHWC (layout), grey or uint8 input gets its input adapter in the
    graph at export (export/onnx_io.py), so maps come back in image coordinates and RGB.
    """
    scale, mean, std = normalization(pre)
    pixels = display_image(image, pre).astype(np.float32)
    x = (pixels / scale - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def normalization(pre: dict[str, Any]) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """(scale, mean, std) per RGB channel: x = (pixels / scale - mean) / std.

    The config gives mean and std in the model's own channel order (with channel_order BGR,
    mean[0] applies to B); they are returned in RGB order, since the channel reversal happens
    in the model's input adapter. One value (a grey model) applies to all three channels.
    """
    order = str(pre.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise ConfigError(
            f"preprocess.channel_order {order!r} is not RGB or BGR; fix the model's preprocess "
            "in the config (models.<name>.preprocess.channel_order)"
        )
    scale = np.float32(pre.get("scale", 255.0))
    mean = np.asarray(pre.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
    std = np.asarray(pre.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
    mean, std = np.broadcast_to(mean, (3,)).copy(), np.broadcast_to(std, (3,)).copy()
    if order == "BGR":
        mean, std = mean[::-1].copy(), std[::-1].copy()
    return scale, mean, std


# --------------------------------------------------------------------------- finding inputs


def write_sample_images(out_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """Write the named skimage.data photos as `out_dir/{name}.png`; returns their paths."""
    names = list(names)
    _check_sample_names(names)
    return [write_sample_image(name, Path(out_dir) / f"{name}.png") for name in names]


def write_sample_image(name: str, out: str | Path) -> Path:
    """Write one skimage.data photo (see SAMPLE_IMAGES) as the PNG file `out`."""
    _check_sample_names([name])
    from skimage import data

    array = getattr(data, SAMPLE_IMAGES[name])()
    if isinstance(array, tuple):
        array = array[0]
    picture = Image.fromarray(np.asarray(array))
    return write_with(out, lambda tmp: picture.save(tmp, format="PNG"))


def _check_sample_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in SAMPLE_IMAGES]
    if unknown:
        raise ConfigError(
            f"unknown sample image(s) {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(SAMPLE_IMAGES)}"
        )


# --------------------------------------------------------------------------- staging


def stage_shard(
    sources: Sequence[str | Path] | Sequence[tuple[str, str | Path]],
    staged_dir: str | Path,
    manifest: str | Path,
    ids: Sequence[str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Load each source, save it as RGB PNG `staged_dir/{id}.png`, and write the manifest.

    `labels` (from `read_labels`) gives an image's true class by file name or stem; it goes into
    the manifest entry as "label", and the report then shows correctness and accuracy.

    `sources` are paths, or (id, path) pairs. Ids given by the caller (pairs, or `ids` from
    `assign_ids` over *all* inputs) keep ids unique across shards that share one staged folder;
    without them ids are made unique within this shard only. A source that cannot be read is
    listed under "failed" with the reason and never stops the others. An entry says when the
    image was reduced for display (`original_size`) or had more frames (`frames`, `note`).
    Returns the manifest.
    """
    if sources and all(isinstance(s, tuple) for s in sources):
        ids = [str(pair[0]) for pair in sources]
        sources = [pair[1] for pair in sources]
    ids = list(ids) if ids is not None else assign_ids(sources)
    if len(ids) != len(sources):
        raise ValueError("stage_shard: ids and sources differ in length")
    staged_dir = Path(staged_dir)
    images, failed = [], []
    for source, image_name in zip(sources, ids, strict=True):
        try:
            rgb, info = read_image(source, max_side=STAGE_MAX_SIDE)
        except ImageError as exc:
            failed.append({"source": str(source), "error": str(exc)})
            continue
        target = staged_dir / f"{image_name}.png"
        write_with(target, lambda tmp, im=rgb: im.save(tmp, format="PNG"))
        entry = {
            "id": image_name,
            "source": str(source),
            "path": str(target),
            "width": rgb.width,
            "height": rgb.height,
            **info,
        }
        truth = (labels or {}).get(Path(source).name, (labels or {}).get(Path(source).stem))
        if truth is not None:
            entry["label"] = truth
        images.append(entry)
    result = {"images": images, "failed": failed}
    write_json(manifest, result)
    return result


def read_labels(path: str | Path) -> dict[str, str]:
    """True classes from a CSV/TSV file of `file name (or stem), class label or index` rows."""
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark
    except OSError as error:
        raise ConfigError(f"images.labels: cannot read {path} ({error}); fix the path") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"images.labels: {path} is not UTF-8 text ({error}); save it as UTF-8 CSV"
        ) from None
    first = text.splitlines()[0] if text else ""
    dialect = "excel-tab" if "\t" in first else "excel"
    labels = {}
    for n, row in enumerate(csv.reader(text.splitlines(), dialect=dialect), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 2:
            raise ConfigError(
                f"images.labels: {path} line {n} has no class; write `file name, class` per line"
            )
        labels[row[0].strip()] = row[1].strip()
    return labels


def shard_batches(
    entries: Sequence[dict[str, Any]],
    pre: dict[str, Any],
    size: int,
    on_error: Callable[[dict[str, Any], ImageError], None],
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, model inputs [n <= size, 3, H, W]) for a shard's entries, read lazily so a job
    never holds more than one batch; an image that cannot be read goes to `on_error`."""
    ids: list[str] = []
    inputs: list[np.ndarray] = []
    for entry in entries:
        try:
            inputs.append(preprocess(load_image(entry["path"]), pre))
        except ImageError as error:
            on_error(entry, error)
            continue
        ids.append(entry["id"])
        if len(ids) == size:
            yield ids, np.stack(inputs)
            ids, inputs = [], []
    if ids:
        yield ids, np.stack(inputs)


def failure_recorder(failed: list[dict[str, Any]]) -> Callable[[dict[str, Any], ImageError], None]:
    """An `on_error` for shard_batches that lists the image in a job's "failed" records."""

    def record(entry: dict[str, Any], error: ImageError) -> None:
        failed.append({"id": entry["id"], "source": entry.get("source"), "error": str(error)})

    return record


def read_manifest(manifest: str | Path) -> dict[str, Any]:
    """A shard manifest with each image "path" made absolute.

    A relative path is taken from the current folder when it exists there, else the staged file
    is looked for beside the manifest's shards folder (results/images/{id}.png), so a moved
    results folder still reads.
    """
    manifest = Path(manifest)
    data = read_json(manifest)
    for entry in data.get("images", []):
        path = Path(entry["path"])
        if not path.is_absolute():
            fallback = manifest.resolve().parent.parent / f"{entry['id']}.png"
            path = path.resolve() if path.exists() or not fallback.exists() else fallback
        entry["path"] = str(path)
    data.setdefault("failed", [])
    return data
