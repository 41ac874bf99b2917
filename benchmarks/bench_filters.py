"""Filter visualization speed: cnnviz (ONNX Runtime, batched) against a torch autograd loop.

Both sides run lucent's recipe on EfficientNet-Lite0 in the same process with 2 threads
(torch.set_num_threads; ORT intra-op threads, allow_spinning 0): a 128 px Fourier/decorrelated
image, pad 12, jitter 8, scale x rotate, jitter 4, bilinear resize to 224, ImageNet
normalization, the channel's mean as objective, Adam 0.05. The torch loop is what lucent does:
one filter at a time, the whole model's forward with a hook at the layer, autograd backward.
A torch loop optimizing all filters as one batch is timed too, for reference.

torch runs with OMP_WAIT_POLICY=PASSIVE, the counterpart of ORT's allow_spinning=0 (idle
threads sleep instead of spinning): on a shared, loaded box torch's default spinning makes it
up to 10x slower, which would flatter cnnviz; --torch-spin keeps torch's default.

Only the step loops are timed (after one warm-up step); cnnviz's one-off setup (gradient graph
+ session) is printed separately. Usage:

    python benchmarks/bench_filters.py [--model-dir results/models/efficientnet-lite0]
        [--layer blocks.8.expand_conv] [--filters 16] [--steps 6] [--rounds 3]

Engines (no torch needed when the model dir exists): the whole job, `optimize_filters` as
`cnnviz filters` runs it (setup + steps + the untransformed start/final evaluations), for the
step-graph engine ("graph": one ONNX Runtime run per step, state on the device) and the host
loop ("numpy"), 16 filters x 96 steps by default:

    python benchmarks/bench_filters.py --engines [--device cpu] [--steps 96] [--mode lucent]
        [--engine-rounds 2]
    python3 benchmarks/bench_filters.py --device cuda --quick-gpu   # graph engine on the GPU,
        # seed mode too, and where each node of the step graph ran (ORT profile)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from cnnviz.graph import conv_layers  # noqa: E402
from cnnviz.methods import optvis as ov  # noqa: E402
from cnnviz.methods.filters import optimize_filters  # noqa: E402

THREADS = 2
PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 255.0}


def torch_model():
    """The pretrained network as the pipeline exports it (tests/torch_oracle.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch_oracle

    return torch_oracle.pretrained_effnet()


def export(module, folder: Path) -> Path:
    import torch

    path = folder / "model.onnx"
    torch.onnx.export(
        module.eval(),
        torch.zeros(1, 3, 224, 224),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def torch_layer(module, layer: str):
    """The module whose output, through ReLU6, is the ONNX layer tensor (blocks.N.expand_conv
    -> _blocks[N]._bn0, conv_head -> _bn1)."""
    if layer == "conv_head":
        return module._bn1
    parts = layer.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "expand_conv":
        return module._blocks[int(parts[1])]._bn0
    raise SystemExit(f"--layer {layer}: the torch side knows blocks.N.expand_conv and conv_head")


def torch_lucent(
    module,
    layer: str,
    channels: list[int],
    steps: int,
    warm: int = 1,
    hook=None,
    clamp: tuple[float | None, float | None] = (0.0, 6.0),
) -> float:
    """lucent-style optimization of `channels` as one batch; seconds per step after `warm`.

    The objective is the channel mean of `clamp(output of hook)`; `hook` defaults to
    `torch_layer(module, layer)` (EfficientNet-Lite0, ReLU6: clamp 0..6). For a ReLU layer of
    another model pass its pre-activation module and clamp (0.0, None).
    """
    import torch
    import torch.nn.functional as F

    b = len(channels)
    size = 128
    scale = torch.tensor(ov.fft_scale(size, size), dtype=torch.float32)[None, None, ..., None]
    color = torch.tensor(ov.COLOR_MATRIX.T, dtype=torch.float32)
    mean = torch.tensor(PRE["mean"])[None, :, None, None]
    std = torch.tensor(PRE["std"])[None, :, None, None]
    spectrum = (torch.randn(b, 3, size, size // 2 + 1, 2) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([spectrum], lr=0.05)
    store = {}
    target = torch_layer(module, layer) if hook is None else hook
    lo, hi = clamp
    handle = target.register_forward_hook(
        lambda _m, _i, out: store.__setitem__("act", out.clamp(lo, hi))
    )
    rng = np.random.default_rng(0)
    idx = torch.arange(b)
    chans = torch.tensor(channels)

    def image():
        z = torch.view_as_complex((scale * spectrum).contiguous())
        x = torch.fft.irfftn(z, s=(size, size), norm="ortho") / 4.0
        x = (x.permute(0, 2, 3, 1) @ color).permute(0, 3, 1, 2)
        return torch.sigmoid(x)

    def transform(x):
        x = F.pad(x, [12] * 4, value=0.5)
        d = [int(v) for v in rng.integers(0, 8, 2)]
        x = x[:, :, d[0] : d[0] + x.shape[2] - 8, d[1] : d[1] + x.shape[3] - 8]
        s = ov.SCALES[int(rng.integers(0, len(ov.SCALES)))]
        a = math.radians(ov.ANGLES[int(rng.integers(0, len(ov.ANGLES)))])
        theta = torch.tensor(
            [[math.cos(a) / s, -math.sin(a) / s, 0.0], [math.sin(a) / s, math.cos(a) / s, 0.0]]
        ).expand(b, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        x = F.grid_sample(x - 0.5, grid, mode="bilinear", align_corners=True) + 0.5
        d = [int(v) for v in rng.integers(0, 4, 2)]
        x = x[:, :, d[0] : d[0] + x.shape[2] - 4, d[1] : d[1] + x.shape[3] - 4]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=True)
        return (x - mean) / std

    try:
        for k in range(warm + steps):
            if k == warm:
                start = time.perf_counter()
            opt.zero_grad()
            module(transform(image()))
            loss = -store["act"][idx, chans].mean(dim=(1, 2)).sum()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return (time.perf_counter() - start) / steps


def ort_filter_rate(
    model, tensor: str, channels: list[int], steps: int, batch: int, threads: int = THREADS
) -> tuple[float, float]:
    """cnnviz's (filter-steps/s of the step loop, setup seconds) for `channels` of `tensor`.

    The loop time is that of a run of 1 + steps steps minus that of a 1-step run: setup (the
    gradient graph and its session, once per job) and the first step drop out.
    """
    loops = []
    for n in (1, 1 + steps):
        res = optimize_filters(
            model,
            tensor,
            channels,
            steps=n,
            batch_size=batch,
            preprocess=PRE,
            device="cpu",
            threads=threads,
        )
        loops.append(res.seconds - res.info["setup_seconds"])
    return len(channels) * steps / (loops[1] - loops[0]), res.info["setup_seconds"]


def load_model(model_dir: Path):
    """The ONNX model and its preprocess: model_dir/model.onnx (+ model.json), else exported."""
    import json

    onnx_path = model_dir / "model.onnx"
    if onnx_path.is_file():
        card = model_dir / "model.json"
        pre = json.loads(card.read_text()).get("preprocess", PRE) if card.is_file() else PRE
        return onnx.load(str(onnx_path)), pre
    with tempfile.TemporaryDirectory() as tmp:
        return onnx.load(str(export(torch_model(), Path(tmp)))), PRE


def engine_seconds(model, tensor: str, channels: list[int], steps: int, engine: str,
                   device: str, mode: str, pre: dict, batch: int) -> dict:
    """One whole optimize_filters job: total, setup and per-step seconds."""
    started = time.perf_counter()
    res = optimize_filters(model, tensor, channels, mode=mode, steps=steps, batch_size=batch,
                           preprocess=pre, device=device, threads=THREADS, engine=engine)
    total = time.perf_counter() - started
    return {"total": total, "setup": res.info["setup_seconds"],
            "providers": res.info["providers"][0], "engine": res.info["engine"],
            "final_median": float(np.median(res.final))}


def placement(model, tensor: str, channels: list[int], device: str, mode: str, pre: dict,
              runs: int = 4) -> None:
    """Run the step graph a few times with ORT's profiler: time per (op, provider), and the
    nodes that did not run on the first provider (CPU fallbacks around a CUDA graph)."""
    import collections
    import json

    import onnxruntime as ort
    from cnnviz.methods.objective_job import ObjectiveJob
    from cnnviz.methods.objectives import channel
    from cnnviz.runtime import providers_for, session_options

    job = ObjectiveJob(model, [channel(tensor, 0)], len(channels), mode=mode, steps=runs,
                       lr=0.05, norm=ov.Normalization.from_preprocess(pre), device=device,
                       threads=THREADS)
    options = session_options(THREADS)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "cnnviz_filters")
    job.session = ort.InferenceSession(job.spec.model.SerializeToString(), options,
                                       providers=providers_for(device))
    job.run(channels, runs, 0.05, 0, None, 128, None)
    path = job.session.end_profiling()
    per_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in json.load(open(path)):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["args"]["provider"])
            per_op[key] += event["dur"]
            count[key] += 1
    print(f"\n# step graph ({mode}), {runs} runs profiled: ms per run by (op, provider)")
    for (op, provider), us in per_op.most_common():
        nodes = count[op, provider] // runs
        print(f"  {op:18s} {provider:24s} {us / 1e3 / runs:9.3f} ms  ({nodes} nodes)")
    others = sorted({op for (op, p) in per_op if p != job.providers[0]})
    print(f"  ops not on {job.providers[0]}: {others or 'none'}")


def engines_main(args) -> None:
    """Old (numpy host loop) vs new (step graph) on one device, whole jobs."""
    from cnnviz.runtime import providers_for

    model, pre = load_model(args.model_dir)
    rows = {r["name"]: r for r in conv_layers(model)}
    from cnnviz.methods.filters import objective_tensor

    tensor = objective_tensor(model, rows[args.layer]["tensor"])
    channels = list(range(args.filters))
    engines = ["graph"] if args.quick_gpu and not args.with_numpy else ["graph", "numpy"]
    modes = ["lucent", "seed"] if args.quick_gpu else [args.mode]
    print(f"# filters: {args.layer} (objective {tensor}), {args.filters} filters x {args.steps} "
          f"steps, batch {args.filters}, device {args.device} -> {providers_for(args.device)[0]}, "
          f"{THREADS} threads, load {os.getloadavg()[0]:.1f}")
    rounds = 1 if args.quick_gpu else args.engine_rounds
    print(f"{rounds} round(s), engines alternating; seconds: median (min - max)")
    print("| mode | engine | provider | seconds (whole job) | setup s | s per step "
          "| median final |")
    print("|---|---|---|---:|---:|---:|---:|")
    for mode in modes:
        runs: dict[str, list[dict]] = {}
        for _ in range(rounds):  # alternate, so a change in the machine's load hits both
            for engine in engines:
                runs.setdefault(engine, []).append(engine_seconds(
                    model, tensor, channels, args.steps, engine, args.device, mode, pre,
                    args.filters))
        for rs in runs.values():
            totals = [r["total"] for r in rs]
            total, setup = float(np.median(totals)), float(np.median([r["setup"] for r in rs]))
            spread = f" ({min(totals):.2f} - {max(totals):.2f})" if rounds > 1 else ""
            r = rs[0]
            print(f"| {mode} | {r['engine']} | {r['providers']} | {total:.2f}{spread} | "
                  f"{setup:.2f} | {(total - setup) / args.steps:.4f} | "
                  f"{r['final_median']:.3f} |", flush=True)
    if args.quick_gpu or args.profile:
        for mode in modes:
            placement(model, tensor, channels, args.device, mode, pre)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("results/models/efficientnet-lite0"))
    parser.add_argument("--layer", default="blocks.8.expand_conv")
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; each runs every variant once"
    )
    parser.add_argument(
        "--skip-torch-batch", action="store_true", help="skip the (slow) batched torch reference"
    )
    parser.add_argument(
        "--torch-spin",
        action="store_true",
        help="leave torch's OpenMP threads spinning (its default)",
    )
    parser.add_argument("--engines", action="store_true",
                        help="time whole jobs of the graph and the numpy engine (no torch)")
    parser.add_argument("--quick-gpu", action="store_true",
                        help="--engines on --device (cuda): graph engine, 96 steps, lucent and "
                        "seed, plus the step graph's node placement")
    parser.add_argument("--with-numpy", action="store_true", help="--quick-gpu: the old too")
    parser.add_argument("--profile", action="store_true", help="--engines: node placement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--engine-rounds", type=int, default=1,
                        help="--engines: alternating rounds (median)")
    parser.add_argument("--mode", default="lucent", choices=["lucent", "seed"])
    args = parser.parse_args()
    if args.engines or args.quick_gpu:
        if args.quick_gpu and "--steps" not in sys.argv:
            args.steps = 96
        engines_main(args)
        return
    if not args.torch_spin:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads its OpenMP runtime

    import torch

    torch.set_num_threads(THREADS)
    module = torch_model()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.model_dir / "model.onnx"
        if not onnx_path.is_file():
            onnx_path = export(module, Path(tmp))
        model = onnx.load(str(onnx_path))
    rows = {r["name"]: r for r in conv_layers(model)}
    row = rows[args.layer]
    channels = list(range(args.filters))
    print(
        f"# filter visualization: {args.layer} {row['shape']}, lucent mode, {args.steps} steps, "
        f"{THREADS} threads; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}\n"
    )

    def ours(batch: int, chans: list[int]) -> tuple[float, float]:
        return ort_filter_rate(model, row["tensor"], chans, args.steps, batch)

    def torch_rate(chans: list[int]) -> float:
        return len(chans) / torch_lucent(module, args.layer, chans, args.steps)

    # Rounds alternate the runs, so a change in the shared machine's load hits all of them.
    runs: dict[str, list[float]] = {}
    setups: dict[str, float] = {}
    for r in range(args.rounds):
        for label, fn in (
            (f"cnnviz ORT, batch {args.filters}", lambda: ours(args.filters, channels)),
            ("torch autograd, 1 filter (lucent)", lambda r=r: (torch_rate([r]), None)),
            ("cnnviz ORT, batch 4", lambda: ours(4, channels)),
            ("cnnviz ORT, batch 1", lambda r=r: ours(1, [r])),
        ):
            rate, setup = fn()
            runs.setdefault(label, []).append(rate)
            if setup is not None:
                setups[label] = setup
    if not args.skip_torch_batch:
        runs[f"torch autograd, batch {args.filters}"] = [torch_rate(channels)]

    base = float(np.median(runs["torch autograd, 1 filter (lucent)"]))
    print(f"{args.rounds} rounds (median, min-max); end load {os.getloadavg()[0]:.1f}\n")
    print("| run | filter-steps/s (median) | min - max | vs torch 1 filter | note |")
    print("|---|---:|---:|---:|---|")
    for label, rates in runs.items():
        med = float(np.median(rates))
        if label.startswith("cnnviz"):
            note = f"setup {setups[label]:.1f} s (graph + session, once per job)"
        else:
            note = "whole-model forward, hook at the layer"
        print(
            f"| {label} | {med:.2f} | {min(rates):.2f} - {max(rates):.2f} | "
            f"{med / base:.1f}x | {note} |"
        )


if __name__ == "__main__":
    main()
