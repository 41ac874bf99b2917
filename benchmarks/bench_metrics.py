"""The cost of the explanation-quality metrics per map, on EfficientNet-Lite0 (ONNX Runtime).

For each method: the explain step (the maps), then `cnnviz.metrics.metrics_shard` with the
default metrics settings (deletion + insertion at 56 steps, ROAD at 5 fractions, the
randomization test at 6 cuts for the methods it runs on by default, class sensitivity against
the least probable class, max-sensitivity at 3 samples, sparseness, complexity and, with
--boxes, the pointing games). The numbers are the job's own timings (seconds per map, each part
timed apart), for the sample photos given (default chelsea and coffee), 224 x 224, batch 8
(gradient graphs) / 32 (forwards); then the summary's ranking per metric.

    python benchmarks/bench_metrics.py [--model-dir DIR] [--methods gradcam saliency ...]
        [--images chelsea coffee] [--boxes boxes.csv] [--steps 56] [--device cpu]
        [--threads 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

ALL = ["gradcam", "gradcampp", "layercam", "guided_gradcam", "scorecam", "saliency", "smoothgrad",
       "integrated_gradients", "guided_backprop", "deconvnet", "occlusion"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="exported model (else export)")
    parser.add_argument("--methods", nargs="+", default=ALL)
    parser.add_argument("--images", nargs="+", default=["chelsea", "coffee"])
    parser.add_argument("--steps", type=int, default=56)
    parser.add_argument("--boxes", type=Path, default=None, help="object boxes CSV (optional)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    from cnnviz.images import stage_shard, write_sample_images
    from cnnviz.methods.explain import explain_shard
    from cnnviz.metrics import metrics_shard, summarize
    from cnnviz.runtime import providers_for

    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    model_dir = args.model_dir
    if model_dir is None:
        from cnnviz.export import export_model

        model_dir = work / "model"
        export_model("efficientnet-lite0", "efficientnet-lite0", model_dir)
    paths = write_sample_images(work / "samples", args.images)
    manifest = work / "images" / "s000.json"
    stage_shard([(p.stem, p) for p in paths], work / "images" / "s000", manifest)
    options = {"target": "top1"}
    rows = []
    for method in args.methods + ["random"]:
        maps = work / method
        started = time.perf_counter()
        if method != "random":
            explain_shard(model_dir, manifest, method, maps, options, args.device, args.threads, 8)
        explain_s = (time.perf_counter() - started) / len(paths)
        result = metrics_shard(
            model_dir, manifest, method, work / "metrics" / f"{method}.json",
            None if method == "random" else maps, options, {"steps": args.steps},
            args.device, args.threads, 8, args.boxes,
        )  # fmt: skip
        t = result["timing"]
        rows.append((method, explain_s, t.get("deletion_insertion_s_per_map"),
                     t.get("road_s_per_map"), t.get("randomization_s_per_map"),
                     t.get("randomization_s_per_map_and_cut"),
                     t.get("class_sensitivity_s_per_map"),
                     t.get("max_sensitivity_s_per_map")))  # fmt: skip
        print(rows[-1], flush=True)

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    lines = [
        f"EfficientNet-Lite0, {len(paths)} images ({', '.join(args.images)}), steps {args.steps},"
        f" device {args.device} ({providers_for(args.device)[0]}), {args.threads} threads,"
        f" {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| method | explain s/map | deletion+insertion s/map | ROAD s/map | randomization s/map "
        "| randomization s/map/cut | class sensitivity s/map | max-sensitivity s/map |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | " + " | ".join(cell(v) for v in vals) + " |" for m, *vals in rows]
    summary = summarize(sorted((work / "metrics").glob("*.json")), work / "summary")
    lines += ["", "| metric | better | methods, best first |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['better']} | "
              + ", ".join(f"{o['method']} {o['value']:.3f}" for o in r["order"]) + " |"
              for r in summary["ranking"]]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
