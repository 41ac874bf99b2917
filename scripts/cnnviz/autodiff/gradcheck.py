"""`cnnviz gradcheck`: the engine's vector-Jacobian products against finite differences.

Three checks, each comparing the engine (`vjp`, run by ONNX Runtime) with central differences of
forward passes (`finite_diff`):

- per op (`opcheck`): one node per op type and distinct attribute set, alone, at its real
  shapes and attributes, with random inputs;
- end to end: the input gradient of the top logit, over a random subset of coordinates;
- layer (with `layer`): the gradient at an intermediate tensor (Grad-CAM's cut) by directional
  differences of the tail: each channel's all-ones map (the Grad-CAM weights) and random maps.

Float32 FD is a sanity check. A coordinate whose forward and backward one-sided differences
disagree sits within eps of a kink (ReLU, Clip, a MaxPool switch): there the one-sided
difference away from the kink is the derivative, so each coordinate's error is its distance to
the nearest of the three differences (`compare_fd`), and such coordinates are counted as kinks.
Per op the verdict is elementwise (max error / max |FD|, and cosine); end to end and at a
layer, where the float32 noise of a deep network swamps single coordinates, it is the cosine
and the least-squares scale (a map off by a constant factor has cosine 1).
Under `deconvnet` and `guided` the ReLU-like ops have no derivative to difference: they are
checked against a numpy statement of the rule, and the end-to-end check (which would mix them
in) is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import CnnvizError, ConfigError, ModelError
from .finite_diff import (
    central_differences,
    compare,
    compare_fd,
    expose_tensors,
    gradcam_weights_fd,
    random_coordinates,
)
from .opcheck import dims_of, op_checks, policy_ops

E2E_EPS, E2E_COSINE = 1e-2, 0.99
LAYER_EPS, LAYER_COSINE = 1e-2, 0.999
SCALE_TOL = 0.05  # end to end and layer: |scale - 1| (a wrong 1/(H W) passes any cosine)


def gradcheck(
    model_path: str | Path,
    policy: str = "gradient",
    device: str = "cpu",
    samples: int = 1000,
    per_op: bool = True,
    image: str | Path | None = None,
    layer: str | None = None,
    op_samples: int = 128,
    max_instances: int = 6,
    eps: float = E2E_EPS,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the checks; returns a JSON-able dict with `passed` and one entry per check."""
    from . import POLICIES

    if policy not in POLICIES:
        raise ConfigError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    model, card, onnx_path = load_model(model_path)
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {
        "model": str(onnx_path),
        "name": card.get("name", onnx_path.stem) if card else onnx_path.stem,
        "policy": policy,
        "device": device,
        "ops": [],
    }
    modified = policy_ops(policy)
    tensor = _layer_tensor(model, card, layer) if layer else None  # fail before the slow part
    if per_op:
        result["ops"] = op_checks(model, policy, device, rng, op_samples, max_instances, threads)
    x = _input_sample(model, card, image, rng)
    result["end_to_end"], result["layer"] = end_to_end(
        model, x, policy, modified, device, rng, samples, eps, layer, tensor, threads
    )
    checks = list(result["ops"]) + [result["end_to_end"]]
    if result["layer"]:
        checks.append(result["layer"])
    result["failed"] = [_label(c) for c in checks if c["status"] in ("fail", "error")]
    result["unsupported"] = [_label(c) for c in checks if c["status"] == "unsupported"]
    result["passed"] = not result["failed"] and not result["unsupported"]
    return result


# ---------------------------------------------------------------------------- loading


def load_model(path: str | Path) -> tuple[onnx.ModelProto, dict | None, Path]:
    """(model, model.json card or None, path of the .onnx) for a model dir or a .onnx file."""
    path = Path(path)
    card = None
    if path.is_dir():
        card_path = path / "model.json"
        if not card_path.is_file():
            raise ModelError(f"{path} has no model.json; give the model folder or a .onnx file")
        card = json.loads(card_path.read_text())
        onnx_path = path / card.get("onnx", "model.onnx")
    else:
        onnx_path = path
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model {onnx_path} does not exist; run `cnnviz export` first")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as err:  # noqa: BLE001 - any parse error means "not an ONNX model"
        raise ModelError(f"{onnx_path} is not a readable ONNX model: {err}") from err
    if card is None:  # a converter's file (NHWC, uint8 ...): checked as export will feed it
        from ..export.onnx_io import adapt_input, read_input
        from ..export.precision import widen_to_float32

        model = widen_to_float32(model)[0]  # float16: differentiated in float32, as exported
        try:
            spec = read_input(model, onnx_path)
        except ModelError:
            return model, card, onnx_path  # not an image input: checked as it is
        model = adapt_input(model, spec, "RGB")[0]
    return model, card, onnx_path


def _input_sample(model, card, image, rng) -> np.ndarray:
    from ..graph import input_name

    name = input_name(model)
    value = next(v for v in model.graph.input if v.name == name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in dims_of(value)]
    if any(d is None for d in dims[1:]):
        raise ModelError(f"input {name!r} has a non-static image shape {dims}; export it fixed")
    if image is None:
        return rng.standard_normal([1, *dims[1:]]).astype(np.float32)
    from ..images import load_image, preprocess

    pre = (card or {}).get("preprocess") or {
        "size": dims[2:4],
        "resize": "stretch",
        "scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    return preprocess(load_image(image), pre)[None]


# ---------------------------------------------------------------------------- end to end


def end_to_end(model, x, policy, modified, device, rng, samples, eps, layer, tensor, threads):
    """(input-gradient row, layer row or None) for the top logit of `x`."""
    from ..graph import find_logits, input_name
    from ..runtime import make_session
    from . import vjp

    name, logits_name = input_name(model), find_logits(model)
    # The backward session first, so that its graph is gone before the forward session holds
    # the weights too (a model of a few GB: model, graph and sessions are each a copy).
    start = time.perf_counter()
    try:
        g = vjp(model, [name] + ([tensor] if tensor else []), [logits_name], policy, batch=1)
        session, failure = make_session(g, device=device, threads=threads), None
        del g
    except Exception as err:  # noqa: BLE001 - reported as the check's result
        session, failure = None, err
    built = time.perf_counter() - start
    if logits_name not in {o.name for o in model.graph.output}:  # a final Softmax: seed logits
        forward = make_session(expose_tensors(model, [logits_name]), device, threads)
    else:
        forward = make_session(model, device=device, threads=threads)
    logits = forward.run([logits_name], {name: x})[0]
    target = int(np.argmax(logits.reshape(-1)))
    seed = np.zeros_like(logits)
    seed.reshape(-1)[target] = 1.0
    row: dict[str, Any] = {"check": "end_to_end", "target": target, "eps": eps}
    layer_row = None
    start = time.perf_counter()
    if failure is None:
        wanted = [f"grad:{name}"] + ([tensor, f"grad:{tensor}"] if tensor else [])
        try:
            got = session.run(wanted, {name: x, f"seed:{logits_name}": seed})
        except Exception as err:  # noqa: BLE001 - reported as the check's result
            failure = err
    if failure is not None:
        from .context import UnsupportedOpError

        status = "unsupported" if isinstance(failure, UnsupportedOpError) else "error"
        row.update(status=status, note=f"{type(failure).__name__}: {failure}")
        return row, ({"check": "layer", "layer": layer, **row} if layer else None)
    row["engine_seconds"] = round(built + time.perf_counter() - start, 3)
    if modified:
        row.update(
            status="skipped",
            note=f"{policy} changes {', '.join(sorted(modified))}: "
            "no derivative to difference (its rules are checked per op)",
        )
    else:
        coords = random_coordinates(x.size, samples, rng)
        start = time.perf_counter()
        # A deep ReLU net has kinks within eps of many coordinates, most too small to be told
        # from noise (compare_fd's KINK), which bend the differences (ShuffleNet-x1.5 at 32 px:
        # 97 of 300 coordinates, cosine 0.986). A right gradient agrees better as eps shrinks
        # (fewer kinks in reach; 0.999 at eps / 10 there), a wrong one at no eps: one retry.
        for trial in (eps, eps / 10):
            fd = central_differences(
                forward,
                name,
                x,
                seed=seed,
                output_name=logits_name,
                coordinates=coords,
                eps=trial,
                batch_size=32,
                one_sided=True,
            )
            stats = compare_fd(got[0].reshape(-1)[coords], fd)
            ok = stats["cosine"] >= E2E_COSINE and abs(stats["scale"] - 1) < SCALE_TOL
            if ok:
                break
        row.update(stats, eps=trial, fd_seconds=round(time.perf_counter() - start, 3))
        row["status"] = "ok" if ok else "fail"
    if tensor:
        layer_row = _layer_check(
            model,
            tensor,
            layer,
            x,
            got[1],
            got[2],
            seed,
            logits_name,
            policy,
            modified,
            device,
            rng,
            threads,
        )
    return row, layer_row


def _layer_tensor(model, card, layer: str) -> str:
    rows = (card or {}).get("layers") or []
    for row in rows:
        if layer in (row.get("name"), row.get("tensor")):
            return row["tensor"]
    known = {o for n in model.graph.node for o in n.output}
    if layer in known:
        return layer
    names = ", ".join(r["name"] for r in rows[:40]) + (", ..." if len(rows) > 40 else "")
    names = names if rows else "the model has no layer table: give a tensor name"
    raise ConfigError(f"layer {layer!r} is neither a layer of the model nor a tensor; {names}")


def _layer_check(
    model,
    tensor,
    layer,
    x,
    feature,
    grad,
    seed,
    logits_name,
    policy,
    modified,
    device,
    rng,
    threads,
) -> dict[str, Any]:
    from ..runtime import make_session
    from .tail import tail_model

    row: dict[str, Any] = {"check": "layer", "layer": layer, "tensor": tensor, "eps": LAYER_EPS}
    start = time.perf_counter()
    tail = tail_model(model, tensor, [logits_name])
    if modified and any(n.op_type in modified for n in tail.graph.node):
        row.update(status="skipped", note=f"{policy} changes ops between {tensor} and the logits")
        return row
    if feature.ndim != 4:
        raise ModelError(f"layer tensor {tensor!r} is not [N, C, H, W] (shape {feature.shape})")
    session = make_session(tail, device=device, threads=threads)
    tail_input = tail.graph.input[0].name
    extra = {i.name: x for i in tail.graph.input[1:]}  # the image, for a skip path around the cut
    alpha = gradcam_weights_fd(
        session, tail_input, feature, seed=seed, eps=LAYER_EPS, extra_feeds=extra
    )
    alpha_engine = grad.astype(np.float64).mean(axis=(2, 3)).ravel()
    stats = compare(alpha_engine, alpha)
    directions = rng.standard_normal((16, *feature.shape[1:])).astype(np.float32)
    # unit-variance elements: a step of eps per element, as for the channel maps
    fd_dir = central_differences(
        session,
        tail_input,
        feature,
        seed=seed,
        directions=directions,
        eps=LAYER_EPS,
        extra_feeds=extra,
    )
    engine_dir = directions.reshape(16, -1).astype(np.float64) @ grad.reshape(-1)
    dstats = compare(engine_dir, fd_dir)
    row.update(
        channels=int(feature.shape[1]),
        alpha_cosine=stats["cosine"],
        alpha_max_rel_err=stats["max_rel_err"],
        directions=16,
        direction_cosine=dstats["cosine"],
        direction_max_rel_err=dstats["max_rel_err"],
        cosine=min(stats["cosine"], dstats["cosine"]),
        max_rel_err=max(stats["max_rel_err"], dstats["max_rel_err"]),
        fd_seconds=round(time.perf_counter() - start, 3),
    )
    # The tail may hold ReLUs (kinks), so no elementwise bound: direction and scale, as for
    # the end-to-end check (the scale of the worse of the two).
    row["scale"] = max(stats["scale"], dstats["scale"], key=lambda v: abs(v - 1))
    ok = row["cosine"] >= LAYER_COSINE and abs(row["scale"] - 1) < SCALE_TOL
    row["status"] = "ok" if ok else "fail"
    return row


# ---------------------------------------------------------------------------- report


def _label(check: dict) -> str:
    if check["check"] == "op":
        return f"{check['op_type']} ({check['node']})"
    return check["check"] if check["check"] != "layer" else f"layer {check.get('layer')}"


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of the checks, one line each, and the verdict."""
    lines = [
        f"gradcheck {result['name']}  ({result['model']})  policy={result['policy']}  "
        f"device={result['device']}",
        "",
        f"{'check':<22} {'node / target':<44} {'n':>5} {'kinks':>5} {'cosine':>10} "
        f"{'max rel err':>11} {'scale':>7} {'s':>6}  status",
    ]
    for row in result["ops"] + [result["end_to_end"]] + [r for r in [result["layer"]] if r]:
        if row["check"] == "op":
            what, where = row["op_type"], row["node"]
        elif row["check"] == "end_to_end":
            what, where = "end to end (input)", f"logit {row.get('target')}"
        else:
            what, where = "layer (directional)", str(row.get("tensor", row.get("layer")))
            if row.get("layer") not in (None, row.get("tensor")):
                where = f"{row['layer']}: {where}"
        where = where if len(where) <= 44 else "…" + where[-43:]
        cos = f"{row['cosine']:.6f}" if "cosine" in row else "-"
        rel = f"{row['max_rel_err']:.2e}" if "max_rel_err" in row else "-"
        sc = f"{row['scale']:.4f}" if "scale" in row else "-"
        status = row["status"] + (f"  {row['note']}" if row.get("note") else "")
        secs = sum(row.get(k, 0.0) for k in ("seconds", "engine_seconds", "fd_seconds"))
        secs = f"{secs:.1f}"
        lines.append(
            f"{what:<22} {where:<44} {row.get('n', row.get('channels', '-')):>5} "
            f"{row.get('kinks', '-'):>5} {cos:>10} {rel:>11} {sc:>7} {secs:>6}  {status}"
        )
    lines.append("")
    if result["passed"]:
        lines.append("PASSED")
    else:
        bad = result["failed"] + [f"{u} (unsupported)" for u in result["unsupported"]]
        lines.append("FAILED: " + "; ".join(bad))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`cnnviz gradcheck --model results/models/M [--image path] [--layer name]`."""
    parser = argparse.ArgumentParser(
        prog="cnnviz gradcheck",
        description="Check the gradient engine against finite differences on a model.",
    )
    parser.add_argument("--model", required=True, help="model folder (model.json) or .onnx file")
    parser.add_argument("--image", help="image to check at (default: random normal input)")
    parser.add_argument("--layer", help="also check the gradient at this layer (name or tensor)")
    parser.add_argument("--policy", default="gradient", help="gradient | deconvnet | guided")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    parser.add_argument("--samples", type=int, default=1000, help="input coordinates to check")
    parser.add_argument("--op-samples", type=int, default=128, help="coordinates per op check")
    parser.add_argument("--eps", type=float, default=E2E_EPS, help="end-to-end FD step")
    parser.add_argument("--no-per-op", action="store_true", help="skip the per-op checks")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = gradcheck(
            args.model,
            policy=args.policy,
            device=args.device,
            samples=args.samples,
            per_op=not args.no_per_op,
            image=args.image,
            layer=args.layer,
            op_samples=args.op_samples,
            eps=args.eps,
            seed=args.seed,
            threads=args.threads,
        )
    except CnnvizError as err:
        print(f"cnnviz gradcheck: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        from ..artifacts import write_json

        write_json(args.json, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
