"""Every per-image method on an NVIDIA GPU (ONNX Runtime CUDA provider), against the torch peers.

EfficientNet-Lite0 (an exported model.json folder), 224x224 inputs (sample photos repeated),
target = each image's top-1 class. For each method:

  job       images/s of `cnnviz explain`'s method function over N images (METHODS[m](job)):
            graph build, session creation, feeding, the device work and the results on the host
  steady    the marginal images/s of a job (5N images against N: the graph build and session
            creation cancel out), i.e. what a job of many images approaches
  floor     the plain forward's images/s (one `session.run` with I/O binding, batch B)
  vs CPU    min Pearson r of the CUDA maps against the same graph on the CPU (first images)
  nodes     nodes of the method graph that ran outside the CUDA provider (ORT profile)

With `--peers`: pytorch-grad-cam and captum on the same GPU (torch, CUDA) and images, and the
ratio ours / peer (time). Results go to `--out` (markdown) as they come, so a machine taken back
mid-run still leaves the rows done so far.

    python3 benchmarks/bench_gpu.py --model-dir DIR [--device cuda|cpu] [--images 64]
        [--batch 64] [--peers] [--out gpu.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
METHODS = ("gradcam", "gradcampp", "layercam", "guided_gradcam", "saliency", "guided_backprop",
           "deconvnet", "smoothgrad", "integrated_gradients", "occlusion", "scorecam",
           "scorecam:256", "projections")  # name:N = the method's batch_size option set to N


class Out:
    """Markdown lines printed and written to `path` as they come."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.lines = path, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.path:
            self.path.write_text("\n".join(self.lines) + "\n")


def export_lite0() -> Path:
    """EfficientNet-Lite0 exported with cnnviz's own export code into a temporary folder."""
    import atexit
    import shutil
    import tempfile

    from cnnviz.export import export_model

    folder = Path(tempfile.mkdtemp(prefix="cnnviz-gpu-"))
    atexit.register(shutil.rmtree, folder, True)
    export_model("efficientnet-lite0", "efficientnet-lite0", folder)
    return folder


def photos(card: dict[str, Any], count: int) -> np.ndarray:
    from cnnviz.images import preprocess
    from PIL import Image
    from skimage import data

    base = [preprocess(Image.fromarray(getattr(data, n)()), card["preprocess"]) for n in PHOTOS]
    return np.stack([base[i % len(base)] for i in range(count)]).astype(np.float32)


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_job(model, card, x, targets, device, batch, options=None):  # noqa: ANN001, ANN201
    from cnnviz.methods.explain import Job

    views = [np.zeros((1, 1, 3), np.uint8)] * len(x)
    return Job(model, card, [f"i{i}" for i in range(len(x))], x, views,
               [(i, int(t)) for i, t in enumerate(targets)], options or DEFAULTS, device,
               None, batch)


DEFAULTS = {"samples": 25, "noise_level": 0.15, "steps": 50, "window": 32, "stride": 16,
            "batch_size": 64, "target": "top1"}


def method_maps(job, method: str) -> np.ndarray:  # noqa: ANN001
    """The raw maps of `method` for the job's rows ("projections": every layer's projections
    as `cnnviz explain` runs them, three layers, top 4)."""
    import dataclasses

    from cnnviz.methods.explain import run_method, spread_layers
    from cnnviz.methods.projections import ProjectionRunner

    name, _, rows = method.partition(":")
    if rows:
        job = dataclasses.replace(job, options={**job.options, "batch_size": int(rows)})
    if name == "projections":
        images = max(1, min(len(job.ids), job.batch_size // 4))
        runner = ProjectionRunner(job.model, job.card, spread_layers(job.card, 3), 4, images,
                                  job.device, job.threads)
        done = runner.project_layers(job.inputs, 4)
        return np.stack([np.stack([item["projection"] for layer in done.values()
                                   for item in layer[i]]) for i in range(len(job.ids))])
    return np.stack([raw for _, raw, _, _ in run_method(job, name)])


def placement(model, device: str) -> dict[str, int]:  # noqa: ANN001
    """{provider: node count} from one profiled run of `model` (an onnx.ModelProto)."""
    import onnxruntime as ort
    from cnnviz.runtime import providers_for

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=providers_for(device))
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        dtype = np.int64 if "int64" in value.type else np.float32
        feeds[value.name] = np.zeros(shape, dtype)
    session.run(None, feeds)
    path = session.end_profiling()
    counts: dict[str, int] = {}
    seen = set()
    for event in json.loads(Path(path).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            args = event["args"]
            key = (event["name"], args.get("provider"))
            if key in seen:
                continue
            seen.add(key)
            provider = args.get("provider", "?")
            counts[provider] = counts.get(provider, 0) + 1
            if provider != "CUDAExecutionProvider":
                counts[f"{args.get('op_name')}@{provider}"] = counts.get(
                    f"{args.get('op_name')}@{provider}", 0) + 1
    Path(path).unlink(missing_ok=True)
    return counts


def ours(args, out: Out) -> dict[str, float]:  # noqa: ANN001
    import onnx
    from cnnviz.modelcard import load_card, model_path
    from cnnviz.runtime import make_session

    card = load_card(args.model_dir)
    model = onnx.load(str(model_path(args.model_dir)))
    x = photos(card, args.images)
    forward = make_session(model, args.device)
    if args.device == "cuda" and forward.get_providers()[0] != "CUDAExecutionProvider":
        print(f"error: asked for CUDA, the session runs on {forward.get_providers()}")
        raise SystemExit(2)
    in_name, out_name = card["input"]["name"], card["output"]["name"]
    targets = forward.run([out_name], {in_name: x})[0].argmax(axis=1)
    binding = forward.io_binding()
    xb = x[: args.batch]

    def plain() -> None:
        binding.bind_cpu_input(in_name, xb)
        binding.bind_output(out_name, args.device)
        forward.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    floor = len(xb) / timed(plain, 3, 10)
    out(f"forward (session.run, I/O binding, batch {len(xb)}): **{floor:.0f} images/s**")
    out()
    out("| method | images | job images/s | steady images/s | x floor time | vs CPU r (min) "
        "| nodes off CUDA |")
    out("|---|---|---|---|---|---|---|")
    rates = {}
    cpu_job = make_job(model, card, x[:4], targets[:4], "cpu", args.batch)
    for method in args.methods:
        try:
            n = args.images if not method.startswith("scorecam") else min(args.images, 16)
            job = make_job(model, card, x[:n], targets[:n], args.device, args.batch)
            started = time.perf_counter()
            maps = method_maps(job, method)
            job_s = time.perf_counter() - started
            # steady: the marginal time per image, a job of 5n images against one of n (the
            # graph build and session creation of a job cancel out)
            big = make_job(model, card, np.concatenate([x[:n]] * 5),
                           np.concatenate([targets[:n]] * 5), args.device, args.batch)
            small_s = timed(lambda j=job, m=method: method_maps(j, m), 0, args.repeats)
            big_s = timed(lambda j=big, m=method: method_maps(j, m), 0, args.repeats)
            steady_s = max(big_s - small_s, 1e-9) / 4
            check = args.device == "cuda" and not args.no_check
            r = "–"
            if check:
                ref = method_maps(cpu_job, method)
                r = f"{min(_pearson(a, b) for a, b in zip(maps[: len(ref)], ref, strict=True)):.6f}"
            rates[method] = n / steady_s
            off = _off_cuda(model, card, method, args) if check else "-"
            out(f"| {method} | {n} | {n / job_s:.1f} | {n / steady_s:.1f} "
                f"| {floor / (n / steady_s):.1f} | {r} | {off} |")
        except Exception as error:  # noqa: BLE001 - one method's failure is a row, not the end
            out(f"| {method} | – | failed: {type(error).__name__}: {str(error)[:200]} | | | | |")
    return rates


def _off_cuda(model, card, method: str, args) -> str:  # noqa: ANN001
    """Nodes of the method's graph (the CAM family's, the gradient's...) run outside CUDA."""
    from cnnviz.methods import backprop, cam
    from cnnviz.methods.occlusion import occlusion_graph

    builders = {
        "gradcam": lambda: cam.cam_graph(model, card, None, 2, guided=True).model,
        "saliency": lambda: backprop.gradient_graph(model, "gradient", 2).model,
        "guided_backprop": lambda: backprop.gradient_graph(model, "guided", 2).model,
        "smoothgrad": lambda: backprop.smoothgrad_graph(model, 1, 2, 0.15).model,
        "integrated_gradients": lambda: backprop.integrated_gradients_graph(model, 1, 2).model,
        "occlusion": lambda: occlusion_graph(model, card, 1, 2, 32).model,
    }
    if method not in builders:
        return "-"
    counts = placement(builders[method](), "cuda")
    off = {k: v for k, v in counts.items() if k != "CUDAExecutionProvider"}
    return ", ".join(f"{k} {v}" for k, v in off.items()) or "0"


def peers(args, out: Out, rates: dict[str, float]) -> None:  # noqa: ANN001
    """pytorch-grad-cam and captum on the same device and images."""
    import contextlib
    import io

    import torch
    from captum.attr import (
        Deconvolution,
        GuidedBackprop,
        IntegratedGradients,
        NoiseTunnel,
        Occlusion,
        Saliency,
    )
    from cnnviz.modelcard import load_card
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch_oracle

    card = load_card(args.model_dir)
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    net = torch_oracle.pretrained_effnet(own_head_relu6=True).to(dev)
    relu_net = torch_oracle.swap_relu6(net).to(dev)
    x = torch.from_numpy(photos(card, args.images)).to(dev)
    with torch.no_grad():
        targets = net(x).argmax(1).tolist()
    layer = net.head_act
    tg = [ClassifierOutputTarget(t) for t in targets]

    def sync(fn):  # noqa: ANN001, ANN202
        def run():  # noqa: ANN202
            result = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return result
        return run

    def pgc(cls, n=None, batch=None):  # noqa: ANN001, ANN202
        def run():  # noqa: ANN202
            cam = cls(model=net, target_layers=[layer])
            if batch:
                cam.batch_size = batch
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    return cam(input_tensor=x[:n], targets=tg[:n])
            finally:
                cam.activations_and_grads.release()
        return run

    t = torch.tensor(targets, device=dev)
    cases = {
        "gradcam": ("pytorch-grad-cam GradCAM", pgc(GradCAM), args.images),
        "gradcampp": ("pytorch-grad-cam GradCAM++", pgc(GradCAMPlusPlus), args.images),
        "layercam": ("pytorch-grad-cam LayerCAM", pgc(LayerCAM), args.images),
        "scorecam": ("pytorch-grad-cam ScoreCAM (batch 64)", pgc(ScoreCAM, 4, 64), 4),
        "saliency": ("captum Saliency", lambda: Saliency(net).attribute(x, target=t, abs=True),
                     args.images),
        "guided_backprop": ("captum GuidedBackprop (ReLU6 swapped)",
                            lambda: GuidedBackprop(relu_net).attribute(x, target=t),
                            args.images),
        "deconvnet": ("captum Deconvolution (ReLU6 swapped)",
                      lambda: Deconvolution(relu_net).attribute(x, target=t), args.images),
        "smoothgrad": ("captum NoiseTunnel(Saliency) smoothgrad, 25 samples",
                       lambda: NoiseTunnel(Saliency(net)).attribute(
                           x[:16], target=t[:16], nt_type="smoothgrad", nt_samples=25,
                           nt_samples_batch_size=64, stdevs=0.15 * 4.6), 16),
        "integrated_gradients": ("captum IntegratedGradients, 50 steps",
                                 lambda: IntegratedGradients(net).attribute(
                                     x[:16], target=t[:16], n_steps=50,
                                     internal_batch_size=64), 16),
        "occlusion": ("captum Occlusion 32/16 (169 patches)",
                      lambda: Occlusion(net).attribute(
                          x[:16], target=t[:16], sliding_window_shapes=(3, 32, 32),
                          strides=(3, 16, 16), baselines=0, perturbations_per_eval=64), 16),
    }
    out()
    out(f"Peers on {dev} (torch {torch.__version__}), same images; ratio = our steady time per "
        "image / the peer's (≤ 1.0: we are faster)")
    out()
    out("| method | peer | images | peer images/s | ours images/s | ours / peer time |")
    out("|---|---|---|---|---|---|")
    for method in args.methods:
        if method not in cases:
            continue
        name, fn, n = cases[method]
        try:
            seconds = timed(sync(fn), 1, max(1, args.repeats // 2))
            peer = n / seconds
            mine = rates.get(method)
            ratio = f"{peer / mine:.2f}" if mine else "–"
            out(f"| {method} | {name} | {n} | {peer:.1f} | {mine or 0:.1f} | {ratio} |")
        except Exception as error:  # noqa: BLE001
            out(f"| {method} | {name} | – | failed: {type(error).__name__}: {str(error)[:160]} "
                "| | |")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else float("nan")
    return float(np.corrcoef(a, b)[0, 1])


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported model.json dir (default: export EfficientNet-Lite0 here)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="rows per ORT call (batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the CPU agreement and node placement columns")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        args.model_dir = export_lite0()
    out = Out(args.out)
    out(f"# cnnviz on {device_line(args.device)}")
    out(f"{time.strftime('%Y-%m-%d %H:%M')} · EfficientNet-Lite0 · {args.images} images · "
        f"batch {args.batch} · median of {args.repeats}")
    out()
    from cnnviz.errors import CnnvizError

    try:
        rates = ours(args, out)
    except CnnvizError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.peers:
        peers(args, out, rates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
