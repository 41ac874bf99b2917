"""The whole workflow at scale: wall time, model compute, overhead and peak memory.

One run: generate N images (crops and flips of the sample photos, written by the benchmark rule
in benchmarks/pipeline/Snakefile), write a config for the main workflow (EfficientNet-Lite0
pretrained, images.paths = that folder, no sample photos, the chosen per-image methods;
filters, atlas and metrics off: metrics alone cost ~100 s per image), and run

    nice -n 5 /usr/bin/time -v python -m snakemake -s workflow/Snakefile --configfile C
        --directory RUN --cores 2

in a fresh folder RUN, its process tree polled for memory. Every Python process of the run
imports benchmarks/pipeline/sitecustomize.py (CNNVIZ_PROFILE set), which records its fork time,
exit time, and the seconds spent in imports, ORT session creation, ORT `session.run` and
artifact writes.

Model compute = the time inside ONNX Runtime `InferenceSession.run` calls, summed over every
job (ORT jobs ask for 2 threads of --cores 2, so they never overlap). Overhead = wall - compute:
Snakemake (no job process alive), process start, imports, session creation, file writes, and
the rest of each job's Python (image decoding, graph building, map post-processing, overlays).

    python benchmarks/bench_pipeline.py --images 24 --shard-size 8 --methods all --out /tmp/pb
    python benchmarks/bench_pipeline.py --summarize /tmp/pb/run-*/summary.json

Writes RUN/summary.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "pipeline"
ALL_METHODS = [
    "gradcam",
    "gradcampp",
    "layercam",
    "guided_gradcam",
    "scorecam",
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "deconvnet",
    "occlusion",
    "projections",
]


# ---- the run -------------------------------------------------------------------------------
def make_images(out: Path, count: int, seed: int) -> Path:
    """N images via the benchmark rule (reused when that folder already exists)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(HERE / "Snakefile"),
        "--directory",
        str(out),
        "--cores",
        "1",
        "--quiet",
        "--config",
        f"count={count}",
        f"seed={seed}",
        f"out={out}",
    ]
    with open(out / "images.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out / f"images-n{count}-seed{seed}"


def workflow_config(args: argparse.Namespace, images: Path, results: Path) -> dict[str, Any]:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(
        output=str(results),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
    )
    config["images"].update(samples=[], paths=[str(images)])
    config["methods"]["enabled"] = args.methods
    config["filters"]["enabled"] = False
    config["atlas"]["enabled"] = False
    config["metrics"]["enabled"] = False
    return config


class Monitor(threading.Thread):
    """Poll a process tree's resident memory: peak of the sum, peak of any one process."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.tree_peak = 0
        self.process_peak = (0, "")
        self.snakemake_peak = 0  # RSS of the Snakemake process itself

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.wait(self.interval):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    total += rss
                    if rss > self.process_peak[0]:
                        self.process_peak = (rss, " ".join(proc.cmdline()[:4]))
                    if proc.pid != root.pid and "snakemake" in " ".join(proc.cmdline()[:3]):
                        self.snakemake_peak = max(self.snakemake_peak, rss)
                except psutil.Error:
                    continue
            self.tree_peak = max(self.tree_peak, total)


def run_workflow(args: argparse.Namespace, run_dir: Path, images: Path) -> dict[str, Any]:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = workflow_config(args, images, run_dir / "results")
    configfile = run_dir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    profile = run_dir / "profile.jsonl"
    env = dict(os.environ)
    env["CNNVIZ_PROFILE"] = str(profile)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(REPO / "scripts"), *filter(None, [env.get("PYTHONPATH")])]
    )
    snakemake = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "--configfile",
        str(configfile),
        "--directory",
        str(run_dir),
        "--cores",
        str(args.cores),
    ]
    cmd = ["nice", "-n", str(args.nice), "/usr/bin/time", "-v", "-o", str(run_dir / "time.txt")]
    cmd += snakemake
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(run_dir / "snakemake.log", "w") as log:
        load_before = os.getloadavg()[0]
        started_epoch, started = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = Monitor(proc.pid)
        monitor.start()
        rc = proc.wait()
        wall = time.perf_counter() - started
        monitor.stop.set()
        monitor.join()
    if rc != 0:
        tail = (run_dir / "snakemake.log").read_text()[-3000:]
        raise SystemExit(f"snakemake failed ({rc}); {run_dir}/snakemake.log ends:\n{tail}")
    return {
        "wall_s": wall,
        "started": started_epoch,
        "load_before": load_before,
        "tree_peak_rss_mb": monitor.tree_peak / 2**20,
        "process_peak_rss_mb": monitor.process_peak[0] / 2**20,
        "process_peak_cmd": monitor.process_peak[1],
        "snakemake_peak_rss_mb": monitor.snakemake_peak / 2**20,
    }


# ---- the analysis --------------------------------------------------------------------------
def read_time_v(path: Path) -> dict[str, float]:
    wanted = {
        "User time (seconds)": "user_s",
        "System time (seconds)": "sys_s",
        "Maximum resident set size (kbytes)": "maxrss_kb",
    }
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in wanted:
            out[wanted[key]] = float(value)
    return out


def read_benchmarks(results: Path) -> dict[str, Any]:
    """Snakemake's per-job benchmark TSVs: sum of wall seconds, peak max_rss, per rule."""
    rules: dict[str, dict[str, float]] = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        header, row = tsv.read_text().splitlines()[:2]
        values = dict(zip(header.split("\t"), row.split("\t"), strict=False))
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        entry = rules.setdefault(rule, {"jobs": 0, "s": 0.0, "max_rss_mb": 0.0})
        entry["jobs"] += 1
        entry["s"] += float(values["s"])
        rss = values.get("max_rss", "NA")
        if rss not in ("NA", "-"):
            entry["max_rss_mb"] = max(entry["max_rss_mb"], float(rss))
    return rules


def step_of(argv: list[str]) -> str:
    """`cnnviz [--opts] explain --method M` -> explain:M; `cnnviz predict` -> predict."""
    name = Path(argv[0]).name if argv else "?"
    if "snakemake" in " ".join(argv[:3]):
        return "snakemake"
    if name != "cnnviz":
        return name
    words = [w for w in argv[1:] if not w.startswith("-")]
    step = words[0] if words else "cnnviz"
    if step == "explain" and "--method" in argv[:-1]:
        return f"explain:{argv[argv.index('--method') + 1]}"
    return step


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


COMPONENTS = ("startup_s", "import_s", "session_s", "run_s", "write_s", "other_s")


def analyse(run_dir: Path, run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "profile.jsonl").read_text().splitlines()]
    jobs = [r for r in records if step_of(r["argv"]) != "snakemake"]
    main = [r for r in records if step_of(r["argv"]) == "snakemake"]
    steps: dict[str, dict[str, float]] = {}
    for r in jobs:
        wall = r["end"] - r["start"]
        parts = {
            "startup_s": r["site"] - r["start"],
            "import_s": r["import_s"],
            "session_s": r["session_s"],
            "run_s": r["run_s"],
            "write_s": r["write_s"],
        }
        parts["other_s"] = wall - sum(parts.values())
        entry = steps.setdefault(
            step_of(r["argv"]), {"jobs": 0, "wall_s": 0.0, "maxrss_mb": 0.0, "sessions": 0}
        )
        entry["jobs"] += 1
        entry["wall_s"] += wall
        entry["sessions"] += r["session_n"]
        entry["maxrss_mb"] = max(entry["maxrss_mb"], r["maxrss_kb"] / 1024)
        for key, value in parts.items():
            entry[key] = entry.get(key, 0.0) + value
    wall = run["wall_s"]
    job_sum = sum(s["wall_s"] for s in steps.values())
    busy = union_length([(r["start"], r["end"]) for r in jobs])
    totals = {key: sum(s.get(key, 0.0) for s in steps.values()) for key in COMPONENTS}
    compute = totals["run_s"]
    summary = {
        "label": args.label,
        "images": args.images,
        "shard_size": args.shard_size,
        "shards": -(-args.images // args.shard_size),
        "methods": args.methods,
        "batch_size": args.batch_size,
        "wall_s": wall,
        "compute_s": compute,
        "overhead_s": wall - compute,
        "overhead_share": (wall - compute) / wall,
        "overhead_per_compute": (wall - compute) / compute if compute else None,
        "snakemake_only_s": wall - busy,
        "job_sum_s": job_sum,
        "job_overlap_s": job_sum - busy,
        "components": totals,
        "steps": steps,
        "snakemake_main": main[0] if main else None,
        "benchmarks_tsv": read_benchmarks(run_dir / "results"),
        "time_v": read_time_v(run_dir / "time.txt"),
        **{k: v for k, v in run.items() if k != "started"},
        "processes": len(records),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started"])),
        "load_after": os.getloadavg()[0],
    }
    return summary


# ---- the tables ----------------------------------------------------------------------------
def fixed_per_job(s: dict[str, Any]) -> float:
    """Seconds per job that do not depend on its images: Snakemake-only time, process start,
    imports and session creation, over the jobs (the export job, which imports torch, left out).
    """
    c, steps = s["components"], dict(s["steps"])
    export = steps.pop("export", None)
    fixed = s["snakemake_only_s"] + c["startup_s"] + c["import_s"] + c["session_s"]
    if export:
        fixed -= export["startup_s"] + export["import_s"] + export["session_s"]
    return fixed / max(1, sum(v["jobs"] for v in steps.values()))


def tables(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| run | images | shard | jobs | wall s | compute s | overhead s | overhead / wall"
        " | overhead / compute | Snakemake-only s | Σ TSV s | CPU s | load | peak job RSS MB"
        " | peak tree RSS MB | Snakemake RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        tsv = s["benchmarks_tsv"]
        job_rss = max([v["maxrss_mb"] for v in s["steps"].values()] or [0])
        main = s.get("snakemake_main") or {}
        lines.append(
            f"| {s['label']} | {s['images']} | {s['shard_size']} "
            f"| {sum(v['jobs'] for v in s['steps'].values())} | {s['wall_s']:.0f} "
            f"| {s['compute_s']:.0f} | {s['overhead_s']:.0f} | {s['overhead_share']:.1%} "
            f"| {s['overhead_per_compute']:.1%} | {s['snakemake_only_s']:.0f} "
            f"| {sum(v['s'] for v in tsv.values()):.0f} "
            f"| {s['time_v'].get('user_s', 0) + s['time_v'].get('sys_s', 0):.0f} "
            f"| {s.get('load_before', 0):.1f}-{s.get('load_after', 0):.1f} | {job_rss:.0f} "
            f"| {s['tree_peak_rss_mb']:.0f} | {main.get('maxrss_kb', 0) / 1024:.0f} |"
        )
    lines += ["", "Overhead, broken down (seconds; job parts summed over jobs):", ""]
    lines.append(
        "| run | Snakemake-only | process start | imports | session creation | file writes"
        " | other job Python | - overlap of 1-thread jobs | = overhead | fixed cost / job |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        c = s["components"]
        lines.append(
            f"| {s['label']} | {s['snakemake_only_s']:.1f} | {c['startup_s']:.1f} "
            f"| {c['import_s']:.1f} | {c['session_s']:.1f} | {c['write_s']:.1f} "
            f"| {c['other_s']:.1f} | {s['job_overlap_s']:.1f} | {s['overhead_s']:.1f} "
            f"| {fixed_per_job(s):.2f} |"
        )
    for s in summaries:
        n = s["images"]
        lines += [
            "",
            f"Per step, run {s['label']} ({n} images; seconds per image unless marked):",
            "",
            "| step | jobs | wall / image | compute / image | start+imports / job"
            " | sessions / job | writes / image | other / image | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in sorted(s["steps"].items(), key=lambda kv: -kv[1]["wall_s"]):
            j = v["jobs"]
            lines.append(
                f"| {name} | {j} | {v['wall_s'] / n:.3f} | {v['run_s'] / n:.3f} "
                f"| {(v['startup_s'] + v['import_s']) / j:.2f} | {v['session_s'] / j:.2f} "
                f"| {v['write_s'] / n:.3f} | {v['other_s'] / n:.3f} | {v['maxrss_mb']:.0f} |"
            )
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    if text == "all":
        return list(ALL_METHODS)
    methods = [m for m in re.split(r"[,\s]+", text) if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods: {', '.join(unknown)}")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=24, help="how many images (default 24)")
    parser.add_argument("--shard-size", type=int, default=8, help="images per job (default 8)")
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=list(ALL_METHODS),
        help="'all' (default: the 12 per-image methods) or a comma-separated list; "
        "'' runs predictions and activations only",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/cnnviz-bench-pipeline"),
        help="folder for the images and the runs (default %(default)s)",
    )
    parser.add_argument("--label", default="", help="run folder name (default n{N}-s{S})")
    parser.add_argument("--seed", type=int, default=0, help="image generator seed")
    parser.add_argument("--batch-size", type=int, default=8, help="config batch_size")
    parser.add_argument("--threads", type=int, default=2, help="config threads (ORT per job)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--nice", type=int, default=5, help="nice level of the run")
    parser.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        default=None,
        help="print the tables of earlier runs' summary.json files, run nothing",
    )
    args = parser.parse_args(argv)

    if args.summarize:
        print(tables([json.loads(p.read_text()) for p in args.summarize]))
        return 0
    args.label = args.label or f"n{args.images}-s{args.shard_size}"
    out = args.out.resolve()
    images = make_images(out, args.images, args.seed)
    run_dir = out / f"run-{args.label}"
    run = run_workflow(args, run_dir, images)
    summary = analyse(run_dir, run, args)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(tables([summary]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
