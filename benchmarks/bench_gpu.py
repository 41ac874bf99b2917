"""Grad-CAM and guided backprop throughput on a GPU (ONNX Runtime, CUDA provider).

EfficientNet-Lite0 (an exported model.json folder, or exported here with the package's own
export code), 224x224 inputs (the sample photos, preprocessed, repeated to fill the batch),
target = each image's top-1 class. Per method and batch size: one session with the batch fixed
to B (as the pipeline builds them), `--warmup` calls not timed, then `--repeats` timed calls;
the median is reported. Two rates per row:

  method   images/s of the whole call as `cnnviz explain` makes it (session.run plus the numpy
           work on the CPU: one-hot seeds, padding, Grad-CAM weighting and 224x224 upsampling)
  ORT run  images/s of `session.run` alone, inputs already in host memory

`--device cuda` (default) fails with exit code 2 unless ONNX Runtime really runs on CUDA;
`--device cpu` runs the same code path on the CPU (to test the script; use a tiny batch).

    python benchmarks/bench_gpu.py [--model-dir DIR] [--device cuda|cpu] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import atexit
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def load_model(model_dir: Path | None) -> tuple[Any, dict[str, Any], Path]:
    import onnx
    from cnnviz.modelcard import load_card, model_path

    if model_dir is None:
        from cnnviz.export import export_model

        model_dir = Path(tempfile.mkdtemp(prefix="cnnviz-gpu-"))
        atexit.register(shutil.rmtree, model_dir, True)
        started = time.perf_counter()
        export_model("efficientnet-lite0", "efficientnet-lite0", model_dir)
        print(
            f"exported EfficientNet-Lite0 to {model_dir} in {time.perf_counter() - started:.0f} s"
        )
    card = load_card(model_dir)
    return onnx.load(str(model_path(model_dir))), card, model_dir


def photos(card: dict[str, Any], count: int) -> np.ndarray:
    from cnnviz.images import preprocess
    from PIL import Image
    from skimage import data

    base = [preprocess(Image.fromarray(getattr(data, n)()), card["preprocess"]) for n in PHOTOS]
    return np.stack([base[i % len(base)] for i in range(count)]).astype(np.float32)


def check_device(device: str, session: Any) -> None:
    """Exit 2 unless the session really runs on the asked-for provider."""
    active = session.get_providers()
    if device == "cuda" and active[0] != "CUDAExecutionProvider":
        print(f"error: asked for CUDA but the session runs on {active}", file=sys.stderr)
        raise SystemExit(2)


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cnnviz.methods import backprop, cam
    from cnnviz.runtime import make_session

    model, card, model_dir = load_model(args.model_dir)
    threads = args.threads if args.device == "cpu" else None
    forward = make_session(model, args.device, threads)
    check_device(args.device, forward)
    x_all = photos(card, max(args.batches))
    input_name = forward.get_inputs()[0].name
    logits = forward.run(None, {input_name: x_all[: len(PHOTOS)]})[0]
    top1 = [int(logits[i % len(PHOTOS)].argmax()) for i in range(len(x_all))]
    classes = int(card["output"]["num_classes"])
    rows = []
    for batch in args.batches:
        x, targets = x_all[:batch], top1[:batch]
        seeds = np.zeros((batch, classes), np.float32)
        seeds[np.arange(batch), targets] = 1.0

        # Grad-CAM: the cut vjp graph (backward stops at the last conv layer), batch fixed to B.
        started = time.perf_counter()
        graph, _ = cam.build_cam_model(model, card, None, batch=batch)
        session = make_session(graph, args.device, threads)
        build_s = time.perf_counter() - started
        check_device(args.device, session)
        names = cam._CamSession(session, card, None)
        feeds = {names.input: x, names.seed: seeds}
        rows.append(
            row(
                "Grad-CAM",
                batch,
                build_s,
                timed(
                    lambda s=session, x=x, t=targets: cam.grad_cam_family(
                        s, card, x, t, None, ("gradcam",)
                    ),
                    args.warmup,
                    args.repeats,
                ),
                timed(
                    lambda s=session, f=feeds, o=names.outputs: s.run(o, f),
                    args.warmup,
                    args.repeats,
                ),
            )
        )
        del session

        # Guided backprop: the whole-model input-gradient graph under the guided ReLU rule.
        started = time.perf_counter()
        session = backprop.gradient_session(model, "guided", batch, args.device, threads)
        build_s = time.perf_counter() - started
        check_device(args.device, session)
        gnames = backprop._Names(session)
        feeds = {gnames.input: x, gnames.seed: seeds}
        rows.append(
            row(
                "guided backprop",
                batch,
                build_s,
                timed(
                    lambda s=session, x=x, t=targets: backprop.guided_backprop(s, x, t),
                    args.warmup,
                    args.repeats,
                ),
                timed(
                    lambda s=session, f=feeds, o=[gnames.grad]: s.run(o, f),
                    args.warmup,
                    args.repeats,
                ),
            )
        )
        del session
    print(f"model: {model_dir} ({card.get('name')})")
    return rows


def row(
    method: str, batch: int, build_s: float, calls: list[float], runs: list[float]
) -> dict[str, Any]:
    call, run = statistics.median(calls), statistics.median(runs)
    return {
        "method": method,
        "batch": batch,
        "method_ips": batch / call,
        "run_ips": batch / run,
        "call_ms": 1000 * call,
        "spread_ms": (1000 * min(calls), 1000 * max(calls)),
        "build_s": build_s,
    }


def device_line(device: str) -> str:
    import onnxruntime as ort

    where = platform.processor() or platform.machine()
    if device == "cuda":
        import subprocess

        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        try:
            where = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout
            where = where.strip().replace("\n", "; ")
        except (OSError, subprocess.SubprocessError):
            where = "nvidia-smi not found"
    return f"device {device} ({where}), onnxruntime {ort.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="exported model.json dir")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--batches",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[1, 16, 64],
        help="comma-separated batch sizes (default 1,16,64)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=2, help="ORT threads (--device cpu)")
    args = parser.parse_args(argv)

    from cnnviz.errors import CnnvizError

    print(device_line(args.device))
    try:
        rows = bench(args)
    except CnnvizError as error:  # DeviceError: no usable CUDA provider here
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"\nimages/s, median of {args.repeats} after {args.warmup} warm-up calls"
        f" (range: fastest-slowest call)\n"
    )
    print(
        "| method | batch | images/s (method) | images/s (ORT run) | ms per call | range ms"
        " | session build s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["spread_ms"]
        print(
            f"| {r['method']} | {r['batch']} | {r['method_ips']:.1f} | {r['run_ips']:.1f} "
            f"| {r['call_ms']:.1f} | {low:.1f}-{high:.1f} | {r['build_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
