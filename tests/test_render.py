"""Channel grids, blank tiles, overlays, thumbnails and byte-identical PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from cnnviz.render import (
    BACKGROUND,
    BLANK_DARK,
    SEPARATOR,
    blank_tile,
    channel_grid,
    channel_image,
    grid_shape,
    is_blank,
    lut,
    normalize_channels,
    overlay,
    save_grid_png,
    save_png,
    thumbnail,
)
from PIL import Image

RNG = np.random.default_rng(1)


def test_grid_shape_is_near_square():
    assert grid_shape(1) == (1, 1)
    assert grid_shape(32) == (6, 6)
    assert grid_shape(64) == (8, 8)
    rows, cols = grid_shape(1280)
    assert rows * cols >= 1280 and abs(rows - cols) <= 1


def test_grid_geometry_and_upscaling():
    act = RNG.random((10, 7, 7)).astype(np.float32)
    grid = channel_grid(act, target_width=768)
    rows, cols = grid_shape(10)  # 3 x 4
    scale = 768 // (cols * 7)  # 27: a 7x7 map becomes 189 px
    tile = 7 * scale
    assert grid.dtype == np.uint8
    assert grid.shape == (
        rows * (tile + SEPARATOR) - SEPARATOR,
        cols * (tile + SEPARATOR) - SEPARATOR,
        3,
    )
    assert 512 <= grid.shape[1] <= 1024
    # integer nearest upscaling: each source pixel is a scale x scale block of one colour
    first = grid[:tile, :tile]
    assert (first[:scale, :scale] == first[0, 0]).all()
    # separators and unused cells are background
    assert (grid[:, tile : tile + SEPARATOR] == BACKGROUND).all()
    assert (grid[-tile:, -tile:] == BACKGROUND).all()  # 10 channels: the 12th cell is empty


def test_large_maps_are_reduced_under_max_width():
    grid = channel_grid(RNG.random((16, 300, 300)).astype(np.float32), max_width=1024)
    assert grid.shape[1] <= 1024 + 3 * SEPARATOR


def test_each_channel_uses_its_own_range():
    act = np.stack([np.linspace(0, 1, 16).reshape(4, 4), np.linspace(0, 1000, 16).reshape(4, 4)])
    norm = normalize_channels(act.astype(np.float32))
    np.testing.assert_allclose(norm[0], norm[1], atol=1e-6)
    assert norm.min() == 0.0 and norm.max() == 1.0


def test_blank_tile_is_distinct_from_a_normalized_tile():
    act = np.zeros((4, 5, 5), dtype=np.float32)
    act[0] = RNG.random((5, 5))
    act[1] = 3.0  # constant but not zero: flat lowest colour, not blank
    act[2] = 1e-8  # below eps: blank
    assert is_blank(act).tolist() == [False, False, True, True]
    grid = channel_grid(act, target_width=100)
    rows, cols = grid_shape(4)
    tile = 5 * (100 // (cols * 5))
    tiles = [grid[r * (tile + SEPARATOR) : r * (tile + SEPARATOR) + tile,
                  c * (tile + SEPARATOR) : c * (tile + SEPARATOR) + tile]
             for r in range(rows) for c in range(cols)]  # fmt: skip
    expected_blank = blank_tile(tile, tile)
    assert np.array_equal(tiles[2], expected_blank) and np.array_equal(tiles[3], expected_blank)
    assert not np.array_equal(tiles[0], expected_blank)
    low = lut("viridis")[0]
    assert (tiles[1] == low).all()  # flat, no noise from normalizing 0/0
    colours = {tuple(p) for p in tiles[0].reshape(-1, 3)}
    assert tuple(BLANK_DARK) not in colours  # no blank colour inside a real tile
    # the blank tile's greys are not in the colour map at all
    assert not any((lut("viridis") == np.uint8(BLANK_DARK)).all(axis=1))


def test_channel_image_min_side():
    picture = channel_image(RNG.random((7, 7)).astype(np.float32), min_side=224)
    assert picture.shape == (224, 224, 3)


def test_png_bytes_are_deterministic(tmp_path):
    grid = channel_grid(RNG.random((8, 9, 9)).astype(np.float32))
    a, b = save_png(tmp_path / "a.png", grid), save_png(tmp_path / "b.png", grid.copy())
    assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(np.asarray(Image.open(a)), grid)
    assert b"tIME" not in a.read_bytes() and b"tEXt" not in a.read_bytes()
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", grid.astype(np.float32))


def test_overlay_and_thumbnail(tmp_path):
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[0, 0] = 1.0
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])  # the hot corner differs
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    src = save_png(tmp_path / "big.png", RNG.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    thumb = Image.open(thumbnail(src, tmp_path / "t.png", max_side=160))
    assert thumb.size == (160, 96)


def test_palette_png_has_the_grid_pixels(tmp_path):
    act = np.maximum(RNG.normal(size=(20, 7, 7)), 0).astype(np.float32)
    act[3] = 0.0
    a = save_grid_png(tmp_path / "a.png", act)
    b = save_grid_png(tmp_path / "b.png", act.copy())
    assert a.read_bytes() == b.read_bytes()
    stored = Image.open(a)
    assert stored.mode == "P"
    assert np.array_equal(np.asarray(stored.convert("RGB")), channel_grid(act))
    single = save_grid_png(tmp_path / "c.png", act[0], min_side=224)
    assert Image.open(single).size == (224, 224)


def test_relevance_pictures_are_red_for_blue_against_and_symmetric_about_zero():
    from cnnviz.render import map_picture

    view = np.full((20, 40, 3), 200, np.uint8)  # light grey image, twice the map's size
    raw = np.zeros((10, 20), np.float32)
    raw[:, :5], raw[:, -5:] = 3.0, -3.0  # for the class left, against it right
    picture = map_picture(view, raw, None, "relevance")
    assert picture.shape == (20, 40, 3)
    left, middle, right = picture[10, 2].astype(int), picture[10, 20].astype(int), picture[10, 37]
    assert left[0] > 150 and left[2] < 100, left  # red
    assert right[2] > 150 and right[0] < 100, right  # blue
    assert abs(int(middle[0]) - int(middle[2])) < 8 and middle.min() > 180  # white-ish: zero
    # the scale is symmetric: -x is drawn as +x with red and blue swapped
    np.testing.assert_array_equal(picture[10, 2][::-1], picture[10, 37])
    mirrored = map_picture(view, -raw, None, "relevance")
    np.testing.assert_array_equal(mirrored[10, 2], picture[10, 37])
