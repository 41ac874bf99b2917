"""Output work per shard, the per-image layout against the per-shard one (issue 14, item 5).

One shard of N images (default 32) of EfficientNet-Lite0-sized results, written both ways in one
process, rounds interleaved, median of the rounds:

- per image (as built before): for every image and method a picture (overlay, or the signed
  signal as RGB) + raw .npy + .json (the old common.save_explanation), and a channel grid of
  every layer (49 for Lite0);
- per shard (now): one maps.npy (+ signed.npy) + index.json per method (shard_maps), pictures
  for the `--pictures` best images only (pictures.render_shard's drawing), grids for
  `--grids` layers spread over the depth (activations.grid_layers).

Layer shapes come from a real model card (`--card`, model.json of an exported Lite0); maps,
signals and activations are random (the PNG encoder's time depends a little on content). Only
the writing and drawing are timed, not image decoding (the same both ways).

    python benchmarks/bench_outputs.py --card results/models/efficientnet-lite0/model.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from cnnviz.artifacts import write_json, write_npy
from cnnviz.methods.activations import grid_layers
from cnnviz.methods.shard_maps import write_shard_maps
from cnnviz.render import map_picture, save_grid_png, save_png

METHODS = {"gradcam": False, "gradcampp": False, "layercam": False, "guided_gradcam": True,
           "saliency": False, "guided_backprop": True, "deconvnet": True}  # name: signed


def make_data(n: int, side: int, rng: np.random.Generator) -> dict:
    views = [rng.integers(0, 256, (int(side * 1.6), int(side * 2.1), 3), np.uint8)
             for _ in range(n)]  # a crop of a photo at its own resolution
    maps = {m: rng.random((n, side, side), np.float32) for m in METHODS}
    signed = {m: rng.normal(size=(n, 3, side, side)).astype(np.float32)
              for m, s in METHODS.items() if s}  # fmt: skip
    return {"views": views, "maps": maps, "signed": signed}


def per_image(out: Path, data: dict, layers: list[dict], acts: dict) -> None:
    for m in METHODS:
        folder = out / m
        for i, view in enumerate(data["views"]):
            raw = data["maps"][m][i]
            signal = data["signed"][m][i] if m in data["signed"] else None
            stem = folder / f"img{i:04d}_c281"
            write_npy(f"{stem}.npy", raw)
            save_png(f"{stem}.png", map_picture(view, raw, signal))
            write_json(f"{stem}.json", {"method": m, "image": f"img{i:04d}", "target": 281,
                                        "label": "tabby", "time_s": 0.01})  # fmt: skip
    for i in range(len(data["views"])):
        for row in layers:
            save_grid_png(out / "activations" / f"img{i:04d}" / f"{row['name']}.png",
                          acts[row["name"]])  # fmt: skip


def per_shard(out: Path, data: dict, layers: list[dict], acts: dict, pictures: int,
              grids: int) -> None:
    n = len(data["views"])
    for m in METHODS:
        rows = [{"image": f"img{i:04d}", "target": 281, "method": m, "label": "tabby",
                 "time_s": 0.01} for i in range(n)]  # fmt: skip
        signed = list(data["signed"][m]) if m in data["signed"] else None
        write_shard_maps(out / m, m, "lite0", rows, data["maps"][m], signed)
    for m in METHODS:  # the render job: the chosen images' pictures, then pictures.json
        drawn = []
        for i in range(min(pictures, n)):
            signal = data["signed"][m][i].astype(np.float16).astype(np.float32) \
                if m in data["signed"] else None
            save_png(out / "pictures" / m / f"img{i:04d}_c281.png",
                     map_picture(data["views"][i], data["maps"][m][i], signal))
            drawn.append({"row": i, "image": f"img{i:04d}", "target": 281,
                          "png": f"img{i:04d}_c281.png"})  # fmt: skip
        write_json(out / "pictures" / m / "pictures.json", {"pictures": drawn})
    chosen = set(grid_layers(layers, {"spread": grids}))
    for i in range(n):
        for row in layers:
            if row["name"] in chosen:
                save_grid_png(out / "activations" / f"img{i:04d}" / f"{row['name']}.png",
                              acts[row["name"]])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", required=True, help="model.json of EfficientNet-Lite0")
    parser.add_argument("--images", type=int, default=32, help="images per shard (32)")
    parser.add_argument("--pictures", type=int, default=8, help="report.pictures top N (8)")
    parser.add_argument("--grids", type=int, default=6, help="activations.grids_spread (6)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    card = json.loads(Path(args.card).read_text())
    layers = [row for row in card["layers"] if len(row["shape"]) == 3]
    rng = np.random.default_rng(0)
    side = int(card["preprocess"]["size"][0])
    data = make_data(args.images, side, rng)
    acts = {row["name"]: np.maximum(rng.normal(size=row["shape"]), 0).astype(np.float32)
            for row in layers}  # fmt: skip
    times: dict[str, list[float]] = {"per image": [], "per shard": []}
    for _ in range(args.rounds):
        for name in times:
            out = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
            started = time.perf_counter()
            if name == "per image":
                per_image(out, data, layers, acts)
            else:
                per_shard(out, data, layers, acts, args.pictures, args.grids)
            times[name].append(time.perf_counter() - started)
            shutil.rmtree(out)
    n = args.images
    print(f"{n} images, {len(METHODS)} methods ({sum(METHODS.values())} signed), "
          f"{len(layers)} layers; per shard: top {args.pictures} pictures, {args.grids} grids; "
          f"median of {args.rounds} interleaved rounds")
    print("| layout | s per shard | s per image | range s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {med / n:.3f} | {min(values):.2f}-{max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
