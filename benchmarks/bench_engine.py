"""The gradient engine's cost: ORT backward and the Grad-CAM cut against ORT forward and torch.

Per model and batch, timed in one process, interleaved (each repeat runs every contender once,
in turn), 2 threads on both sides (torch.set_num_threads(2); ORT intra_op 2, inter_op 1,
allow_spinning 0), random normal input, each sample's seed its top-1 class:

- ORT forward: the exported model's logits;
- ORT backward: `vjp(model, [input])`, the full input gradient (its graph includes the forward);
- Grad-CAM cut: `vjp(model, [last conv layer's tensor])` (the layer table's last row), which
  differentiates only the tail but still runs the whole forward;
- torch forward, and torch forward + backward (input.requires_grad, logits[i, t_i].sum()).

Session building and `vjp` itself are one-off costs (one session per job) and reported apart.
Models come from `cnnviz.export.export_model` (what the pipeline runs): EfficientNet-Lite0
(pretrained), vgg16 and resnet50 (torchvision, random weights), 224x224.

torch's OpenMP threads spin-wait by default, which on a shared machine makes torch several
times slower than itself; like ORT's allow_spinning 0, OMP_WAIT_POLICY=PASSIVE is set before
torch is imported unless the variable is already set.

    python benchmarks/bench_engine.py --out BENCHMARKS-engine.md [--repeats 7] [--model-dir DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

THREADS = 2
# (config name, export source, weights, torch builder key, batches)
MODELS = [
    ("efficientnet-lite0", "efficientnet-lite0", "pretrained", "efficientnet", [1, 16]),
    ("vgg16", "torchvision:vgg16", "random", "vgg16", [1]),
    ("resnet50", "torchvision:resnet50", "random", "resnet50", [1]),
]
CONTENDERS = ["ort_fwd", "ort_bwd", "ort_cut", "torch_fwd", "torch_fwd_bwd"]


def exported(name: str, source: str, weights: str, root: Path) -> tuple[onnx.ModelProto, dict]:
    """The pipeline's export of a model (cached under root/name)."""
    from cnnviz.modelcard import load_card

    folder = root / name
    if not (folder / "model.json").is_file():
        from cnnviz.export import export_model

        export_model(name, source, folder, weights=weights, threads=THREADS)
    card = load_card(folder)
    return onnx.load(str(folder / card["onnx"])), card


def torch_model(key: str):
    import torch

    torch.manual_seed(0)
    if key == "efficientnet":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import torch_oracle

        return torch_oracle.pretrained_effnet()
    import torchvision

    return torchvision.models.get_model(key, weights=None).eval()


def contenders(model, card, tmodel, batch: int) -> tuple[dict[str, Callable[[], None]], dict]:
    """One callable per contender (sessions built here, not timed) and the one-off costs."""
    import torch
    from cnnviz.autodiff import vjp
    from cnnviz.graph import find_logits, input_name
    from cnnviz.runtime import make_session

    name, logits = input_name(model), find_logits(model)
    size = card["input"]["shape"][2:]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, *size)).astype(np.float32)
    forward = make_session(model, device="cpu", threads=THREADS)
    top = forward.run([logits], {name: x})[0].argmax(axis=1)
    seed = np.zeros((batch, forward.get_outputs()[0].shape[1] or 1000), np.float32)
    seed[np.arange(batch), top] = 1.0
    layer = card["layers"][-1]["tensor"]
    once: dict[str, float] = {}

    def build(wrt: str) -> tuple:
        start = time.perf_counter()
        graph = vjp(model, [wrt], batch=batch)
        built = time.perf_counter()
        session = make_session(graph, device="cpu", threads=THREADS)
        once[f"vjp {wrt == name and 'input' or 'cut'} s"] = built - start
        once[f"session {wrt == name and 'input' or 'cut'} s"] = time.perf_counter() - built
        return session, f"grad:{wrt}"

    bwd, bwd_out = build(name)
    cut, cut_out = build(layer)
    feeds = {name: x, f"seed:{logits}": seed}
    xt = torch.from_numpy(x)
    targets = torch.as_tensor(top)

    def torch_fwd() -> None:
        with torch.no_grad():
            tmodel(xt)

    def torch_fwd_bwd() -> None:
        xg = xt.clone().requires_grad_(True)
        out = tmodel(xg)
        out[torch.arange(batch), targets].sum().backward()

    fns = {
        "ort_fwd": lambda: forward.run([logits], {name: x}),
        "ort_bwd": lambda: bwd.run([bwd_out], feeds),
        "ort_cut": lambda: cut.run([cut_out], feeds),
        "torch_fwd": torch_fwd,
        "torch_fwd_bwd": torch_fwd_bwd,
    }
    once["layer"] = layer
    return fns, once


def measure(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
    return times


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | batch | ORT fwd | ORT bwd (input grad) | Grad-CAM cut | torch fwd "
        "| torch fwd+bwd | bwd / ORT fwd | cut / ORT fwd | ORT bwd / torch fwd+bwd |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        t = r["times"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {cell(t['ort_fwd'])} | {cell(t['ort_bwd'])} "
            f"| {cell(t['ort_cut'])} | {cell(t['torch_fwd'])} | {cell(t['torch_fwd_bwd'])} "
            f"| {ratio(t['ort_bwd'], t['ort_fwd'])} | {ratio(t['ort_cut'], t['ort_fwd'])} "
            f"| {ratio(t['ort_bwd'], t['torch_fwd_bwd'])} |"
        )
    once = (
        "\n\nOne-off costs (s): building the gradient graph (`vjp`) and its ORT session.\n\n"
        "| model | batch | Grad-CAM tensor | vjp input | session input | vjp cut | session cut |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        o = r["once"]
        once += (
            f"| {r['model']} | {r['batch']} | `{o['layer']}` | {o['vjp input s']:.2f} "
            f"| {o['session input s']:.2f} | {o['vjp cut s']:.2f} | {o['session cut s']:.2f} |\n"
        )
    return head + "\n".join(lines) + once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here (default: print only)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "cnnviz-bench"))
    parser.add_argument("--models", default=",".join(m[0] for m in MODELS))
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    torch.set_num_threads(THREADS)
    wanted = args.models.split(",")
    rows = []
    for name, source, weights, key, batches in MODELS:
        if name not in wanted:
            continue
        model, card = exported(name, source, weights, Path(args.model_dir))
        tmodel = torch_model(key)
        for batch in batches:
            fns, once = contenders(model, card, tmodel, batch)
            times = measure(fns, args.repeats)
            rows.append({"model": name, "batch": batch, "times": times, "once": once})
            print(table(rows[-1:]).split("\n\n")[0].splitlines()[-1], flush=True)
    load = os.getloadavg()
    text = (
        "# Gradient engine benchmark\n\n"
        f"ms per call, median (min–max) of {args.repeats} interleaved repeats; "
        f"{THREADS} threads each (torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end). "
        "ORT bwd and the Grad-CAM cut include their forward pass.\n\n" + table(rows) + "\n"
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
