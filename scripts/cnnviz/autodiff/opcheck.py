"""Per-op check: one node of a real model, alone, its engine VJP against finite differences.

For every op type on the model's differentiable path, one node per distinct attribute set (up
to `max_instances`) becomes a one-node model with the node's real attributes, shapes and
constant inputs, and random values for the inputs that carry the gradient (spread over every
piece of piecewise ops: Clip's bounds, HardSwish's +-3). Its VJP for a random seed is compared
elementwise with central differences (`compare_fd`: kink-aware). Under `deconvnet` / `guided`
the ReLU-like ops have no derivative to difference and are compared with a numpy statement of
their rule instead.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .finite_diff import central_differences, compare, compare_fd, random_coordinates
from .prepare import constant_values, elem_types, prepare, static_shapes
from .tail import batch_reshapes

FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
# Inputs that must stay positive for the op to be differentiable (index per op type).
POSITIVE_INPUTS = {"Sqrt": {0}, "Log": {0}, "Reciprocal": {0}, "Div": {1}, "Pow": {0}}
OP_COSINE, OP_REL = 0.9999, 2e-3
# FD step per op: large where the op is smooth (float32 noise ~ ulp(y) / eps shrinks), small
# where it has kinks (fewer coordinates within eps of one).
OP_EPS, KINKED_OP_EPS = 1e-2, 1e-3
KINKED_OPS = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu", "MaxPool", "HardSigmoid",
    "HardSwish", "Abs", "Max", "Min", "ReduceMax", "ReduceMin", "Elu", "Selu", "Celu",
}  # fmt: skip


def policy_ops(policy: str) -> set[str]:
    """Op types whose backward under `policy` is not their derivative."""
    from . import POLICIES

    true = POLICIES["gradient"]
    return {op for op, rule in POLICIES[policy].items() if true.get(op) is not rule}


def op_checks(
    model: onnx.ModelProto,
    policy: str,
    device: str,
    rng: np.random.Generator,
    op_samples: int = 128,
    max_instances: int = 6,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One row per checked node: one per distinct attribute set of each op type (in order)."""
    from ..graph import find_logits, input_name

    prepared = prepare(model, 1)
    graph = prepared.graph
    shapes, types, consts = static_shapes(graph), elem_types(graph), constant_values(graph)
    active = _active(graph, input_name(prepared), find_logits(prepared), types)
    chosen: dict[str, list[onnx.NodeProto]] = {}
    signatures: set[tuple] = set()
    for node in graph.node:
        if not any(i in active for i in node.input) or not any(o in active for o in node.output):
            continue
        sig = _signature(node, active, shapes)
        picked = chosen.setdefault(node.op_type, [])
        if sig in signatures or len(picked) >= max_instances:
            continue
        signatures.add(sig)
        picked.append(node)
    needed = sorted(
        {i for nodes in chosen.values() for n in nodes for i in n.input}
        - active
        - set(consts)
        - {""}
    )
    computed = _values(prepared, needed, rng, device) if needed else {}
    modified = policy_ops(policy)
    rows = []
    opsets = list(prepared.opset_import)
    for op_type in chosen:
        for node in chosen[op_type]:
            start = time.perf_counter()
            try:
                row = _check_node(
                    node,
                    active,
                    shapes,
                    types,
                    {**consts, **computed},
                    opsets,
                    policy,
                    op_type in modified,
                    device,
                    rng,
                    op_samples,
                    threads,
                )
            except Exception as err:  # noqa: BLE001 - one broken op must not hide the others
                from .context import UnsupportedOpError

                status = "unsupported" if isinstance(err, UnsupportedOpError) else "error"
                row = {"status": status, "note": f"{type(err).__name__}: {err}"}
            row = {"check": "op", "op_type": op_type, "node": node.name, **row}
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
    return rows


def _active(graph: onnx.GraphProto, source: str, target: str, types: dict) -> set[str]:
    forward = {source}
    for node in graph.node:
        if any(i in forward for i in node.input):
            forward.update(o for o in node.output if types.get(o) in FLOATS)
    backward = {target}
    for node in reversed(list(graph.node)):
        if any(o in backward for o in node.output):
            backward.update(i for i in node.input if i)
    return forward & backward


def _signature(node: onnx.NodeProto, active: set[str], shapes: dict) -> tuple:
    attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute))
    kinds = tuple(
        ("active" if i in active else "const", len(shapes.get(i, ()))) for i in node.input
    )
    return node.op_type, attrs, kinds


def _values(prepared, names, rng, device) -> dict[str, np.ndarray]:
    """Values of non-constant inputs that do not depend on the image (rare after folding)."""
    from ..graph import input_name
    from .finite_diff import tensor_values

    name = input_name(prepared)
    value = next(v for v in prepared.graph.input if v.name == name)
    x = rng.standard_normal([d.dim_value for d in dims_of(value)]).astype(np.float32)
    return dict(zip(names, tensor_values(prepared, {name: x}, names, device), strict=True))


def _check_node(
    node, active, shapes, types, values, opsets, policy, modified, device, rng, n, threads
) -> dict[str, Any]:
    from ..runtime import make_session
    from . import vjp

    tiny, feeds, outputs = _one_node_model(node, active, shapes, types, values, opsets, rng)
    wrt = list(feeds)
    lead = [1] if _needs_batch_axis(node, active, shapes) else []
    seeds = {
        o: rng.standard_normal(lead + list(shapes[node.output[k]])).astype(np.float32)
        for k, o in enumerate(outputs)
    }
    g = vjp(tiny, wrt, seed_outputs=list(outputs), policy=policy, batch=1)
    session = make_session(g, device=device, threads=threads)
    run = session.run(
        [f"grad:{w}" for w in wrt], {**feeds, **{f"seed:{o}": s for o, s in seeds.items()}}
    )
    engine = dict(zip(wrt, run, strict=True))
    shape_note = " ".join(f"{list(v.shape)}" for v in feeds.values())
    if modified:
        expected = _policy_reference(node, policy, feeds[wrt[0]], seeds[outputs[0]], values)
        stats = compare(engine[wrt[0]].ravel(), expected.ravel())
        ok = stats["max_rel_err"] < 1e-5
        return {
            **stats,
            "kinks": 0,
            "shapes": shape_note,
            "status": "ok" if ok else "fail",
            "note": f"{policy} rule vs numpy statement of it",
        }

    # With its own batch axis of 1 (Squeeze in front) the node model takes one row per run.
    fd_model, batch_size = (tiny, 1) if lead else _batchable(tiny, feeds, device, threads)
    fd_session = make_session(fd_model, device=device, threads=threads)
    per_input = max(8, n // len(wrt))
    eps = KINKED_OP_EPS if node.op_type in KINKED_OPS else OP_EPS
    got, fd = [], []
    for w in wrt:
        coords = random_coordinates(feeds[w].size, per_input, rng)
        others = {k: v for k, v in feeds.items() if k != w}
        fd.append(
            central_differences(
                fd_session,
                w,
                feeds[w],
                seed=seeds,
                coordinates=coords,
                eps=eps,
                batch_size=batch_size,
                extra_feeds=others,
                one_sided=True,
            )
        )
        got.append(engine[w].reshape(-1)[coords])
    stats = compare_fd(np.concatenate(got), np.concatenate(fd))
    ok = stats["cosine"] >= OP_COSINE and stats["max_rel_err"] < OP_REL
    return {**stats, "eps": eps, "shapes": shape_note, "status": "ok" if ok else "fail"}


def _needs_batch_axis(node, active, shapes) -> bool:
    """Whether a tensor of the node leads with an axis other than the batch (a model that moves
    the batch axis, as dynamo's adaptive pooling does with a Transpose before a GatherND): the
    engine and the finite differences take a graph's leading axis for the batch, so the
    one-node model then gets a batch axis of its own in front of every tensor."""
    tensors = [n for n in [*node.input, *node.output] if n in active]
    return any(shapes.get(n) and shapes[n][0] != 1 for n in tensors)


def _one_node_model(node, active, shapes, types, values, opsets, rng):
    """The node alone: active inputs become graph inputs x<k> (random), the rest initializers;
    with `_needs_batch_axis`, inputs and outputs carry an extra leading axis of 1 (Squeeze and
    Unsqueeze around the node)."""
    lead = _needs_batch_axis(node, active, shapes)
    opset = next((o.version for o in opsets if o.domain in ("", "ai.onnx")), 13)
    inputs, inits, feeds, names, before, after = [], [], {}, [], [], []
    for k, name in enumerate(node.input):
        if not name:
            names.append("")
            continue
        if name in active:
            new = f"x{k}"
            value = _random_input(node, k, shapes[name], values, rng)
            feeds[new] = value[None] if lead else value
            dims = [1, *shapes[name]] if lead else shapes[name]
            inputs.append(helper.make_tensor_value_info(new, types[name], dims))
            if lead:
                before.append(_axis0_node("Squeeze", new, new + "_", opset, inits))
                new += "_"
        else:
            new = f"c{k}"
            inits.append(numpy_helper.from_array(np.asarray(values[name]), new))
        names.append(new)
    outputs, out_infos = [], []
    out_names = []
    for k, name in enumerate(node.output):
        new = f"y{k}" if name else ""
        out_names.append(new + "_" if lead and new else new)
        if name and types.get(name) in FLOATS and name in active:
            outputs.append(new)
        if name:
            shape = shapes.get(name)
            if lead:
                after.append(_axis0_node("Unsqueeze", new + "_", new, opset, inits))
                shape = [1, *shape] if shape is not None else None
            out_infos.append(helper.make_tensor_value_info(new, types[name], shape))
    one = helper.make_node(node.op_type, names, out_names, name=node.name, domain=node.domain)
    one.attribute.extend(node.attribute)
    nodes = [*before, one, *after]
    graph = helper.make_graph(nodes, f"one_{node.op_type}", inputs, out_infos, inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model, feeds, outputs


def _axis0_node(op_type: str, source: str, target: str, opset: int, inits: list):
    """Squeeze or Unsqueeze of axis 0 (axes an input from opset 13, an attribute before)."""
    if opset < 13:
        return helper.make_node(op_type, [source], [target], axes=[0])
    if not any(i.name == "axis0" for i in inits):
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    return helper.make_node(op_type, [source, "axis0"], [target])


def _random_input(node, k: int, shape, values, rng) -> np.ndarray:
    """Random values that visit every piece of the op: N(0, 1), spread over Clip's bounds and
    HardSwish/HardSigmoid's +-3, positive where the op needs it."""
    value = rng.standard_normal(shape)
    if k in POSITIVE_INPUTS.get(node.op_type, ()):
        value = np.abs(value) + 0.5
    elif node.op_type in ("HardSwish", "HardSigmoid"):
        value = 3.0 * value
    elif node.op_type == "Clip" and k == 0:
        lo, hi = _clip_bounds(node, values)
        lo = lo if np.isfinite(lo) else (hi - 4.0 if np.isfinite(hi) else -2.0)
        hi = hi if np.isfinite(hi) else lo + 4.0
        value = rng.uniform(lo - 1.0, hi + 1.0, size=shape)
    return value.astype(np.float32)


def _clip_bounds(node, values) -> tuple[float, float]:
    """Clip's (lo, hi) from its constant inputs (opset >= 11) or attributes; +-inf if absent."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    names = list(node.input[1:3]) + ["", ""]
    found = [values.get(n) if n else None for n in names[:2]]
    lo = float(found[0]) if found[0] is not None else float(attrs.get("min", -np.inf))
    hi = float(found[1]) if found[1] is not None else float(attrs.get("max", np.inf))
    return lo, hi


def _batchable(tiny, feeds, device, threads) -> tuple[onnx.ModelProto, int]:
    """A copy with a free batch axis when the op allows it (checked), else (tiny, 1)."""
    from ..runtime import make_session

    model = onnx.ModelProto()
    model.CopyFrom(tiny)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = dims_of(value)
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    inits = {i.name: i for i in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in dims_of(v)] for v in tiny.graph.input}
    model.graph.initializer.extend(batch_reshapes(model.graph.node, inits, shapes))
    try:
        one = make_session(tiny, device=device, threads=threads).run(None, feeds)
        two_feeds = {k: np.concatenate([v, v]) for k, v in feeds.items()}
        two = make_session(model, device=device, threads=threads).run(None, two_feeds)
        if all(
            np.array_equal(a[0], b[1]) and a.shape[1:] == b.shape[1:]
            for a, b in zip(one, two, strict=True)
        ):
            return model, 64
    except Exception:  # noqa: BLE001 - not batchable: fall back to one row per run
        pass
    return tiny, 1


def _policy_reference(node, policy, x, g, values) -> np.ndarray:
    """deconvnet: relu(g); guided: relu(g) * (lo < x < hi) for Relu/LeakyRelu/PRelu/Clip, with
    lo = alpha for ThresholdedRelu."""
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    if policy == "deconvnet":
        return np.maximum(g64, 0)
    lo, hi = _clip_bounds(node, values) if node.op_type == "Clip" else (0.0, np.inf)
    if node.op_type == "ThresholdedRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        lo = float(alpha)
    return np.maximum(g64, 0) * ((x64 > lo) & (x64 < hi))


def dims_of(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim
