"""Feature atlas map + reduce: wall time and peak memory over a few hundred images.

Writes `--images` generated photos (random crops, flips and rescales of scikit-image's sample
photos, seeded), stages them in shards of `--shard-size`, then runs each step as its own
process through the real CLI (`cnnviz atlas-map` per shard, `cnnviz atlas-reduce` once), as the
workflow does, under `/usr/bin/time -v` for the peak resident memory. To show that the map's
memory does not grow with the number of images, one extra map runs over all images as a
single shard. Usage:

    python benchmarks/bench_atlas.py [--model-dir results/models/efficientnet-lite0]
        [--images 256] [--shard-size 32] [--threads 2] [--out /tmp/bench-atlas]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="results/models/efficientnet-lite0")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/bench-atlas")
    args = parser.parse_args()
    out = Path(args.out)
    card = Path(args.model_dir) / "model.json"
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
    maps, shard_files = [], []
    for manifest in manifests:
        shard_files.append(out / "atlas" / "shards" / f"{manifest.stem}.json")
        maps.append(
            timed(
                [
                    *cnnviz,
                    "atlas-map",
                    "--card",
                    str(card),
                    "--manifest",
                    str(manifest),
                    "--out",
                    str(shard_files[-1]),
                    *runtime,
                ]
            )
        )
    single = timed(
        [
            *cnnviz,
            "atlas-map",
            "--card",
            str(card),
            "--manifest",
            str(whole),
            "--out",
            str(out / "atlas" / "single.json"),
            *runtime,
        ]
    )
    reduce = timed(
        [
            *cnnviz,
            "atlas-reduce",
            "--card",
            str(card),
            "--shards",
            *map(str, shard_files),
            "--manifests",
            *map(str, manifests),
            "--out-dir",
            str(out / "atlas" / "layers"),
            *runtime,
        ]
    )
    layers = sorted(p.stem for p in (out / "atlas" / "layers").glob("*.json"))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "images": args.images, "shards": len(manifests), "shard_size": args.shard_size,
        "threads": args.threads, "batch_size": args.batch_size, "layers": layers,
        "map_per_shard": {key: [m[key] for m in maps] for key in maps[0]},
        "map_total_wall_s": round(sum(m["wall_s"] for m in maps), 2),
        "map_total_cpu_s": round(sum(m["cpu_s"] for m in maps), 2),
        "map_single_shard_all_images": single,
        "reduce": reduce,
        "shard_file_kb": round(sum(p.stat().st_size for p in shard_files) / 1024
                               / len(shard_files)),
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
