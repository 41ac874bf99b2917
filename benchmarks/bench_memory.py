"""Peak memory (RSS) of each per-shard job against the size of its images.

Runs the real steps as the workflow's rules do (`cnnviz stage`, `predict`, `activations`,
`explain`), each in its own process, on a shard of one image of N x N pixels (a JPEG, smooth
content), and reads each process's peak RSS from the kernel as it exits (/proc/self/status
VmHWM: the peak of the process's own memory; wait4's ru_maxrss would count the forking
parent's memory too, which Linux carries across fork and exec). Beside each
measurement: what the rules ask for (`mem_mb`, plan.job_memory_mb). The model is a small CNN
(tests/cluster/workflow_runs.py tiny_classifier) unless --model names an ONNX file, so the
numbers are the image-size-dependent part plus a small base.

    python3 benchmarks/bench_memory.py                      # sizes 512 .. 9400, ~2 min
    python3 benchmarks/bench_memory.py --sizes 1024 4096 --methods gradcam saliency
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

from cnnviz import plan  # noqa: E402

# The step, run in-process by a wrapper that reports its peak RSS on exit.
WRAPPER = """
import re, sys
from pathlib import Path
from cnnviz.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    hwm = re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)
    Path(sys.argv[1]).write_text(hwm)
sys.exit(rc)
"""


def peak_rss_mb(cmd: list[str], work: Path) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, exit status) of one `cnnviz` step (cmd without the program)."""
    report = work / "peak.txt"
    report.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(report), *cmd], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    peak = int(report.read_text()) / 1024.0 if report.is_file() else float("nan")
    return peak, seconds, done.returncode


def write_image(path: Path, side: int) -> Path:
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    channels = [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2]
    channels.append(np.add.outer(ramp, ramp[::-1]) / 2)
    Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8)).save(path, quality=85)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096, 9400])
    parser.add_argument("--methods", nargs="+", default=["gradcam", "saliency"])
    parser.add_argument("--model", default=None, help="an ONNX classifier (default: a tiny CNN)")
    parser.add_argument("--size", type=int, default=32, help="the model's input side")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"],
                        help="the image file (a JPEG decodes at a reduced scale when staged)")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args()

    cnnviz: list[str] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            source = Path(args.model).resolve()
        else:
            from cluster.workflow_runs import tiny_classifier

            source = tiny_classifier(work / "tiny.onnx", classes=4, side=args.size)
        spec = {"source": f"onnx:{source}",
                "preprocess": {"size": [args.size, args.size], "resize": "stretch"}}  # fmt: skip
        card = work / "models" / "m" / "model.json"
        rss, seconds, rc = peak_rss_mb(
            [*cnnviz, "export", "--name", "m", "--spec", json.dumps(spec), "--card", str(card)],
            work,
        )
        assert rc == 0, "export failed"
        model_bytes = card.with_name("model.onnx").stat().st_size
        print(f"export: {rss:.0f} MB peak RSS, {seconds:.1f} s")
        header = f"{'image':>11} {'step':>20} {'peak RSS MB':>12} {'mem_mb asked':>13} {'s':>6}"
        print(header)
        for side in args.sizes:
            shard = work / f"s{side}"
            shard.mkdir()
            image = write_image(shard / f"photo.{args.format}", side)
            asked_after = plan.job_memory_mb([plan.image_size(image)], model_bytes)
            manifest = shard / "manifest.json"
            steps = {
                "stage": [*cnnviz, "stage", "--manifest", str(manifest), "--staged-dir",
                          str(shard / "staged"), "--ids", "photo", "--images", str(image)],
                "predict": [*cnnviz, "predict", "--card", str(card), "--manifest", str(manifest),
                            "--out", str(shard / "predictions.json"), "--device", "cpu",
                            "--threads", "1"],
                "activations": [*cnnviz, "activations", "--card", str(card), "--manifest",
                                str(manifest), "--out-dir", str(shard / "activations"),
                                "--device", "cpu", "--threads", "1"],
            }  # fmt: skip
            for method in args.methods:
                steps[f"explain {method}"] = [
                    *cnnviz, "explain", "--method", method, "--card", str(card),
                    "--manifest", str(manifest), "--predictions", str(shard / "predictions.json"),
                    "--out-dir", str(shard / method), "--device", "cpu", "--threads", "1",
                ]  # fmt: skip
            staging = plan.job_memory_mb([plan.image_size(image)], 0, staging=True)
            for step, cmd in steps.items():
                asked = staging if step == "stage" else asked_after
                rss, seconds, rc = peak_rss_mb(cmd, work)
                status = "" if rc == 0 else f"  (exit {rc})"
                print(f"{side:>5}x{side:<5} {step:>20} {rss:>12.0f} {asked:>13} {seconds:>6.1f}"
                      f"{status}")  # fmt: skip
                rows.append({"side": side, "step": step, "peak_rss_mb": round(rss),
                             "mem_mb": asked, "seconds": round(seconds, 2), "rc": rc})  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
