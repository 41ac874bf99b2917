"""Layer-wise relevance propagation (`lrp`): the engine's vjp under an LRP composite.

One graph (`lrp_graph`, run by the one runner): the model's vjp w.r.t. its input, every node's
rule chosen by the composite (cnnviz.autodiff.rules_lrp), seeded with a one-hot row per image and
target; the relevance at the input is scaled by the target logit in the graph, so it is zennit's
"one-hot times the output" seed and sums to the logit up to what biases and stabilizers absorb
(every LRP rule is linear in the upper relevance). The saved map is the channel sum [H, W]
(signed); the [3, H, W] relevance is the signed picture.

z-box's bounds are the model's pixel range (0 and 255 through its preprocessing, as the
"black" / "white" integrated-gradients baselines), taken at the first convolution's input: the
model input itself, or, when ops come first (an adapter's transpose or channel reversal), the
elementwise min / max of those ops applied to the black and the white image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from ..autodiff.rules_lrp import COMPOSITES, LrpSettings, composite_rules
from ..errors import ConfigError


def pixel_bounds(pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [1, 3, 1, 1] float32: pixels 0 and 255 after the model's preprocessing."""
    from ..images import normalization

    scale, mean, std = normalization(pre)
    low = (0.0 / scale - mean) / std
    high = (255.0 / scale - mean) / std
    lo, hi = np.minimum(low, high), np.maximum(low, high)
    return lo.reshape(1, -1, 1, 1).astype(np.float32), hi.reshape(1, -1, 1, 1).astype(np.float32)


def bounds_at_first_conv(
    model: onnx.ModelProto, low: np.ndarray, high: np.ndarray, size: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The input bounds where z-box applies: at the first Conv's input (see the module doc)."""
    from ..autodiff.finite_diff import tensor_values
    from .backprop import model_input_name

    x = model_input_name(model)
    reached = {x}
    first = None
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            if node.op_type == "Conv":
                first = node
                break
            reached.update(node.output)
    if first is None or first.input[0] == x:
        return low, high
    images = [np.broadcast_to(b, (1, *size)).astype(np.float32) for b in (low, high)]
    at = [tensor_values(model, {x: image}, [first.input[0]], threads=1)[0] for image in images]
    return np.minimum(*at), np.maximum(*at)


def lrp_model(
    model: onnx.ModelProto,
    composite: str,
    settings: LrpSettings,
    batch: int,
    fallback: str = "error",
) -> onnx.ModelProto:
    """The vjp of `model` w.r.t. its input under the composite's rules (relevance as grad)."""
    from ..autodiff import vjp
    from .backprop import SEED_PREFIX, model_input_name

    g = vjp(model, wrt=[model_input_name(model)], policy="gradient", batch=batch,
            fallback=fallback, node_rules=composite_rules(composite, settings))
    outputs = {o.name for o in g.graph.output}
    for seed in g.graph.input:  # the seeded logits (a final Softmax is skipped by the seed)
        name = seed.name[len(SEED_PREFIX):]
        if seed.name.startswith(SEED_PREFIX) and name not in outputs:
            value = onnx.ValueInfoProto()
            value.CopyFrom(seed)
            value.name = name
            g.graph.output.append(value)
    meta = {p.key: p.value for p in g.metadata_props}
    meta["cnnviz.policy"] = f"lrp:{composite}"
    g.ClearField("metadata_props")
    for key, value in meta.items():
        g.metadata_props.add(key=key, value=value)
    return g


def lrp_graph(
    model: onnx.ModelProto,
    images: int,
    composite: str,
    settings: LrpSettings,
    fallback: str = "error",
):  # noqa: ANN201 - MethodGraph
    """LRP as one graph: images [B, C, H, W] and targets [B] in; out `signed` (the relevance
    [B, C, H, W], seeded with the target logit), `map` (its channel sum) and `logit` [B]."""
    from ..graph import fix_batch
    from ..methodgraph import (
        FLOAT,
        INT64,
        GraphBuilder,
        MethodGraph,
        one_hot,
        seed_input,
        static_dims,
    )
    from .backprop import GRAD_PREFIX, SEED_PREFIX, model_input_name

    b = GraphBuilder.for_model(model)
    dims = [d.dim_value for d in fix_batch(model, 1).graph.input[0].type.tensor_type.shape.dim][1:]
    x = b.input("images", FLOAT, [images, *dims])
    t = b.input("targets", INT64, [images])
    core = lrp_model(model, composite, settings, images, fallback)
    name = model_input_name(model)
    seed = seed_input(core)
    seed_dims = static_dims(seed)[1:]
    seeds = one_hot(b, t, int(np.prod(seed_dims)), seed_dims)
    weights = {init.name for init in model.graph.initializer}
    names = b.inline(core, {name: x, seed.name: seeds}, "model", shared=weights)
    del core  # copied into the builder: freed before the graph is built and opened
    value = names[seed.name[len(SEED_PREFIX):]]
    logit = b.reduce("ReduceSum", b.op("Mul", [b.reshape(value, [images, -1]),
                                               b.reshape(seeds, [images, -1])]), [1])
    signed = b.op("Mul", [names[GRAD_PREFIX + name], b.reshape(logit, [images, 1, 1, 1])])
    b.output("signed", signed)
    b.output("map", b.reduce("ReduceSum", signed, [1]))
    b.output("logit", logit)
    return MethodGraph(b.build(f"lrp_{composite}"), images)


def settings_of(options: dict[str, Any], card: dict[str, Any], model: onnx.ModelProto,
                size: tuple[int, ...]) -> LrpSettings:
    """The rules' parameters from a job's options and the model card (z-box's pixel range)."""
    composite, epsilon, gamma = options["composite"], options["epsilon"], options["gamma"]
    if composite not in COMPOSITES:
        raise ConfigError(f"lrp composite {composite!r} is not one of {', '.join(COMPOSITES)}")
    if float(epsilon) < 0 or float(gamma) < 0:
        raise ConfigError(f"lrp needs epsilon >= 0 and gamma >= 0, got {epsilon}, {gamma}")
    low, high = pixel_bounds(card["preprocess"])
    if COMPOSITES[str(options["composite"])].first == "zbox":
        low, high = bounds_at_first_conv(model, low, high, size)
    return LrpSettings(epsilon=float(options["epsilon"]), gamma=float(options["gamma"]),
                       low=low, high=high)


def run_lrp(job) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]]:  # noqa: ANN001 - explain.Job
    """LRP maps of a job's rows: raw = the relevance's channel sum [H, W] (signed), signed =
    the relevance [3, H, W]; info: the composite and relevance sum / target logit."""
    from ..runner import Runner, chunk_plan

    composite = str(job.options["composite"])
    settings = settings_of(job.options, job.card, job.model, tuple(job.inputs.shape[1:]))
    images, _ = chunk_plan(1, job.batch_size)
    images = max(1, min(images, len(job.rows)))
    graph = lrp_graph(job.model, images, composite, settings, job.fallback)
    feeds = {"images": job.row_inputs, "targets": np.asarray(job.row_targets, np.int64)}
    out = Runner(graph, job.device, job.threads).run(feeds)
    for r, (i, _) in enumerate(job.rows):
        total = float(np.asarray(out["signed"][r], np.float64).sum())
        logit = float(out["logit"][r])
        info = {"signed": True, "composite": composite,
                "relevance_sum": round(total, 6), "logit": round(logit, 6)}
        yield i, out["map"][r].astype(np.float32), out["signed"][r].astype(np.float32), info
