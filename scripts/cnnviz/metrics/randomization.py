"""Model-parameter randomization test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

The weights of the model are replaced by random ones layer by layer from the top (cascading:
the logits layer first, then the last conv, ... down to the first conv), each method's maps are
recomputed with the damaged model, and compared with the original maps (Spearman rank
correlation of the raw maps, SSIM of the maps scaled to [0, 1]). A map that explains the
model must change when the model does; a map that stays alike depends on the image more than
on what the network learned.

Randomizing is an initializer rewrite of the ONNX model (numpy, no framework): the weight (and
bias) of each Conv / ConvTranspose / Gemm / MatMul whose parameters are initializers is replaced
by a seeded normal array of the same shape, with the mean and standard deviation of the
original ("match", the default: the layer keeps its scale, loses its information) or He-normal
weights and zero bias ("he"). Layer k's random values depend on (seed, k) only, so the cascade is
consistent: each cut adds layers to the previous one's randomization.
To bound the cost the maps are recomputed at `cuts` points only: the logits layer alone, then
with the last conv, then spread evenly down to all layers.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConfigError
from .similarity import spearman, ssim, unit

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INITS = ("match", "he")


def randomizable_layers(model: onnx.ModelProto, card: dict[str, Any] | None = None) -> list[dict]:
    """The layers with initializer weights, in graph (bottom to top) order.

    Rows: {"name" (model.json's layer name for convs, "logits" for a layer writing a graph
    output), "node", "op", "weight", "bias" (initializer names; bias may be None), "fan_in"}.
    """
    inits = {t.name: t for t in model.graph.initializer}
    friendly = {row.get("conv_output"): row["name"] for row in (card or {}).get("layers", [])}
    outputs = {o.name for o in model.graph.output}
    rows: list[dict[str, Any]] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        shape = list(inits[node.input[1]].dims)
        if len(shape) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("Conv", "ConvTranspose"):
            fan_in = int(np.prod(shape[1:]))
        elif node.op_type == "Gemm" and attrs.get("transB", 0):
            fan_in = shape[-1]
        else:
            fan_in = shape[-2]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        name = friendly.get(node.output[0]) or ("logits" if set(node.output) & outputs else "")
        name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", node.name).strip("._-")
        rows.append({"name": name or f"{node.op_type.lower()}{index}", "node": node.name,
                     "op": node.op_type, "weight": node.input[1], "bias": bias,
                     "fan_in": max(1, int(fan_in))})  # fmt: skip
    seen: set[str] = set()
    for row in rows:
        base, k = row["name"], 2
        while row["name"] in seen:
            row["name"], k = f"{base}_{k}", k + 1
        seen.add(row["name"])
    return rows


def cut_points(layers: int, cuts: int) -> list[int]:
    """How many top layers are random at each cut: 1 (logits), 2 (+ the last conv), then
    spread evenly to all `layers`; at most `cuts` points, the last always all layers."""
    if layers < 1:
        return []
    if cuts < 1:
        raise ConfigError(f"metrics randomization cuts must be at least 1, got {cuts}")
    if cuts == 1:
        return [layers]
    head = [1, 2][: cuts - 1]
    rest = np.linspace(head[-1], layers, cuts - len(head) + 1)[1:]
    return sorted({min(layers, k) for k in head} | {int(round(k)) for k in rest} | {layers})


def random_like(
    values: np.ndarray, rng: np.random.Generator, init: str, fan_in: int, is_bias: bool
) -> np.ndarray:
    """A seeded random array shaped like `values` (see the module notes for `init`)."""
    v = np.asarray(values, dtype=np.float64)
    if init == "match":
        out = rng.normal(float(v.mean()), float(v.std()), size=v.shape)
    elif init == "he":
        out = np.zeros(v.shape) if is_bias else rng.normal(0.0, np.sqrt(2.0 / fan_in), v.shape)
    else:
        raise ConfigError(f"metrics randomization init {init!r}: use one of {', '.join(INITS)}")
    return out.astype(values.dtype)


def randomized_model(
    model: onnx.ModelProto, layers: list[dict], top: int, seed: int = 0, init: str = "match"
) -> onnx.ModelProto:
    """A copy of `model` whose `top` highest layers (of `randomizable_layers`) are random."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for index in range(len(layers) - top, len(layers)):
        layer = layers[index]
        rng = np.random.default_rng([int(seed), index])
        for key in ("weight", "bias"):
            name = layer[key]
            if name is None:
                continue
            old = numpy_helper.to_array(inits[name])
            new = random_like(old, rng, init, layer["fan_in"], key == "bias")
            inits[name].CopyFrom(numpy_helper.from_array(new, name))
    return out


def randomization_test(
    job: Any,
    method: str,
    originals: np.ndarray,
    cuts: int = 6,
    seed: int = 0,
    init: str = "match",
) -> tuple[list[dict], list[list[dict]], float]:
    """Recompute `method` for every row of `job` at each cut; compare with `originals` [N, H, W].

    Returns (cuts: [{"cut": lowest layer randomized, "layers": how many, "fraction"}],
    per row a list over cuts of {"cut", "layers", "spearman", "ssim", "flat"}, seconds).
    A recomputed map that is constant has no ranking: its Spearman is None and "flat" True.
    """
    from .run import compute_maps, job_for

    layers = randomizable_layers(job.model, job.card)
    if not layers:
        raise ConfigError(
            f"model {job.card.get('name')!r} has no Conv/Gemm/MatMul with initializer weights "
            "to randomize"
        )
    started = time.perf_counter()
    info, per_row = [], [[] for _ in job.rows]
    for top in cut_points(len(layers), cuts):
        cut = layers[len(layers) - top]["name"]
        info.append({"cut": cut, "layers": top, "fraction": round(top / len(layers), 4)})
        model = randomized_model(job.model, layers, top, seed, init)
        maps = compute_maps(job_for(job, model), method)
        for r, (before, after) in enumerate(zip(originals, maps, strict=True)):
            rho = spearman(before, after)
            per_row[r].append({
                "cut": cut, "layers": top,
                "spearman": None if np.isnan(rho) else rho,
                "ssim": ssim(unit(before), unit(after)),
                "flat": bool(np.ptp(after) == 0),
            })  # fmt: skip
    return info, per_row, time.perf_counter() - started
