"""Reverse-mode driver: append the backward of an ONNX model to its forward graph.

Only nodes between the wrt tensors and the seeded outputs are differentiated: a tensor gets an
adjoint when it depends on a wrt tensor *and* leads to a seed. Differentiating w.r.t. an
intermediate tensor (Grad-CAM's last conv layer) therefore costs about one forward of the tail.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx
from onnx import TensorProto, helper

from ..errors import ConfigError
from ..graph import move_initializers
from .context import Context, UnsupportedOpError
from .fallback import elementwise_input, finite_difference
from .policies import POLICIES
from .prepare import (
    constant_values,
    elem_types,
    eliminate_dead_nodes,
    prepare,
    static_shapes,
)
from .rules import RULES, Rule
from .rules_elementwise import STRAIGHT_THROUGH

# A rule per node, chosen on the prepared graph (LRP composites, cnnviz.autodiff.rules_lrp):
# {a node's first output: its rule}, taking precedence over the policy's and the op's rule.
NodeRules = Callable[[Context, onnx.GraphProto], Mapping[str, Rule]]
FALLBACKS = ("error", "finite-differences")
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def vjp(
    model: onnx.ModelProto,
    wrt: list[str],
    seed_outputs: list[str] | None = None,
    policy: str = "gradient",
    batch: int = 1,
    fallback: str = "error",
    node_rules: NodeRules | None = None,
) -> onnx.ModelProto:
    """A model computing the forward outputs, each wrt tensor, and ``grad:<wrt>`` for each.

    The gradient is sum over seeds S of <seed:S, dS/d wrt>: each seeded tensor S becomes an input
    ``seed:S`` of S's static shape. Without `seed_outputs` the graph's single output is seeded, or
    the logits feeding it when it is a final Softmax (noted in metadata "cnnviz.seed_note").
    Nodes differentiated by the finite-difference fallback or by a straight-through estimator
    (QuantizeLinear) are listed in "cnnviz.approximate". `node_rules`, called with the context
    and the prepared graph, chooses rules per node (a backward signal that is not a gradient,
    e.g. LRP relevance).
    """
    wrt = list(dict.fromkeys([wrt] if isinstance(wrt, str) else wrt))
    if policy not in POLICIES:
        raise ConfigError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
    if not wrt:
        raise ConfigError("vjp needs at least one wrt tensor")
    m = prepare(model, batch)
    graph = m.graph
    seeds, note = _choose_seeds(graph, seed_outputs)
    known = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for name in list(wrt) + seeds:
        if name not in known:
            raise ConfigError(f"tensor {name!r} is not in the model (after constant folding)")

    shapes, dtypes = static_shapes(graph), elem_types(graph)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    ctx = Context(shapes, dtypes, constant_values(graph), set(), opset, policy)
    ctx.active_tensors = _active_tensors(graph, wrt, seeds, dtypes, set(ctx.constants))
    if node_rules is not None:
        ctx.node_rules = dict(node_rules(ctx, graph))

    adjoints: dict[str, list[str]] = {}
    seed_inputs = []
    for s in seeds:
        seed_inputs.append(helper.make_tensor_value_info(f"seed:{s}", dtypes[s], ctx.shape(s)))
        adjoints.setdefault(s, []).append(f"seed:{s}")

    approximate = _differentiate(ctx, graph, adjoints, fallback)
    outputs = list(graph.output)
    ctx.scope = "bwd/out"
    out_names = {o.name for o in outputs}
    for w in wrt:
        if w not in out_names:
            outputs.append(helper.make_tensor_value_info(w, dtypes[w], ctx.shape(w)))
            out_names.add(w)
    for w in wrt:
        g = _total(ctx, adjoints, w) or ctx.zeros(ctx.shape(w), w)
        ctx.nodes.append(helper.make_node("Identity", [g], [f"grad:{w}"], name=f"grad:{w}"))
        outputs.append(helper.make_tensor_value_info(f"grad:{w}", dtypes[w], ctx.shape(w)))

    graph.node.extend(ctx.nodes)
    move_initializers(ctx.initializers, graph)
    graph.input.extend(seed_inputs)
    graph.ClearField("output")
    graph.output.extend(outputs)
    eliminate_dead_nodes(graph, {o.name for o in outputs})
    _finish(m, model, policy, note, approximate)
    return m


def _differentiate(ctx: Context, graph, adjoints: dict[str, list[str]], fallback: str) -> list:
    """Run the rules in reverse topological order; returns the nodes whose adjoint is an
    estimate (done by the fallback or straight-through)."""
    approximate = []
    if fallback != "finite-differences":
        _refuse_missing_rules(ctx, graph)
    for node in reversed(list(graph.node)):
        if not any(o in ctx.active_tensors for o in node.output):
            continue
        gys = [_total(ctx, adjoints, o) for o in node.output]
        if all(g is None for g in gys):
            continue
        ctx.scope = f"bwd/{node.name or node.op_type}"
        rule = _rule(ctx, node)
        if _without_rule(ctx, node):
            rule = _fallback_rule(ctx, node, fallback)
            approximate.append(node.name or node.op_type)
        elif node.op_type in STRAIGHT_THROUGH:
            approximate.append(node.name or node.op_type)
        for name, g in zip(node.input, rule(ctx, node, gys), strict=False):
            if g is not None and ctx.active(name):
                adjoints.setdefault(name, []).append(g)
    return approximate


def _choose_seeds(graph: onnx.GraphProto, seed_outputs: list[str] | None):
    if seed_outputs:
        return list(seed_outputs), None
    if len(graph.output) != 1:
        names = ", ".join(o.name for o in graph.output)
        raise ConfigError(f"the model has several outputs ({names}); name the seed_outputs")
    out = graph.output[0].name
    producer = next((n for n in graph.node if out in n.output), None)
    if producer is not None and producer.op_type == "Softmax":
        logits = producer.input[0]
        note = (
            f"seeded {logits!r}, the input of the final Softmax node {producer.name!r}, "
            f"instead of the output {out!r} (gradients of logits, not probabilities)"
        )
        return [logits], note
    return [out], None


def _active_tensors(graph, wrt, seeds, dtypes, constants) -> set[str]:
    """Float tensors that depend on a wrt tensor and lead to a seed, and the integer outputs of
    straight-through ops (QuantizeLinear) on that path: their float adjoints pass the rounding."""
    forward = set(wrt)
    for node in graph.node:
        if any(i in forward for i in node.input):
            through = node.op_type in STRAIGHT_THROUGH
            forward.update(
                o for o in node.output if o and (through or dtypes.get(o) in FLOAT_TYPES)
            )
    backward = set(seeds)
    for node in reversed(list(graph.node)):
        if any(o in backward for o in node.output):
            backward.update(i for i in node.input if i)
    return (forward & backward) - constants


def _total(ctx: Context, adjoints: dict[str, list[str]], name: str) -> str | None:
    """The summed adjoint of `name` (emitting Add/Sum once), or None."""
    parts = adjoints.get(name)
    if not parts:
        return None
    if len(parts) > 1:
        parts[:] = [ctx.op("Sum", parts)]
    return parts[0]


def _rule(ctx: Context, node: onnx.NodeProto) -> Rule | None:
    chosen = ctx.node_rules.get(node.output[0]) if node.output else None
    return chosen or POLICIES[ctx.policy].get(node.op_type) or RULES.get(node.op_type)


def _without_rule(ctx: Context, node: onnx.NodeProto) -> bool:
    return _rule(ctx, node) is None or node.domain not in ("", "ai.onnx")


def _refuse_missing_rules(ctx: Context, graph) -> None:
    """Every op on the differentiated path that has no rule, in one error (not the first one
    met): which could use the finite-difference fallback, and the way out for the rest."""
    missing: dict[str, list[str]] = {}
    elementwise: set[str] = set()
    for node in graph.node:
        needs_rule = any(o in ctx.active_tensors for o in node.output) and any(
            ctx.active(i) for i in node.input
        )
        if needs_rule and _without_rule(ctx, node):
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing.setdefault(op, []).append(repr(node.name))
            if elementwise_input(ctx, node) is not None:
                elementwise.add(op)
    if not missing:
        return
    ops = "; ".join(
        f"{op} ({len(names)} node{'s' * (len(names) > 1)}: {', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''})"
        for op, names in missing.items()
    )
    ways = []
    if elementwise:
        ways.append(
            f"{', '.join(sorted(elementwise))} could use fallback: finite-differences "
            "(in-graph central differences, maps marked approximate)"
        )
    if set(missing) - elementwise:
        ways.append(
            f"{', '.join(sorted(set(missing) - elementwise))}: the finite-difference fallback "
            "only covers elementwise ops, so cut the graph after them (differentiate w.r.t. a "
            "later tensor) or add a rule to cnnviz/autodiff/rules.py"
        )
    raise UnsupportedOpError(
        f"no backward rule for {len(missing)} op type{'s' * (len(missing) > 1)} of this model: "
        f"{ops}. {'; '.join(ways)}"
    )


def _fallback_rule(ctx: Context, node: onnx.NodeProto, fallback: str):
    if fallback == "finite-differences":
        return finite_difference
    hint = (
        "set fallback: finite-differences (in-graph central differences, marked approximate)"
        if elementwise_input(ctx, node) is not None
        else "the finite-difference fallback only covers elementwise ops, so cut the graph after "
        "this node (differentiate w.r.t. a later tensor) or add a rule to "
        "cnnviz/autodiff/rules.py"
    )
    raise UnsupportedOpError(
        f"no backward rule for op {node.op_type} (node {node.name!r}); {hint}"
    )


def _finish(m: onnx.ModelProto, source: onnx.ModelProto, policy, note, approximate) -> None:
    m.ir_version = source.ir_version if 0 < source.ir_version <= 13 else 8
    m.ir_version = max(m.ir_version, 8)
    meta = {p.key: p.value for p in m.metadata_props}
    meta["cnnviz.policy"] = policy
    if note:
        meta["cnnviz.seed_note"] = note
    if approximate:
        meta["cnnviz.approximate"] = ",".join(approximate)
    m.ClearField("metadata_props")
    for key, value in meta.items():
        m.metadata_props.add(key=key, value=value)
