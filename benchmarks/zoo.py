"""The model zoo: every torchvision classification CNN through cnnviz, end to end.

For each (model, exporter): random weights (torch.manual_seed(0), the `torchvision:` source with
`weights: random`) exported by cnnviz's own export step (`export_model`, what `cnnviz export`
runs) at a chosen input size; the exported graph's ops and the ops no backward rule covers;
`cnnviz gradcheck` under the three policies; and every per-image step on one photo (chelsea):
predictions, activations, each `cnnviz explain` method (explain.METHODS and projections) and
filters (two filters, a few steps). Each step records ok / failed with the reason and its
seconds. Everything runs through the library functions the `cnnviz` subcommands call.

    python3 benchmarks/zoo.py --size 64 --jobs 2 --out benchmarks/ZOO.md
    python3 benchmarks/zoo.py --models resnet18 mobilenet --exporters dynamo

`--models` takes model names or family names (see FAMILIES); `--smallest` keeps the first
(smallest) member of each family, as the CI test (tests/test_zoo.py) does. Each (model,
exporter) runs in its own process (`--jobs` at a time, `--timeout` each); the table and the
rows as JSON (`--json`) are written by this command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Every torchvision classification CNN, by family, smallest member first.
FAMILIES: dict[str, list[str]] = {
    "alexnet": ["alexnet"],
    "vgg": ["vgg11", "vgg13", "vgg16", "vgg19"],
    "vgg_bn": ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"],
    "resnet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    "resnext": ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"],
    "wide_resnet": ["wide_resnet50_2", "wide_resnet101_2"],
    "squeezenet": ["squeezenet1_1", "squeezenet1_0"],
    "densenet": ["densenet121", "densenet169", "densenet201", "densenet161"],
    "googlenet": ["googlenet"],
    "inception": ["inception_v3"],
    "shufflenet": [
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "shufflenet_v2_x1_5",
        "shufflenet_v2_x2_0",
    ],
    "mobilenet_v2": ["mobilenet_v2"],
    "mobilenet_v3": ["mobilenet_v3_small", "mobilenet_v3_large"],
    "mnasnet": ["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"],
    "efficientnet": [f"efficientnet_b{i}" for i in range(8)],
    "efficientnet_v2": ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"],
    "regnet_x": [
        "regnet_x_400mf",
        "regnet_x_800mf",
        "regnet_x_1_6gf",
        "regnet_x_3_2gf",
        "regnet_x_8gf",
        "regnet_x_16gf",
        "regnet_x_32gf",
    ],
    "regnet_y": [
        "regnet_y_400mf",
        "regnet_y_800mf",
        "regnet_y_1_6gf",
        "regnet_y_3_2gf",
        "regnet_y_8gf",
        "regnet_y_16gf",
        "regnet_y_32gf",
        "regnet_y_128gf",
    ],
    "convnext": ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"],
}
ALIASES = {"mobilenet": ["mobilenet_v2", "mobilenet_v3"], "regnet": ["regnet_x", "regnet_y"]}
EXPORTERS = ("torchscript", "dynamo")
POLICIES = ("gradient", "deconvnet", "guided")
STEPS = ("predictions", "activations")  # per-image steps besides explain's methods
IMAGE = "chelsea"
# Below these sides a pooling window outgrows the feature map (torch refuses the forward):
# inception_v3's stem and stride-2 reductions need 75 px, alexnet's three 3x3 max pools 63.
MIN_SIZE = {"inception_v3": 75, "alexnet": 64}
# The TorchScript exporter writes adaptive average pooling only where the output size divides
# the input's ("output size that are not factor of input size" otherwise): VGG's 7x7 and
# AlexNet's 6x6 pools need the 224 px input they were made for. dynamo writes any size.
TORCHSCRIPT_MIN_SIZE = {
    name: 224 for family in ("alexnet", "vgg", "vgg_bn") for name in FAMILIES[family]
}
DEFAULT_SIZE = 64


def per_image_methods() -> list[str]:
    """Every per-image `cnnviz explain` method (explain.METHODS and projections)."""
    from cnnviz.methods.explain import METHODS

    return list(METHODS)


def resolve_models(names: list[str] | None, smallest: bool = False) -> list[str]:
    """Model names for `--models` (models or families, in the order given; default all)."""
    families = {**FAMILIES, **{a: sum((FAMILIES[f] for f in fs), []) for a, fs in ALIASES.items()}}
    known = {m for ms in FAMILIES.values() for m in ms}
    chosen: list[str] = []
    for name in names or list(FAMILIES):
        if name in families:
            members = families[name]
            if smallest:
                members = [FAMILIES[f][0] for f in ALIASES.get(name, [name])]
            chosen += members
        elif name in known:
            chosen.append(name)
        else:
            raise SystemExit(
                f"zoo: {name!r} is neither a model nor a family: {', '.join(FAMILIES)}"
            )
    return list(dict.fromkeys(chosen))


def method_options(size: int) -> dict[str, Any]:
    """Cheap but real settings: every method runs its full code path on one image."""
    window = max(4, size // 4)
    return {
        "target": "top1",
        "gradient_fallback": "error",
        "cam_layer": "auto",
        "batch_size": 64,  # scorecam's masked inputs per call
        "samples": 4,  # smoothgrad
        "noise_level": 0.15,
        "seed": 0,
        "steps": 8,  # integrated_gradients
        "baseline": "zero",
        "window": window,  # occlusion
        "stride": window // 2,
        "layers": "auto",  # projections, layercam_fusion
        "top_k": 2,
        "masks": 64,  # rise (the other methods' options: the registry's defaults)
    }


FILTERS = {"count": 2, "steps": 4, "mode": "lucent"}


def _reason(error: BaseException | str, limit: int = 400) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timed(step: Callable[[], str | None]) -> dict[str, Any]:
    """Run one step: {"status": ok|failed, "reason", "seconds"}; a step returns a failure
    reason or None, or raises."""
    started = time.perf_counter()
    try:
        problem = step()
    except Exception as error:  # noqa: BLE001 - every failure is a result of the zoo
        problem = _reason(error)
    row: dict[str, Any] = {
        "status": "failed" if problem else "ok",
        "seconds": round(time.perf_counter() - started, 2),
    }
    if problem:
        row["reason"] = _reason(problem)
    return row


def _in_child(
    step: Callable[[], str | None], state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`_timed(step)` in a forked child process, with what the step wrote into `state` brought
    back. Each step then starts from the worker's own memory, not from what the steps before it
    left (a model of a few GB: its export and graphs leave gigabytes the allocator keeps), as
    each job of the workflow is its own process; a step killed for memory fails alone."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        send.send((_timed(step), state))

    started = time.perf_counter()
    process = context.Process(target=child)
    process.start()
    send.close()
    try:
        result, changed = receive.recv()
    except EOFError:  # the child died before it could answer
        process.join()
        code = process.exitcode
        killed = " (killed: out of memory?)" if code == -9 else ""
        return {
            "status": "failed",
            "seconds": round(time.perf_counter() - started, 2),
            "reason": f"the step's process ended with exit code {code}{killed}",
        }
    process.join()
    if state is not None:
        state.update(changed)
    return result


def _missing_ops(model: Any) -> list[str]:
    from cnnviz.autodiff import ops_without_rules

    return sorted({entry.split(" ")[0] for entry in ops_without_rules(model)})


def check_model(
    name: str,
    exporter: str,
    size: int,
    work: Path,
    threads: int | None = None,
    samples: int = 300,
    per_op: bool = True,
    op_samples: int = 64,
    max_instances: int = 2,
    filters: bool = True,
    calibrate: bool = True,
    families: bool = False,
    isolate: bool = False,
) -> dict[str, Any]:
    """One row of the zoo: export, ops, gradcheck per policy, every per-image step.

    `samples`, `per_op`, `op_samples`, `max_instances`: gradcheck's settings; `calibrate`:
    BatchNorm statistics re-estimated on noise when the random model's logits are flat (see
    `calibrated_batchnorm`); `families`: the CAM family in one explain run (`method_groups`);
    `isolate`: each step in a process of its own (`_in_child`; the sweep's worker).
    Each step's result: {"status": "ok" | "failed", "seconds", "reason" when failed}."""
    import numpy as np
    import onnx
    from cnnviz.autodiff.gradcheck import gradcheck
    from cnnviz.export import export_model
    from cnnviz.images import stage_shard, write_sample_image

    work = Path(work)
    row: dict[str, Any] = {"model": name, "exporter": exporter, "size": size}
    model_dir = work / "model"
    image = write_sample_image(IMAGE, work / f"{IMAGE}.png")
    manifest = work / "shard.json"
    stage_shard([(IMAGE, image)], work / "staged", manifest)
    pre = {"size": [size, size], "resize": "stretch"}

    def export() -> None:
        with calibrated_batchnorm(size, enabled=calibrate) as calibrated:
            export_model(
                name,
                f"torchvision:{name}",
                model_dir,
                weights="random",
                exporter=exporter,
                preprocess=pre,
                threads=threads,
            )
        row["bn_calibrated"] = bool(calibrated)

    def run(step: Callable[[], str | None], state: dict[str, Any] | None = None) -> dict:
        return _in_child(step, state) if isolate else _timed(step)

    row["export"] = run(export, row)
    if row["export"]["status"] != "ok":
        return row
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)  # dims suffice
    row["ops"] = len(model.graph.node)
    row["op_types"] = sorted({n.op_type for n in model.graph.node})
    row["missing"] = _missing_ops(model)
    row["params_m"] = round(sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6, 1)

    row["gradcheck"] = {}
    for policy in POLICIES:

        def check(policy: str = policy) -> str | None:
            result = gradcheck(
                model_dir,
                policy=policy,
                device="cpu",
                samples=samples,
                per_op=per_op,
                image=image,
                op_samples=op_samples,
                max_instances=max_instances,
                threads=threads,
            )
            if result["passed"]:
                return None
            bad = [
                _check_label(c)
                for c in [*result["ops"], result["end_to_end"]]
                if c["status"] in ("fail", "error", "unsupported")
            ]
            notes = [
                c.get("note")
                for c in [*result["ops"], result["end_to_end"]]
                if c["status"] in ("unsupported", "error") and c.get("note")
            ]
            return "; ".join(bad) + (f" — {notes[0]}" if notes else "")

        row["gradcheck"][policy] = run(check)

    row["steps"] = {}
    predictions = work / "predictions.json"
    row["steps"]["predictions"] = run(
        lambda: _predictions(model_dir, manifest, predictions, threads)
    )
    row["steps"]["activations"] = run(
        lambda: _activations(model_dir, manifest, work / "activations", threads)
    )
    options = method_options(size)
    found = predictions if predictions.is_file() else None
    for group in method_groups(families):
        outcome: dict[str, str | None] = {}
        result = run(
            lambda g=group, o=outcome: _explain(
                model_dir, manifest, g, work / "explain", options, size, threads, found, o
            ),
            outcome,
        )
        for method in group:
            cell = dict(result)
            if outcome.get(method):
                cell.update(status="failed", reason=_reason(str(outcome[method])))
            elif method in outcome:
                cell.update(status="ok")
                cell.pop("reason", None)
            if len(group) > 1:
                cell["together"] = group
            row["steps"][method] = cell
    if filters:
        row["steps"]["filters"] = run(lambda: _filters(model_dir, work / "filters", threads))
    return row


def _check_label(check: dict[str, Any]) -> str:
    """A failed gradcheck row: which check, and its numbers or status."""
    what = f"{check['op_type']} ({check['node']})" if check["check"] == "op" else check["check"]
    if check["status"] == "fail":
        numbers = ", ".join(
            f"{k} {check[k]:.3g}"
            for k in ("cosine", "scale", "max_rel_err")
            if isinstance(check.get(k), float)
        )
        return f"{what} fails ({numbers})"
    return f"{what} {check['status']}"


@contextlib.contextmanager
def calibrated_batchnorm(size: int, enabled: bool = True, batches: int = 4) -> Iterator[list[str]]:
    """While active, cnnviz's `torchvision:` source (random weights) re-estimates the
    BatchNorm running statistics on noise images before the export, for a model whose logits
    are flat in the input.

    torchvision's initializations leave eval-mode BatchNorm at mean 0 / variance 1, so in some
    deep random networks the signal vanishes layer by layer: random-init googlenet's logits
    differ by 0 between two noise images, shufflenet_v2_x0_5's by 8e-6, which no float32
    finite difference can see (gradcheck then compares the engine with zeros). With statistics
    from 4 batches of 8 noise images (torch.manual_seed(1)) each BatchNorm normalizes its input
    and the logits move (0.76 and 0.81). Only flat models are recalibrated: recalibrated
    networks are rougher (more coordinates within eps of a ReLU kink), which costs the others'
    finite differences precision for nothing. The weights stay torchvision's seeded
    initialization; only BatchNorm buffers change, and the export is cnnviz's unchanged.
    Yields the list of the models recalibrated."""
    import cnnviz.export as export

    calibrated: list[str] = []
    if not enabled:
        yield calibrated
        return
    original = export.torchvision_model

    def source(name: str, weights: str) -> Any:
        src = original(name, weights)
        if weights == "random" and flat(src.module, size):
            _calibrate(src.module, size, batches)
            calibrated.append(name)
        return src

    export.torchvision_model = source
    try:
        yield calibrated
    finally:
        export.torchvision_model = original


def flat(module: Any, size: int) -> bool:
    """Whether the logits of two noise images differ by less than 1e-3 of their size."""
    import torch

    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        logits = module.eval()(torch.randn(2, 3, size, size, generator=generator))
    spread = float((logits[0] - logits[1]).abs().max())
    return spread < 1e-3 * max(float(logits.abs().max()), 1e-12)


def _calibrate(module: Any, size: int, batches: int) -> None:
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    generator = torch.Generator().manual_seed(1)
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(torch.randn(8, 3, size, size, generator=generator))
    module.eval()


def _predictions(model_dir: Path, manifest: Path, out: Path, threads: int | None) -> str | None:
    from cnnviz.methods.predictions import predict_shard

    data = predict_shard(model_dir, manifest, out, device="cpu", top_k=5, threads=threads)
    if data["failed"] or len(data["images"]) != 1:
        return f"predictions: {data['failed'] or 'no image ranked'}"
    probs = [entry["prob"] for entry in data["images"][0]["top"]]
    import numpy as np

    return None if np.isfinite(probs).all() else f"non-finite probabilities {probs}"


def _activations(model_dir: Path, manifest: Path, out: Path, threads: int | None) -> str | None:
    from cnnviz.methods.activations import activations_shard

    data = activations_shard(
        model_dir, manifest, out, layers="all", grids="all", device="cpu", threads=threads
    )
    failed = data.get("failed") or []
    return f"activations: {failed}" if failed else None


def method_groups(families: bool) -> list[list[str]]:
    """Each method alone (its own seconds), or the CAM family in one run as the workflow's
    explain job computes it (`families`: cheaper; the family's seconds are shared)."""
    from cnnviz.registry import CAM_FAMILY

    methods = per_image_methods()
    if not families:
        return [[m] for m in methods]
    return [list(CAM_FAMILY)] + [[m] for m in methods if m not in CAM_FAMILY]


def _explain(
    model_dir: Path,
    manifest: Path,
    methods: list[str],
    out: Path,
    options: dict,
    size: int,
    threads: int | None,
    predictions: Path | None,
    outcome: dict[str, str | None],
) -> str | None:
    """`methods` on the image in one explain job; `outcome[method]` is None when its maps are
    finite and of the image's size, else the reason. Returns the first failure."""
    from cnnviz.methods.explain import explain_shard

    summaries = explain_shard(
        model_dir,
        manifest,
        methods if len(methods) > 1 else methods[0],
        [out / m for m in methods],
        options,
        device="cpu",
        threads=threads,
        batch_size=8,
        predictions=predictions,
    )
    if len(methods) == 1:
        summaries = {methods[0]: summaries}
    for method in methods:
        outcome[method] = _maps_problem(method, summaries[method], out / method, size)
    return next((p for p in outcome.values() if p), None)


def _maps_problem(method: str, summary: dict, out: Path, size: int) -> str | None:
    import numpy as np
    from cnnviz.methods.shard_maps import read_array, read_index, read_shard_maps

    if summary["failed"]:
        return "; ".join(str(f.get("error", f)) for f in summary["failed"])
    if not summary["maps"]:
        return "no maps written"
    if method == "projections":
        index = read_index(out)
        arrays = [np.asarray(read_array(out, index, a)) for a in index["arrays"]]
        bad = [a.shape for a in arrays if not np.isfinite(a).all()]
        return f"non-finite projections {bad}" if bad else None
    _, maps = read_shard_maps(out)
    if maps.shape != (1, size, size):
        return f"maps of shape {list(maps.shape)}, not [1, {size}, {size}]"
    if not np.isfinite(maps).all():
        return "non-finite values in the map"
    return None


def _filters(model_dir: Path, out: Path, threads: int | None) -> str | None:
    """Two filters of the last conv layer, a few lucent steps."""
    import numpy as np
    from cnnviz.methods.filters import visualize_layer
    from cnnviz.modelcard import load_card

    layer = load_card(model_dir)["layers"][-1]["name"]
    summary = visualize_layer(
        model_dir,
        layer,
        out,
        mode=FILTERS["mode"],
        filters=FILTERS["count"],
        steps=FILTERS["steps"],
        device="cpu",
        threads=threads,
    )
    images = np.load(summary["files"]["npy"])
    if images.shape[0] != FILTERS["count"] or not np.isfinite(images).all():
        return f"filter images of shape {list(images.shape)}, finite: {np.isfinite(images).all()}"
    return None


# ---------------------------------------------------------------------------- the sweep


def _one(args: argparse.Namespace) -> int:
    """`--one MODEL EXPORTER`: one row as JSON on stdout's last line (the sweep's worker)."""
    name, exporter = args.one
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        try:
            row = check_model(
                name,
                exporter,
                size_for(name, args.size, exporter),
                Path(tmp),
                threads=args.threads,
                samples=args.samples,
                per_op=not args.no_per_op,
                filters=not args.no_filters,
                calibrate=not args.no_calibrate,
                families=args.families,
                isolate=True,
            )
        except Exception as error:  # noqa: BLE001 - a row, not a crash of the sweep
            traceback.print_exc()
            row = {
                "model": name,
                "exporter": exporter,
                "size": size_for(name, args.size, exporter),
                "export": {"status": "failed", "reason": _reason(error), "seconds": 0},
            }
    print("ZOO-ROW " + json.dumps(row))
    return 0


def size_for(name: str, size: int, exporter: str = "dynamo") -> int:
    """The input side a model runs at: `size`, or the least its forward (and exporter) takes."""
    floor = TORCHSCRIPT_MIN_SIZE.get(name, 0) if exporter == "torchscript" else 0
    return max(size, MIN_SIZE.get(name, 0), floor)


def _worker(name: str, exporter: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        name,
        exporter,
        "--size",
        str(args.size),
        "--samples",
        str(args.samples),
    ]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--no-per-op"] if args.no_per_op else []
    cmd += ["--no-filters"] if args.no_filters else []
    cmd += ["--no-calibrate"] if args.no_calibrate else []
    cmd += ["--families"] if args.families else []
    started = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("ZOO-ROW ")]
        if lines:
            row = json.loads(lines[-1][len("ZOO-ROW ") :])
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            row = {
                "export": {
                    "status": "failed",
                    "seconds": 0,
                    "reason": _reason(f"worker exited {done.returncode}: {tail[0]}"),
                }
            }
    except subprocess.TimeoutExpired:
        row = {
            "export": {
                "status": "failed",
                "seconds": args.timeout,
                "reason": f"timed out after {args.timeout} s (--timeout)",
            }
        }
    row.update(model=name, exporter=exporter)
    row.setdefault("size", size_for(name, args.size, exporter))
    row["wall_s"] = round(time.perf_counter() - started, 1)
    print(
        f"zoo: {name} {exporter}: {verdict(row)} ({row['wall_s']} s)", file=sys.stderr, flush=True
    )
    return row


def breadth_first(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The smallest member of every family first (each exporter), then the second, ...: a
    sweep cut short by `--budget` covers every family."""
    rank = {m: i for members in FAMILIES.values() for i, m in enumerate(members)}
    return sorted(pairs, key=lambda p: rank.get(p[0], 0))  # stable: the given order within


def verdict(row: dict[str, Any]) -> str:
    """'all ok', or the steps that failed."""
    if row.get("export", {}).get("status") != "ok":
        return "export failed"
    bad = [f"gradcheck {p}" for p, r in row.get("gradcheck", {}).items() if r["status"] != "ok"]
    bad += [m for m, r in row.get("steps", {}).items() if r["status"] != "ok"]
    return "all ok" if not bad else "failed: " + ", ".join(bad)


# ---------------------------------------------------------------------------- the table


def _cell(result: dict[str, Any] | None, short: bool = True) -> str:
    if result is None:
        return "–"
    if result["status"] == "ok":
        return f"ok {result['seconds']:.1f}"
    reason = result.get("reason", "")
    if short:
        reason = _short_reason(reason)
    return f"**failed** {result['seconds']:.1f}: {reason}".replace("|", "\\|")


def _short_reason(reason: str) -> str:
    """The op a missing rule names, else the start of the message."""
    import re

    ops = re.findall(r"no (?:backward )?rule for (?:op )?([A-Za-z]+)", reason)
    if ops:
        return "no rule: " + ", ".join(dict.fromkeys(ops))
    return reason if len(reason) <= 90 else reason[:89] + "…"


def write_table(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """ZOO.md: the header (machine, versions, date, settings), a summary table and the full
    table (every step's status and seconds; failures with their reason)."""
    steps = [*STEPS, *per_image_methods(), "filters"]
    lines = [
        "# cnnviz model zoo: every torchvision classification CNN, end to end",
        "",
        "Written by `benchmarks/zoo.py` (random weights, `torch.manual_seed(0)`, exported by "
        "cnnviz's export step; gradcheck and every per-image step on one photo, "
        f"skimage's {IMAGE}). Cells: `ok` or **failed**, then seconds; a failure gives its "
        "reason (full text in the JSON rows).",
        "",
        f"**Command:** `{meta['command']}`  ",
        f"**Date:** {meta['date']}  ",
        f"**Machine:** {meta['machine']}  ",
        f"**Versions:** {meta['versions']}  ",
        f"**Settings:** {meta['settings']}  ",
        f"**Rows run:** {len(rows)} ({meta['run']}); rows not listed were not run.",
        "",
        "## Summary",
        "",
        "| model | exporter | size | params (M) | ops | ops without a rule | gradcheck "
        "gradient / deconvnet / guided | steps ok | wall s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = row.get("export", {}).get("status") == "ok"
        gc = row.get("gradcheck", {})
        gcs = " / ".join(
            "ok" if gc.get(p, {}).get("status") == "ok" else ("–" if p not in gc else "**failed**")
            for p in POLICIES
        )
        done = row.get("steps", {})
        n_ok = sum(r["status"] == "ok" for r in done.values())
        lines.append(
            f"| {row['model']} | {row['exporter']} | {row.get('size', '')} | "
            f"{row.get('params_m', '–')} | {row.get('ops', '–')} | "
            f"{', '.join(row.get('missing', [])) or ('none' if ok else '–')} | {gcs} | "
            f"{n_ok}/{len(done)} | {row.get('wall_s', '')} | "
            f"{verdict(row).replace('|', '/')} |"
        )
    lines += [
        "",
        "## Every step",
        "",
        "| model | exporter | export | "
        + " | ".join(f"gradcheck {p}" for p in POLICIES)
        + " | "
        + " | ".join(steps)
        + " |",
        "|" + "---|" * (3 + len(POLICIES) + len(steps)),
    ]
    for row in rows:
        gc = row.get("gradcheck", {})
        done = row.get("steps", {})
        cells = [_cell(row.get("export"))] + [_cell(gc.get(p)) for p in POLICIES]
        cells += [_cell(done.get(s)) for s in steps]
        lines.append(f"| {row['model']} | {row['exporter']} | " + " | ".join(cells) + " |")
    failures = [
        (row, where, r) for row in rows for where, r in _results(row) if r["status"] != "ok"
    ]
    if failures:
        lines += ["", "## Failures in full", ""]
        for row, where, r in failures:
            lines.append(f"- {row['model']} / {row['exporter']} / {where}: {r.get('reason', '')}")
    out.write_text("\n".join(lines) + "\n")


def _results(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [("export", row["export"])] if "export" in row else []
    found += [(f"gradcheck {p}", r) for p, r in row.get("gradcheck", {}).items()]
    return found + list(row.get("steps", {}).items())


def _write_rows(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _meta(args: argparse.Namespace, argv: list[str]) -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 2**20:.0f} GB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "command": "python3 benchmarks/zoo.py " + " ".join(argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} × {cpu}{memory} (shared: seconds are inflated), "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnx "
        f"{onnx.__version__}, onnxruntime {onnxruntime.__version__} (CPU), numpy "
        f"{numpy.__version__}, Python {platform.python_version()}",
        "settings": f"input {args.size}×{args.size} px (the `size` column: at least "
        f"{MIN_SIZE['inception_v3']} for inception_v3, {MIN_SIZE['alexnet']} for alexnet, 224 for "
        f"alexnet and vgg through TorchScript), gradcheck: {args.samples} input coordinates "
        f"end to end, "
        + (
            "per-op checks off"
            if args.no_per_op
            else "per-op checks (64 coordinates, 2 nodes per op type)"
        )
        + f"; methods: {json.dumps(method_options(args.size))}; filters: "
        + ("off" if args.no_filters else json.dumps(FILTERS))
        + (
            "; BatchNorm statistics as torchvision initializes them"
            if args.no_calibrate
            else "; BatchNorm statistics re-estimated on 32 noise "
            "images before the export (zoo.calibrated_batchnorm)"
        )
        + f"; {args.jobs} job(s), {args.threads or 'default'} thread(s) each",
        "run": "",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model or family names (default: all)")
    parser.add_argument(
        "--smallest", action="store_true", help="only the smallest member of each family named"
    )
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="input side in px")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "ZOO.md"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="(model, exporter) pairs at a time")
    parser.add_argument("--threads", type=int, default=None, help="threads per job")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per (model, exporter)")
    parser.add_argument(
        "--budget",
        type=int,
        default=0,
        help="seconds: start no (model, exporter) after this (0: run all); the table says "
        "which were not run",
    )
    parser.add_argument(
        "--samples", type=int, default=300, help="gradcheck's end-to-end input coordinates"
    )
    parser.add_argument("--no-per-op", action="store_true", help="skip gradcheck's per-op checks")
    parser.add_argument("--no-filters", action="store_true", help="skip filter visualization")
    parser.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep torchvision's BatchNorm buffers (see calibrated_batchnorm)",
    )
    parser.add_argument(
        "--families", action="store_true", help="the CAM family in one explain run (shared time)"
    )
    parser.add_argument(
        "--table-from", help="write the table from the rows of an earlier run's --json"
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "EXPORTER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _one(args)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        meta, rows = saved["meta"], saved["rows"]
        meta["run"] = f"{len(rows)} (model, exporter) pairs, from {args.table_from}"
        write_table(rows, Path(args.out), meta)
        return 0
    models = resolve_models(args.models, args.smallest)
    pairs = breadth_first([(m, e) for m in models for e in args.exporters])
    started = time.monotonic()
    meta = _meta(args, argv)

    done: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run(pair: tuple[str, str]) -> dict[str, Any] | None:
        if args.budget and time.monotonic() - started > args.budget:
            return None  # not started: the budget is spent
        row = _worker(pair[0], pair[1], args)
        if args.json:  # rows so far, for `--table-from` should the sweep be stopped
            with lock:
                done.append(row)
                _write_rows(Path(args.json), meta, done)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, pairs))
    rows = [r for r in results if r is not None]
    skipped = [p for p, r in zip(pairs, results, strict=True) if r is None]
    out = Path(args.out)
    meta["run"] = f"{len(rows)} (model, exporter) pairs"
    meta["date"] += " to " + datetime.now(timezone.utc).strftime("%H:%M UTC")
    meta["machine"] += f", load average {os.getloadavg()[0]:.1f} at the end"
    if skipped:
        meta["run"] += "; not run (--budget spent): " + ", ".join(f"{m} {e}" for m, e in skipped)
    write_table(rows, out, meta)
    if args.json:
        _write_rows(Path(args.json), meta, rows)
    print(f"zoo: {len(rows)} rows -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
