"""Image loading (every mode, EXIF, broken files, bombs), preprocessing math, staging."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cnnviz.artifacts import read_json
from cnnviz.errors import ConfigError, ImageError
from cnnviz.images import (
    assign_ids,
    discover_images,
    display_image,
    image_id,
    load_image,
    preprocess,
    read_manifest,
    stage_shard,
    write_sample_images,
)
from PIL import Image

RNG = np.random.default_rng(0)


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, image: Image.Image, fmt: str = "PNG", **kw) -> Path:
    image.save(path, format=fmt, **kw)
    return path


# --------------------------------------------------------------------------- modes


def test_rgb_roundtrip(tmp_path):
    pixels = _rgb()
    out = load_image(_save(tmp_path / "a.png", Image.fromarray(pixels)))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), pixels)


def test_grey_l_becomes_three_equal_channels(tmp_path):
    grey = RNG.integers(0, 256, size=(10, 12), dtype=np.uint8)
    out = np.asarray(load_image(_save(tmp_path / "g.png", Image.fromarray(grey, "L"))))
    assert out.shape == (10, 12, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], grey)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish ...
    rgba[:2, :, 3] = 255  # top rows opaque
    rgba[2:, :, 3] = 0  # bottom rows fully transparent -> white
    out = np.asarray(load_image(_save(tmp_path / "t.png", Image.fromarray(rgba, "RGBA"))))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == 255).all()


def test_la_half_transparent(tmp_path):
    la = np.zeros((3, 3, 2), dtype=np.uint8)
    la[..., 0] = 0
    la[..., 1] = 128  # half transparent black on white -> mid grey
    out = np.asarray(load_image(_save(tmp_path / "la.png", Image.fromarray(la, "LA"))))
    assert np.all(np.abs(out.astype(int) - 127) <= 1)


def test_palette_with_and_without_transparency(tmp_path):
    base = Image.fromarray(_rgb(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    plain = load_image(_save(tmp_path / "p.png", base))
    assert plain.mode == "RGB"
    assert np.array_equal(np.asarray(plain), np.asarray(base.convert("RGB")))
    index = np.asarray(base)[0, 0]
    transparent = load_image(_save(tmp_path / "pt.png", base, transparency=int(index)))
    mask = np.asarray(base) == index
    assert (np.asarray(transparent)[mask] == 255).all()


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = np.asarray(load_image(_save(tmp_path / "w.png", image)))[..., 0]
    assert out.tolist() == [[0, 1, 128, 255]]


def test_32bit_int_mode(tmp_path):
    image = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), mode="I")
    out = np.asarray(load_image(_save(tmp_path / "i.tif", image, "TIFF")))[..., 0]
    assert out.tolist() == [[0, 4, 255]]


def test_cmyk_jpeg_and_one_bit(tmp_path):
    cmyk = Image.new("CMYK", (6, 5), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(_save(tmp_path / "c.jpg", cmyk, "JPEG", quality=95)))
    assert out.shape == (5, 6, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    bits = Image.fromarray(np.eye(5, dtype=bool)).convert("1")
    out = np.asarray(load_image(_save(tmp_path / "b.png", bits)))
    assert out.shape == (5, 5, 3)
    assert (out[np.eye(5, dtype=bool)] == 255).all() and (out[~np.eye(5, dtype=bool)] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = _save(tmp_path / "r.jpg", image, "JPEG", exif=exif, quality=100)
    out = np.asarray(load_image(path))
    assert out.shape == (20, 10, 3)  # width and height swapped
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # white half now on top


# --------------------------------------------------------------------------- broken files


def test_missing_zero_byte_and_text_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="notes.jpg"):
        load_image(text)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_files(tmp_path, fmt, suffix):
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut{suffix}"):
        load_image(path)


def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", Image.fromarray(_rgb(40, 40)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: over the limit, < 2x
    with pytest.raises(ImageError, match="too large|over the limit"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own error range (> 2x)
    with pytest.raises(ImageError, match="big.png"):
        load_image(path)


# --------------------------------------------------------------------------- preprocessing

PRE = {
    "size": [4, 4],
    "resize": "center_crop",
    "resize_to": 4,
    "scale": 255.0,
    "mean": [0.5, 0.25, 0.125],
    "std": [0.5, 0.25, 0.5],
    "channel_order": "RGB",
}


def test_preprocess_math_by_hand():
    pixels = _rgb(4, 4)
    image = Image.fromarray(pixels)  # already 4x4: no resize, no crop
    x = preprocess(image, PRE)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    for c in range(3):
        expected = (pixels[..., c] / 255.0 - PRE["mean"][c]) / PRE["std"][c]
        np.testing.assert_allclose(x[c], expected, rtol=1e-5, atol=1e-6)
    # BGR: mean/std are given in the model's order (mean[0] for B); the input stays RGB (the
    # exported graph reverses the channels), so B = channel 2 gets mean[0]
    bgr = preprocess(image, {**PRE, "channel_order": "BGR"})
    expected_b = (pixels[..., 2] / 255.0 - PRE["mean"][0]) / PRE["std"][0]
    np.testing.assert_allclose(bgr[2], expected_b, rtol=1e-5, atol=1e-6)


def test_center_crop_geometry():
    # 40 x 20 (w x h): shorter side 20 -> 10, so 20 x 10, then the centre 6 x 8 (h x w).
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(40, dtype=np.uint8)[None, :] * 6  # red encodes x
    pre = {**PRE, "size": [6, 8], "resize_to": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}
    view = display_image(Image.fromarray(pixels), pre)
    assert view.shape == (6, 8, 3)
    resized = np.asarray(Image.fromarray(pixels).resize((20, 10), Image.Resampling.BILINEAR))
    top, left = round((10 - 6) / 2), round((20 - 8) / 2)
    assert np.array_equal(view, resized[top : top + 6, left : left + 8])
    x = preprocess(Image.fromarray(pixels), pre)
    np.testing.assert_allclose(x.transpose(1, 2, 0) * 255.0, view, atol=1e-3)


def test_stretch_and_portrait():
    portrait = Image.fromarray(_rgb(30, 10))
    assert display_image(portrait, {**PRE, "resize": "stretch", "size": [5, 7]}).shape == (5, 7, 3)
    # portrait: width 10 -> 4, height int(4 * 30 / 10) = 12, crop centre 4x4
    assert display_image(portrait, PRE).shape == (4, 4, 3)
    with pytest.raises(ConfigError, match="resize_to"):
        display_image(portrait, {**PRE, "resize_to": 2})
    with pytest.raises(ConfigError, match="resize"):
        display_image(portrait, {**PRE, "resize": "zoom"})


# --------------------------------------------------------------------------- inputs and staging


def test_sample_images_and_discovery(tmp_path):
    paths = write_sample_images(tmp_path / "in", ["chelsea", "stereo_motorcycle", "camera"])
    assert [p.name for p in paths] == ["chelsea.png", "stereo_motorcycle.png", "camera.png"]
    assert load_image(paths[1]).size == (741, 500)  # the left image of the stereo pair
    with pytest.raises(ConfigError, match="chelsea"):
        write_sample_images(tmp_path, ["no-such-photo"])
    (tmp_path / "in" / "readme.txt").write_text("x")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    folder = discover_images(tmp_path / "in")
    assert [p.name for p in folder] == ["camera.png", "chelsea.png", "stereo_motorcycle.png"]
    assert discover_images(str(tmp_path / "in" / "c*.png")) == folder[:2]
    listed = discover_images([paths[1], tmp_path / "missing.jpg", paths[1]])
    assert listed == [paths[1], tmp_path / "missing.jpg"]
    with pytest.raises(ConfigError):
        discover_images(str(tmp_path / "none" / "*.png"))


def test_image_ids_are_safe_and_unique():
    taken: set[str] = set()
    assert image_id("a/My Photo (1).jpg", taken) == "My_Photo_1"
    assert image_id("b/My Photo (1).png", taken) == "My_Photo_1-2"
    assert image_id("c/my_photo_1.png", taken) == "my_photo_1-3"  # case-insensitive clash
    assert image_id("../<script>.png", taken) == "script"
    assert image_id(".png", taken) == "png"
    assert assign_ids(["x/a.png", "y/a.png"]) == ["a", "a-2"]


def test_stage_shard_keeps_going_past_a_bad_file(tmp_path):
    good = _save(tmp_path / "good.png", Image.fromarray(_rgb(12, 9)))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    grey = _save(tmp_path / "grey.png", Image.fromarray(_rgb(5, 5)[..., 0], "L"))
    manifest = tmp_path / "res" / "images" / "shards" / "s000.json"
    staged = tmp_path / "res" / "images"
    stage_shard([good, bad, grey], staged, manifest)
    data = read_json(manifest)
    assert [i["id"] for i in data["images"]] == ["good", "grey"]
    assert data["images"][0]["width"] == 9 and data["images"][0]["height"] == 12
    assert len(data["failed"]) == 1 and "bad.jpg" in data["failed"][0]["error"]
    assert data["failed"][0]["source"] == str(bad)
    staged_grey = Image.open(staged / "grey.png")
    assert staged_grey.mode == "RGB"
    assert not list(staged.glob(".*"))  # no temp files left behind
    # (id, path) pairs as the CLI passes them; read_manifest gives absolute paths
    stage_shard([("first", good)], staged, manifest)
    entry = read_manifest(manifest)["images"][0]
    assert entry["id"] == "first" and Path(entry["path"]).is_absolute()
    assert Path(entry["path"]).exists()


def test_true_labels_reach_the_manifest(tmp_path):
    from cnnviz.images import read_labels

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("cat1.png", "dog.jpg"):
        Image.new("RGB", (6, 5), (10, 20, 30)).save(folder / name)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("# file, class\ncat1.png,Egyptian cat\ndog,207\n")
    tsv_file = tmp_path / "labels.tsv"
    tsv_file.write_text("cat1\ttabby, tabby cat\n")
    assert read_labels(csv_file) == {"cat1.png": "Egyptian cat", "dog": "207"}
    assert read_labels(tsv_file) == {"cat1": "tabby, tabby cat"}  # commas inside a TSV field
    manifest = stage_shard(
        [folder / "cat1.png", folder / "dog.jpg"], tmp_path / "staged", tmp_path / "m.json",
        labels=read_labels(csv_file),
    )
    assert [e.get("label") for e in manifest["images"]] == ["Egyptian cat", "207"]
    bad = tmp_path / "bad.csv"
    bad.write_text("cat1.png\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_labels(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_labels(tmp_path / "missing.csv")
