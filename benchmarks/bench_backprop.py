"""Input-gradient methods and attributions: cnnviz (ONNX Runtime) against captum (torch),
EfficientNet-Lite0.

Same process, interleaved (each repeat runs every contender once, in a rotating order), 2 threads
on both sides (torch.set_num_threads(2); ORT intra_op 2, inter_op 1, allow_spinning 0), batch 1,
224x224, the chelsea photo, target = its top-1 class. cnnviz runs each method as `cnnviz explain`
does: its whole ONNX graph (`backprop.gradient_graph`, `backprop.integrated_gradients_graph`) fed
by the one runner (cnnviz.runner.Runner); graph building and the runner's session are not timed
(once per job). captum's GuidedBackprop and Deconvolution run on a copy whose ReLU6 modules are an
nn.ReLU subclass (clamp 0..6), the same computation as ours; on the stock model they would
silently compute the plain gradient. IG: 50 steps, method gausslegendre on both sides (captum's
default), zero baseline; captum pushes all 50 points through one batch (its default), ours runs
52 points (50 + the two end points for the completeness check, `explain.ig_points`), --ig-batch
rows (images x points, `runner.chunk_plan`) a call. Input x Gradient (`attribution.
input_x_gradient_graph`) against InputXGradient; DeepLIFT (`attribution.deeplift_graph`, black
baseline) against DeepLift on a copy with one module per call (torch_oracle.one_module_per_call)
and nn.ReLU6 given captum's rescale rule, the computation ours does (stock captum keeps ReLU6's
gradient and cannot run a module used twice).

torch's OpenMP threads spin-wait by default; on a shared, oversubscribed machine that made torch
6x slower than itself (forward ~1 s instead of ~0.17 s at load 9 on 2 cores). The benchmark
therefore sets OMP_WAIT_POLICY=PASSIVE before importing torch, the counterpart of ORT's
allow_spinning 0, unless the variable is already set (OMP_WAIT_POLICY=ACTIVE for torch's
default behaviour).

    python benchmarks/bench_backprop.py [--model-dir DIR] [--repeats 7] [--ig-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import benchlib
import numpy as np
import onnx

TARGETS = {
    "saliency": 0.5, "guided": 0.5, "deconvnet": 0.5, "ig50": 0.4, "input_x_gradient": 0.5,
    "deeplift": 0.5,
}  # fmt: skip


def effnet(model_dir: Path | None) -> tuple[onnx.ModelProto, dict]:
    from cnnviz.modelcard import load_card

    if model_dir is None:
        from cnnviz.export import export_model

        model_dir = Path(tempfile.mkdtemp(prefix="bench-backprop-"))
        export_model("efficientnet-lite0", "efficientnet-lite0", model_dir)
    card = load_card(model_dir)
    return onnx.load(str(Path(model_dir) / card["onnx"])), card


def swap_relu6(module):
    """captum's rules hook nn.ReLU only: the test oracle's ReLU6 swap (tests/torch_oracle.py)."""
    return benchlib.torch_oracle().swap_relu6(module)


def run_interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """The shared interleaved loop (benchlib), rotating the order each repeat."""
    return benchlib.run_interleaved(contenders, repeats, warmup)


def fmt(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="an exported efficientnet-lite0 (model.json); exported if absent",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ig-repeats", type=int, default=3)
    # On a 2-core CPU, batch 1 had the lowest cost per path point (76 ms vs 107 ms at 13, load 8).
    parser.add_argument("--ig-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime
    import torch
    from captum.attr import (
        Deconvolution,
        DeepLift,
        GuidedBackprop,
        InputXGradient,
        IntegratedGradients,
        Saliency,
    )
    from captum.attr._core import deep_lift
    from cnnviz.export.sources import efficientnet_lite0
    from cnnviz.images import preprocess
    from cnnviz.methods import attribution
    from cnnviz.methods import backprop as bp
    from cnnviz.methods.explain import ig_points
    from cnnviz.runner import Runner, chunk_plan
    from cnnviz.runtime import make_session
    from PIL import Image
    from skimage import data

    torch.set_num_threads(args.threads)
    model, card = effnet(args.model_dir)
    module = efficientnet_lite0("pretrained").module
    relu_module = swap_relu6(module)
    x = preprocess(Image.fromarray(data.chelsea()), card["preprocess"])[None].astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        target = int(module(xt).argmax(1))

    th = args.threads
    forward = make_session(model, "cpu", th)
    feeds = {"images": x, "targets": np.array([target], np.int64)}
    runners = {
        p: Runner(bp.gradient_graph(model, p, 1), "cpu", th)
        for p in ("gradient", "guided", "deconvnet")
    }
    alphas, weights = ig_points("gausslegendre", 50)
    _, points = chunk_plan(len(alphas), args.ig_batch)
    ig_runner = Runner(bp.integrated_gradients_graph(model, 1, points), "cpu", th)
    path = {"alphas": alphas, "weights": weights}
    fixed = {"baseline": bp.make_baseline("zero", x[0], card["preprocess"])[None]}
    ig_runner.run(feeds, {k: v[:points] for k, v in path.items()}, fixed)  # warm, untimed
    in_name = card["input"]["name"]
    ixg_runner = Runner(attribution.input_x_gradient_graph(model, 1), "cpu", th)
    dl_runner = Runner(attribution.deeplift_graph(model, 1), "cpu", th)
    black = {"baseline": bp.make_baseline("black", x[0], card["preprocess"])[None]}
    deep_lift.SUPPORTED_NON_LINEAR[torch.nn.ReLU6] = deep_lift.nonlinear
    dl = DeepLift(benchlib.torch_oracle().one_module_per_call(module, xt))
    ixg = InputXGradient(module)
    black_t = torch.from_numpy(np.ascontiguousarray(black["baseline"]))
    saliency, guided = Saliency(module), GuidedBackprop(relu_module)
    deconv, ig = Deconvolution(relu_module), IntegratedGradients(module)

    def grad_input():
        return xt.clone().requires_grad_()

    single = {
        "ort forward": lambda: forward.run(None, {in_name: x}),
        "torch forward": lambda: module(xt),
        "saliency ours": lambda: runners["gradient"].run(feeds),
        "saliency captum": lambda: saliency.attribute(grad_input(), target=target),
        "guided ours": lambda: runners["guided"].run(feeds),
        "guided captum": lambda: guided.attribute(grad_input(), target=target),
        "deconvnet ours": lambda: runners["deconvnet"].run(feeds),
        "deconvnet captum": lambda: deconv.attribute(grad_input(), target=target),
        "input_x_gradient ours": lambda: ixg_runner.run(feeds),
        "input_x_gradient captum": lambda: ixg.attribute(grad_input(), target=target),
        "deeplift ours": lambda: dl_runner.run(feeds, None, black),
        "deeplift captum": lambda: dl.attribute(grad_input(), baselines=black_t, target=target),
    }
    ig_pair = {
        "ig50 ours": lambda: ig_runner.run(feeds, path, fixed),
        "ig50 captum": lambda: ig.attribute(
            grad_input(), target=target, n_steps=50, method="gausslegendre"
        ),
    }
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = run_interleaved(single, args.repeats)
        times.update(run_interleaved(ig_pair, args.ig_repeats))

    lines = [
        f"EfficientNet-Lite0, batch 1, 224x224, {th} threads each, interleaved; "
        f"median (min–max) ms over {args.repeats} runs ({args.ig_repeats} for IG); "
        f"ORT IG {args.ig_batch} rows a call (graph path); "
        f"torch OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}.",
        "",
        "| method | cnnviz (ORT) | captum (torch) | ratio of medians | ratio of minima | target |",
        "|---|---|---|---|---|---|",
    ]
    pairs = [("forward", "ort forward", "torch forward", None)]
    pairs += [(key, f"{key} ours", f"{key} captum", goal) for key, goal in TARGETS.items()]
    for key, mine, peer, goal in pairs:
        ours, theirs = times[mine], times[peer]
        ratio = statistics.median(ours) / statistics.median(theirs)
        best = min(ours) / min(theirs)
        verdict = "–" if goal is None else f"≤ {goal} ({'met' if ratio <= goal else 'missed'})"
        lines.append(
            f"| {key} | {fmt(ours)} | {fmt(theirs)} | {ratio:.2f} | {best:.2f} | {verdict} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
