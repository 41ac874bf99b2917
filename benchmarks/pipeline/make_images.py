"""Write N test images: random crops (and flips) of scikit-image's bundled photos.

Deterministic for a given seed: image i is a crop of photo i % 6 with its own random box (side
45-100% of the photo's shorter side, aspect 3:4 to 4:3), flipped left-right with probability 1/2
and upside down with probability 1/10. PNG, RGB (camera stays grey: the pipeline converts it).

    python benchmarks/pipeline/make_images.py --count 500 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "camera")


def photo(name: str) -> np.ndarray:
    from skimage import data

    picture = getattr(data, name)()
    return picture[0] if name == "stereo_motorcycle" else picture  # (left, right, disparity)


def variant(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random crop of `picture`, maybe flipped."""
    h, w = picture.shape[:2]
    side = rng.uniform(0.45, 1.0) * min(h, w)
    aspect = rng.uniform(0.75, 4 / 3)
    ch, cw = min(h, round(side / aspect**0.5)), min(w, round(side * aspect**0.5))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = picture[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.1:
        crop = crop[::-1]
    return np.ascontiguousarray(crop)


def write_images(count: int, seed: int, out: Path) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    photos = {name: photo(name) for name in PHOTOS}
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        path = out / f"img{i:04d}_{name}.png"
        Image.fromarray(variant(photos[name], rng)).save(path, format="PNG")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="how many images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder to write them into")
    args = parser.parse_args(argv)
    write_images(args.count, args.seed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
