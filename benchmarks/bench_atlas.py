"""Feature atlas map + reduce at dataset scale: CPU time and peak memory per step.

Writes `--images` generated photos (random crops, flips and rescales of scikit-image's sample
photos, seeded) or takes every picture in `--folder`, stages them in shards of `--shard-size`,
then runs each step as its own process through the real CLI (`cnnviz atlas-map` per shard,
`cnnviz atlas-reduce` once), as the workflow does, under `/usr/bin/time -v` for the CPU time and
the peak resident memory. Besides the sharded run it measures, in the same run:

- the map's cost per image against a plain forward pass of the same model over the same images
  (this script's `--forward MANIFEST`: the map's image reading and batching, the model's output
  only), each as the slope between one shard of the first `--shard-size` images and one shard of
  all images, so process start-up, model load and session creation cancel;
- the map's peak memory at `--shard-size` images and at all images in one shard (flat);
- the reduce over all shards at the default channels x top-k, at a quarter of the channels, and
  over the first shard only (its cost follows channels x k, not the number of images).

Usage:

    python benchmarks/bench_atlas.py --model-dir <dir with model.json> [--images 1000]
        [--folder FOLDER] [--shard-size 32] [--threads 2] [--out /tmp/bench-atlas]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from cnnviz.images import SAMPLE_IMAGES, stage_shard  # noqa: E402
from cnnviz.plan import assign_ids  # noqa: E402

PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def generate(out: Path, count: int, seed: int = 0) -> list[Path]:
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = []
    for name in SAMPLE_IMAGES:
        array = getattr(data, SAMPLE_IMAGES[name])()
        array = array[0] if isinstance(array, tuple) else array
        photos.append(Image.fromarray(np.asarray(array)).convert("RGB"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize((int(rng.integers(160, 320)),) * 2, Image.Resampling.BILINEAR)
        paths.append(out / f"gen{i:04d}.png")
        crop.save(paths[-1])
    return paths


def forward(card_path: Path, manifest: Path, threads: int, batch_size: int) -> None:
    """The baseline: the map's reading and batching, one plain forward of the model per batch."""
    import onnx
    from cnnviz.images import read_manifest, shard_batches
    from cnnviz.modelcard import load_card, model_path
    from cnnviz.runtime import make_session

    card = load_card(card_path.parent)
    session = make_session(onnx.load(str(model_path(card_path.parent, card))), "cpu", threads)
    feed = session.get_inputs()[0].name
    entries = read_manifest(manifest)["images"]
    count = 0
    for ids, inputs in shard_batches(entries, card["preprocess"], batch_size, lambda e, x: None):
        if len(ids) < batch_size:  # the map pads its last batch the same way
            pad = np.zeros((batch_size - len(ids), *inputs.shape[1:]), np.float32)
            inputs = np.concatenate([inputs, pad])
        session.run(None, {feed: inputs})
        count += len(ids)
    print(json.dumps({"images": count}))


def timed(cmd: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    cpu = sum(
        float(re.search(rf"{key} time \(seconds\): ([\d.]+)", result.stderr).group(1))
        for key in ("User", "System")
    )
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss / 1024)}


def slope(small: dict[str, float], large: dict[str, float], extra: int) -> float:
    """CPU ms per image between two runs that differ by `extra` images."""
    return round(1000 * (large["cpu_s"] - small["cpu_s"]) / extra, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="results/models/efficientnet-lite0")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--folder", help="take the pictures in this folder (sorted, at most "
                        "--images) instead of generated ones")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/bench-atlas")
    parser.add_argument("--forward", help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    card = Path(args.model_dir) / "model.json"
    if args.forward:
        forward(card, Path(args.forward), args.threads, args.batch_size)
        return
    out = Path(args.out)
    if args.folder:
        found = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in PICTURES)
        paths = found[: args.images]
    else:
        paths = generate(out / "inputs", args.images)
    pairs = list(zip(assign_ids(paths), paths, strict=True))
    manifests = []
    for s, start in enumerate(range(0, len(pairs), args.shard_size)):
        manifest = out / "images" / f"s{s:03d}.json"
        stage_shard(pairs[start : start + args.shard_size], out / "images" / f"s{s:03d}", manifest)
        manifests.append(manifest)
    whole = out / "images" / "all.json"
    stage_shard(pairs, out / "images" / "all", whole)
    runtime = ["--device", "cpu", "--threads", str(args.threads),
               "--batch-size", str(args.batch_size)]  # fmt: skip
    cnnviz = [sys.executable, "-m", "cnnviz.cli"]

    def atlas_map(manifest: Path, target: Path) -> dict[str, float]:
        return timed([*cnnviz, "atlas-map", "--card", str(card), "--manifest", str(manifest),
                      "--out", str(target), *runtime])  # fmt: skip

    def baseline(manifest: Path) -> dict[str, float]:
        return timed([sys.executable, __file__, "--model-dir", args.model_dir, "--forward",
                      str(manifest), "--threads", str(args.threads),
                      "--batch-size", str(args.batch_size)])  # fmt: skip

    def reduce(shards: list[Path], manifests: list[Path], target: str, **options: int) -> dict:
        return timed([*cnnviz, "atlas-reduce", "--card", str(card), "--shards", *map(str, shards),
                      "--manifests", *map(str, manifests), "--out-dir", str(out / "atlas" / target),
                      "--options", json.dumps(options), *runtime])  # fmt: skip

    n, first = len(pairs), min(args.shard_size, len(pairs))
    # Interleaved, so a change of the machine's load hits both sides of each comparison alike.
    forward_small = baseline(manifests[0])
    map_small = atlas_map(manifests[0], out / "atlas" / "first.json")
    forward_all = baseline(whole)
    map_all = atlas_map(whole, out / "atlas" / "single.json")
    maps, shard_files = [], []
    for manifest in manifests:
        shard_files.append(out / "atlas" / "shards" / f"{manifest.stem}.json")
        maps.append(atlas_map(manifest, shard_files[-1]))
    reduce_all = reduce(shard_files, manifests, "layers", count=16, top_k=9)
    reduce_quarter = reduce(shard_files, manifests, "quarter", count=4, top_k=9)
    reduce_first = reduce(shard_files[:1], manifests[:1], "first", count=16, top_k=9)
    layers = sorted(p.stem for p in (out / "atlas" / "layers").glob("*.json"))
    map_ms, forward_ms = slope(map_small, map_all, n - first), slope(forward_small, forward_all,
                                                                     n - first)  # fmt: skip
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "images": n, "shards": len(manifests), "shard_size": args.shard_size,
        "threads": args.threads, "batch_size": args.batch_size, "layers": layers,
        "forward_one_shard": forward_small, "forward_all_images": forward_all,
        "map_one_shard": map_small, "map_all_images_one_shard": map_all,
        "cpu_ms_per_image": {"forward": forward_ms, "map": map_ms,
                             "map_over_forward": round(map_ms / forward_ms, 2)},
        "map_per_shard": {key: [m[key] for m in maps] for key in maps[0]},
        "map_total_wall_s": round(sum(m["wall_s"] for m in maps), 2),
        "map_total_cpu_s": round(sum(m["cpu_s"] for m in maps), 2),
        "reduce_16ch_9_all_shards": reduce_all,
        "reduce_4ch_9_all_shards": reduce_quarter,
        "reduce_16ch_9_first_shard": reduce_first,
        "shard_file_kb": round(sum(p.stat().st_size for p in shard_files) / 1024
                               / len(shard_files)),
        "single_shard_file_kb": round((out / "atlas" / "single.json").stat().st_size / 1024),
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
