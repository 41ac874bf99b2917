"""A synthetic results folder in the real layout and formats, for the report tests (no model).

Pictures are real PNGs written by the real writers (cnnviz.render.save_png / save_grid_png,
cnnviz.methods.shard_maps for the maps, cnnviz.artifacts.write_json); the JSON files follow
the formats their steps write (predictions.predict_shard, activations.activations_shard,
images.stage_shard, filters.visualize_layer, shard_maps' index, pictures.render_shard).

    python tests/report_fixture.py OUT_DIR [--images N] [--big]   # writes OUT_DIR/results
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from cnnviz.artifacts import write_json  # noqa: E402
from cnnviz.methods.objectives import FILTER_DEFAULT, NEURON_OBJECTIVE  # noqa: E402
from cnnviz.render import overlay, save_grid_png, save_png  # noqa: E402

LABELS = ["tabby cat", "espresso", "rocket", "motor scooter", "astronaut", "camera",
          "golden retriever", "<b>bold</b> & co"]  # fmt: skip
METHODS = [
    "gradcam", "gradcampp", "layercam", "scorecam", "guided_gradcam", "saliency", "smoothgrad",
    "integrated_gradients", "guided_backprop", "deconvnet", "occlusion",
]  # fmt: skip
BENCHMARK_HEADER = (
    "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
)


def photo(seed: int, height: int = 120, width: int = 160) -> np.ndarray:
    """A smooth colourful uint8 picture (compresses like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6))
        + np.cos(5 * y * rng.uniform(0.5, 2) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    rgb = (np.stack(channels, -1) + 2) / 4 * 255
    return rgb.clip(0, 255).astype(np.uint8)


def heat(seed: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    cy, cx = rng.uniform(0.25, 0.75, 2)
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.03).astype(np.float32)


def layer_table(count: int) -> list[dict]:
    rows, channels, side = [], 8, 32
    for depth in range(count):
        if depth and depth % 3 == 0:  # EfficientNet-like: up to 1280 channels, 7x7 at the end
            channels, side = min(1280, channels * 2), max(7, side // 2)
        rows.append({"name": f"block{depth}.conv" if depth else "stem", "depth": depth,
                     "shape": [channels, side, side], "tensor": f"/features.{depth}/Relu_output_0",
                     "activation": "Relu" if depth % 4 != 3 else None})  # fmt: skip
    return rows


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


def make_results(
    root: Path,
    n_images: int = 4,
    model: str = "tinynet",
    methods: list[str] | None = None,
    n_layers: int = 6,
    grids: str = "all",  # "all" | "first" | "none"
    extras: bool = True,  # filters, atlas, metrics, projections, benchmarks
    truth: bool = True,
    failed: bool = True,
    map_side: int = 224,
    variants: int | None = None,  # reuse this many distinct pictures (hard links): big runs
    sparsity: bool = True,
    pictures: int | None = None,  # images with a picture per method (None: all)
) -> Path:
    """Write `root` (the results folder) and return it."""
    from cnnviz.methods.shard_maps import pictures_dir, write_shard_maps

    methods = METHODS if methods is None else methods
    ids = [f"img{i:04d}" for i in range(n_images)]
    if n_images >= 2:
        ids[0], ids[1] = "chelsea", "coffee"
    shard = "s000"
    staged = root / "images" / shard
    pool = root / ".pool"  # distinct pictures for hard links (hidden: the report ignores it)

    def picture(kind: str, index: int, target: Path, make) -> None:
        if variants is None:
            make(target)
            return
        source = pool / kind / f"{index % variants}.png"
        if not source.exists():
            make(source)
        _link_or_copy(source, target)

    entries = []
    for i, image_id in enumerate(ids):
        path = staged / f"{image_id}.png"
        picture("staged", i, path, lambda p, i=i: save_png(p, photo(i)))
        entry = {"id": image_id, "source": f"/data/photos/{image_id}.jpg", "path": str(path),
                 "width": 160, "height": 120}  # fmt: skip
        if truth:
            entry["label"] = LABELS[i % len(LABELS)] if i % 5 else LABELS[(i + 1) % len(LABELS)]
        entries.append(entry)
    failures = [
        {
            "source": "/data/photos/broken <1>.jpg",
            "error": "cannot identify image file: not a picture; replace or remove it",
        }
    ]
    write_json(root / "images" / f"{shard}.json",
               {"images": entries, "failed": failures if failed else []})  # fmt: skip

    # model card + a fake ONNX file whose checksum matches
    model_dir = root / "models" / model
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(b"not really onnx")
    layers = layer_table(n_layers)
    write_json(model_dir / "model.json", {
        "name": model, "source": "onnx:/models/tinynet.onnx", "weights": "file",
        "onnx": "model.onnx", "sha256": hashlib.sha256(b"not really onnx").hexdigest(),
        "opset": 17,
        "input": {"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits", "num_classes": len(LABELS)},
        "preprocess": {"size": [224, 224], "resize": "center_crop", "resize_to": 256,
                       "scale": 255.0, "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225], "channel_order": "RGB"},
        "labels": LABELS,
        "layers": [{**row, "conv_node": f"Conv_{row['depth']}", "conv_output": "c",
                    "kernel": [3, 3], "stride": [1, 1], "groups": 1} for row in layers],
        "verification": {"reference": "torch", "image": "chelsea", "max_abs_diff": 1.2e-5,
                         "tolerance": 1e-3},
        "exporter": {"torch": "2.14.1", "dynamo": False}, "created": "2026-11-27T22:00:00Z",
    })  # fmt: skip

    # predictions (predictions.predict_shard's format)
    rng = np.random.default_rng(1)
    images = []
    for i, image_id in enumerate(ids):
        logits = rng.normal(size=len(LABELS)) * 2
        logits[i % len(LABELS)] += 3
        probs = np.exp(logits) / np.exp(logits).sum()
        order = np.argsort(-probs, kind="stable")[:5]
        images.append(
            {
                "id": image_id,
                "top": [
                    {"index": int(k), "label": LABELS[k], "prob": float(probs[k])} for k in order
                ],
            }
        )
    model_out = root / model
    write_json(model_out / "predictions" / f"{shard}.json",
               {"model": model, "images": images, "failed": []})  # fmt: skip

    # activations (activations.activations_shard's format and layout)
    acts = model_out / "activations" / shard
    stats_images = []
    for i, image_id in enumerate(ids):
        stats = {}
        draw = grids == "all" or (grids == "first" and i == 0)
        for row in layers:
            c, h, w = row["shape"]
            dead = rng.random(c) < min(0.9, 0.08 * row["depth"])
            if not draw:  # numbers only: the report reads the stats, not the arrays
                stats[row["name"]] = {
                    "blank_fraction": float(dead.mean()),
                    "mean": float(rng.random()),
                    "max": float(1 + rng.random()),
                }
                continue
            act = np.maximum(rng.normal(size=(c, h, w)).astype(np.float32), 0)
            act[dead] = 0
            stats[row["name"]] = {
                "blank_fraction": float(dead.mean()),
                "mean": float(act.mean()),
                "max": float(act.max()),
            }
            if draw:
                save_grid_png(acts / image_id / f"{row['name']}.png", act)
                if row["depth"] == 0:
                    save_grid_png(acts / image_id / f"{row['name']}_ch3.png", act[3], min_side=224)
        stats_images.append({"id": image_id, "layers": stats})
    stats_json = acts / f"{shard}.json"
    write_json(stats_json, {"model": model, "eps": 1e-6, "layers": layers,
                            "channels": {"stem": [3]}, "images": stats_images,
                            "failed": []})  # fmt: skip
    if sparsity:
        from cnnviz.methods.activations import sparsity_plot

        sparsity_plot([stats_json], model_out / "activations" / "sparsity.png")

    # per-image methods: per shard one array file + index (methods.shard_maps), and the pictures
    # the render step draws ({model}/pictures/{method}/{shard}/, pictures.json); `pictures`:
    # how many images get one (None: all)
    display = np.asarray(photo(0, map_side, map_side))
    for method in methods:
        out = model_out / method / shard
        drawn_dir = pictures_dir(out)
        rows, maps, drawn = [], [], []
        for i, (image_id, pred) in enumerate(zip(ids, images, strict=True)):
            target = pred["top"][0]["index"]
            info = {"label": LABELS[target], "layer": layers[-1]["name"] if "cam" in method
                    else None, "time_s": 0.01 * (1 + i % 7),
                    "notes": ["approximate: Resize has no backward rule; finite differences"]
                    if method == "guided_backprop" and i == 0 else []}  # fmt: skip
            rows.append({"image": image_id, "target": target, "method": method, **info})
            # big runs: tiny maps (the report reads the index and the pictures, not the values)
            maps.append(heat(i, map_side) if variants is None else np.zeros((4, 4), np.float32))
            if pictures is not None and i >= pictures:
                continue
            name = f"{image_id}_c{target}.png"
            picture(method, i, drawn_dir / name,
                    lambda p, i=i: save_png(p, overlay(display, heat(i, map_side))))
            drawn.append({"row": i, "image": image_id, "target": target, "png": name})
        write_shard_maps(out, method, model, rows, maps)
        write_json(drawn_dir / "pictures.json", {"method": method, "selection": "all",
                                                 "rows": len(rows), "pictures": drawn})
    if extras:
        _extras(root, model_out, model, ids, layers, rng)
    return root


def _extras(
    root: Path,
    model_out: Path,
    model: str,
    ids: list[str],
    layers: list[dict],
    rng: np.random.Generator,
) -> None:
    from cnnviz.methods.shard_maps import ProjectionWriter, pictures_dir
    from cnnviz.render import save_figure
    from matplotlib.figure import Figure

    # deconvnet projections (the explain step's ProjectionWriter: projections.npy + index, and
    # the render step's pictures)
    proj = model_out / "projections" / "s000"
    layer = layers[len(layers) // 2]["name"]
    writer = ProjectionWriter(proj, model, 2, 1, (20, 20))
    drawn = []
    for i, image_id in enumerate(ids[:2]):
        item = {"channel": 3, "value": 4.2, "position": [1, 2], "bbox": [0, 20, 0, 20],
                "projection": rng.normal(size=(3, 20, 20)).astype(np.float32)}
        row = writer.add(image_id, layer, [item], {"time_s": 0.5})
        name = f"{image_id}_{layer}.png"
        save_png(pictures_dir(proj) / name, photo(100 + i, 240, 120))
        drawn.append({"row": row["row"], "image": image_id, "layer": layer, "png": name})
    writer.close()
    write_json(pictures_dir(proj) / "pictures.json",
               {"method": "projections", "selection": "all", "rows": 2, "pictures": drawn})
    # filter visualization (filters.visualize_layer's files), and the deepest layer's neuron
    # pictures (filters.neurons: the same files under neurons/, the neuron objective)
    jobs = [("filters", row, FILTER_DEFAULT) for row in (layers[0], layers[-1])]
    for kind, row, expression in [*jobs, ("neurons", layers[-1], NEURON_OBJECTIVE)]:
        stem = model_out / kind / f"{row['name']}.lucent"
        save_png(f"{stem}.png", photo(200 + row["depth"], 266, 266))
        figure = Figure(figsize=(6, 3.6), dpi=60)
        axes = figure.add_subplot()
        axes.plot(np.log1p(np.arange(64))[None].T * rng.uniform(0.5, 1.5, 8))
        save_figure(str(stem) + ".curve.png", figure)
        write_json(
            f"{stem}.json",
            {
                "model": model,
                "layer": row["name"],
                "tensor": row["tensor"],
                "mode": "lucent",
                "expression": expression,
                "filters": list(range(8)),
                "steps": 64,
                "lr": 0.05,
                "seed": 0,
                "batch_size": 8,
                "image_shape": [128, 128, 3],
                "seconds": 1.5,
                "final": [1.0] * 8,
            },
        )
    # feature atlas (atlas-reduce's layout: atlas/layers/{layer}.png + .json; shards/ are inputs)
    atlas = model_out / "atlas"
    last = layers[-1]
    save_png(atlas / "layers" / f"{last['name']}.png", photo(300, 200, 300))
    strip = f"{last['name']}/ch0004.png"  # the channel's strip: 4 columns of 48 px + 1 px
    save_png(atlas / "layers" / strip, photo(301, 97, 4 * 49 - 1))
    write_json(atlas / "layers" / f"{last['name']}.json", {
        "method": "atlas", "model": model, "layer": last["name"], "tensor": last["tensor"],
        "shape": last["shape"], "top_k": 4, "count": 2, "box": "receptive field",
        "channels": [{"channel": 4, "images": ids[:2], "selectivity": 0.2, "strip": strip,
                      "top": [
            {"image": ids[0], "value": 3.1, "pre": 3.1, "position": [1, 0], "box": [1, 9, 0, 5]},
            {"image": ids[1], "value": 2.9, "pre": 3.4, "position": [0, 1], "box": [0, 8, 1, 6]},
            {"image": "gone", "value": 1.1, "pre": 1.1, "position": [0, 0], "box": [0, 8, 0, 5]}]},
        ], "strip": {"cell": 48, "sep": 1, "rows": ["projection", "patch"]},
        "policy": "guided", "policy_reason": "auto: no max pooling below this layer",
        "selection": "most_selective", "images_ranked": len(ids)})  # fmt: skip
    write_json(atlas / "shards" / "s000.json", {"format": "cnnviz.atlas.shard/1", "model": model})
    # metrics (metrics-summary's summary.json, its plots, and the per-shard files)
    metrics = model_out / "metrics"
    write_json(metrics / "summary.json", {
        "description": f"How far the explanations of model '{model}' can be trusted.",
        "model": model, "reference": "random", "maps": 2 * len(ids), "shards": ["s000"],
        "how_to_read": {"deletion_auc": "Area under the class probability while the most "
                        "important pixels are removed first: lower is better.",
                        "randomized_spearman": "Should be near 0."},
        "methods": {"random": {"maps": len(ids), "deletion_auc_mean": 0.441, "flags": ""},
                    "gradcam": {"maps": len(ids), "deletion_auc_mean": 0.21,
                                "randomized_spearman": 0.12, "flags": ""}},
        "flags": [], "randomization_spearman": {}, "timing_s_per_map": {"gradcam": {"s": 0.2}},
        "settings": {"steps": 56, "randomization": {"cuts": 6}},
        "plots": {"deletion_insertion": "deletion_insertion.png"}, "failed": []})  # fmt: skip
    plot = Figure(figsize=(6, 3), dpi=60)
    plot.add_subplot().plot([0, 1], [0.5, 0.1])
    save_figure(metrics / "deletion_insertion.png", plot)
    write_json(metrics / "s000" / "gradcam.json", {"model": model, "method": "gradcam"})
    # Snakemake benchmark files
    for rule, sub, seconds in (
        ("export", f"{model}.tsv", 12.5),
        ("predict", f"{model}/s000.tsv", 3.2),
        ("activations", f"{model}/s000.tsv", 8.0),
        ("explain", f"{model}/gradcam/s000.tsv", 4.0),
    ):
        path = root / "benchmarks" / rule / sub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            BENCHMARK_HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t100\t200\t"
            "90\t95\t0\t1\t50\t1.0\n"
        )


def big_results(root: Path, n_images: int = 1000) -> Path:
    """1,000 images, 11 methods, 49 layers of stats: the scale the model page must handle."""
    return make_results(
        root,
        n_images=n_images,
        n_layers=49,
        grids="first",
        extras=False,
        variants=12,
        map_side=112,
        sparsity=False,
    )


if __name__ == "__main__":
    out = Path(sys.argv[1]) / "results"
    if "--big" in sys.argv:
        big_results(out)
    else:
        count = int(sys.argv[sys.argv.index("--images") + 1]) if "--images" in sys.argv else 4
        make_results(out, n_images=count)
    print(out)
