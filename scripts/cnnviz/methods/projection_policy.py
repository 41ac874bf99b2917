"""Which backward rule projects a hidden unit to pixels, and why.

Zeiler & Fergus's deconvnet depends on the image only through max pooling's switches: its
ReLU rule (relu of the backward signal) and the transposed convolutions ignore the forward
pass. Below a layer without max pooling (EfficientNet, MobileNet, most modern CNNs) every
deconvnet projection of a unit is therefore the same picture, whatever the image, only
shifted with the unit's position. Springenberg et al. (2015) met this with guided
backpropagation, which also masks by the forward pass's positive activations.

`auto` uses the deconvnet where switches lie below the layer and guided backprop elsewhere;
`deconvnet`, `guided` and `gradient` force a rule. Every picture records the rule it used and
the reason (`resolve`).
"""

from __future__ import annotations

import onnx

POLICIES = ("auto", "deconvnet", "guided", "gradient")
# Ops whose backward under the deconvnet policy routes by the forward pass (switches).
SWITCHES = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax", "MaxRoiPool"})
TITLES = {"deconvnet": "deconvnet", "guided": "guided backprop", "gradient": "the gradient"}


def switches_below(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Names (or op types) of the max-pooling nodes `tensor` depends on, in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output}
    seen, stack, found = set(), [tensor], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in SWITCHES:
            found.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n.name or n.op_type for n in model.graph.node if id(n) in found]


def image_independent(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether a deconvnet projection from `tensor` is the same for every image."""
    return not switches_below(model, tensor)


def resolve(model: onnx.ModelProto, tensor: str, policy: str) -> tuple[str, str]:
    """(engine policy, why) for projecting from `tensor` under the configured `policy`."""
    if policy not in POLICIES:
        from ..errors import ConfigError

        raise ConfigError(f"projection policy {policy!r}: use one of {', '.join(POLICIES)}")
    pools = switches_below(model, tensor)
    if policy == "auto":
        if pools:
            return "deconvnet", f"auto: max pooling below this layer ({_listed(pools)})"
        return "guided", ("auto: no max pooling below this layer, so a deconvnet projection "
                          "would be the same for every image")
    if policy == "deconvnet" and not pools:
        return policy, ("set in the config; no max pooling below this layer: the same picture "
                        "for every image")
    return policy, "set in the config"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
