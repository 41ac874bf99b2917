"""What each picture is and how to read it: one line per picture, and the colour bars.

The colour maps are render.py's: viridis for activations (each tile scaled to its own range),
inferno for heat maps laid over the image. Both are perceptually uniform, so equal steps in value
look like equal steps in brightness; the colour bars are CSS gradients sampled from the same maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps

from .. import registry
from ..methods.objectives import FILTER_DEFAULT, NEURON_OBJECTIVE
from ..render import ACTIVATION_CMAP, HEAT_CMAP

HEAT_READING = (
    "bright = more evidence for the class, dark = little or none (inferno over the image the "
    "model saw, scaled to this map's maximum)"
)
HEAT_SHORT = "bright = more evidence for the class, dark = little or none"
# method -> (title, what it computes, how to read it). "heat" means HEAT_READING.
METHODS: dict[str, tuple[str, str, str]] = {
    name: (m.title, m.what, m.reading) for name, m in registry.METHODS.items()
}


def method_title(method: str) -> str:
    return METHODS.get(method, (method.replace("_", " ").capitalize(), "", ""))[0]


def method_short(method: str) -> str:
    """A title narrow enough for a 64 px column (soft hyphens where a long word may break)."""
    short = {"projections": "Projec\u00adtions", "smoothgrad": "Smooth\u00adGrad",
             "integrated_gradients": "Integrated Gradients"}  # fmt: skip
    return short.get(method, method_title(method))


def method_summary(method: str) -> str:
    """'Title: what it computes.' (plus how to read it when it is not a heat map)."""
    title, what, reading = METHODS.get(method, (method_title(method), "", ""))
    text = f"{title}: {what}." if what else f"{title}: pictures written by the {method} step."
    return f"{text} {reading[0].upper()}{reading[1:]}." if reading not in ("", "heat") else text


def uses_heat(method: str, info: dict[str, Any] | None = None) -> bool:
    """Whether the picture is an inferno overlay (the JSON may say otherwise: "picture")."""
    picture = (info or {}).get("picture")
    if picture is not None:
        return str(picture) in ("overlay", "heat")
    return METHODS.get(method, ("", "", "heat"))[2] == "heat"


def explanation_caption(
    method: str, info: dict[str, Any], label: str, image: str | None = None
) -> str:
    """One line: method (and image, when given), class and layer, then how to read the colours."""
    parts = [f"{method_title(method)} for {image}"] if image else []
    if info.get("target") is not None:
        parts.append(f"class {info['target']} ({label})" if label else f"class {info['target']}")
    if info.get("layer"):
        parts.append(f"layer {info['layer']}")
    if info.get("policy_reason"):  # projections (not guided backprop's own maps)
        parts.append(policy_text(info))
    head = ", ".join(parts)
    head = head[0].upper() + head[1:] if head else method_title(method)
    if uses_heat(method, info):
        return f"{head}: {HEAT_SHORT}."
    reading = METHODS.get(method, ("", "", ""))[2]
    return f"{head}: {reading}." if reading else f"{head}."


def activation_caption(row: dict[str, Any], image: str, stats: dict[str, float]) -> str:
    """One line: the layer, its shape, then how to read the tiles and how many are blank."""
    shape = "\u00d7".join(str(v) for v in row.get("shape", []))
    blank = stats.get("blank_fraction")
    blank_text = f"; {100 * blank:.0f}% blank" if blank is not None else ""
    return (
        f"{row['name']} (depth {row.get('depth', '?')}, {shape}) for {image}: one tile per "
        f"channel, viridis scaled per tile; hatched grey = blank channel{blank_text}."
    )


def channel_caption(layer: str, channel: str, image: str) -> str:
    return (
        f"{layer}, channel {channel} for {image}, enlarged: viridis scaled to this channel's "
        "min..max (dark purple = low, yellow = high)."
    )


def filter_caption(item: dict[str, Any]) -> str:
    info = item["info"]
    filters = info.get("filters") or []
    count = f"{len(filters)} filters" if filters else "its filters"
    first = f", filter {filters[0]} top left, row-major" if filters else ""
    steps = f" after {info['steps']} steps" if info.get("steps") else ""
    expression = " ".join(str(info.get("expression") or "channel(layer, c)").split())
    goals = {FILTER_DEFAULT: "make that filter's channel fire as much as possible",
             NEURON_OBJECTIVE: "make the one unit at the centre of that filter's map fire as "
             "much as possible"}
    goal = goals.get(expression, f"maximize {expression} (c = the filter)")
    return (
        f"{item['layer']} ({item['mode']}): for each of {count}, an input image optimized to "
        f"{goal}{steps}{first}. Patterns = what "
        "the filter responds to; a flat grey tile = a filter the optimization could not excite."
    )


def class_models_caption(info: dict[str, Any]) -> str:
    classes = info.get("classes") or []
    order = "; ".join(f"{c.get('label')} ({c.get('index')})" for c in classes)
    pictures = int(info.get("pictures") or 1)
    div = (f", kept apart by a diversity term (weight {info.get('diversity')}) at "
           f"{info.get('diversity_tensor')}" if info.get("diversity") else "")
    many = f"{pictures} pictures per class{div}" if pictures > 1 else "one picture per class"
    steps = f" after {info['steps']} steps" if info.get("steps") else ""
    return (
        f"One row per class, top to bottom: {order}. Each picture maximizes the class's logit "
        f"({info.get('mode', 'lucent')} mode{steps}); {many}. Recognizable parts (textures, "
        "eyes, wheels) are what the model keys on; a noisy tile = a class it cannot draw."
    )


def class_models_curve_caption(info: dict[str, Any]) -> str:
    return (
        "The class's logit per optimization step, one line per picture (lucent: on the "
        "randomly transformed picture the step saw). A curve that rises and flattens has "
        "converged; the table gives the logit and softmax probability of the final pictures."
    )


def curve_caption(item: dict[str, Any]) -> str:
    expression = " ".join(str(item["info"].get("expression") or "channel(layer, c)").split())
    what = ("the filter's mean activation" if expression == "channel(layer, c)"
            else f"{expression} (c = the filter)")
    return (
        f"{item['layer']} ({item['mode']}): {what} per optimization step "
        "(thin: one filter, thick: the median); red dots: the final image, untransformed. A "
        "curve that rises and flattens has converged."
    )


def policy_text(info: dict[str, Any]) -> str:
    """'projected by guided backprop (auto: no max pooling below this layer, ...)'."""
    from ..methods.projection_policy import TITLES

    policy = str(info.get("policy", "deconvnet"))
    reason = info.get("policy_reason")
    return f"projected by {TITLES.get(policy, policy)}" + (f" ({reason})" if reason else "")


def atlas_caption(item: dict[str, Any]) -> str:
    info = item["info"]
    top = info.get("top_k", info.get("k"))
    top_text = f"the {top} images" if top else "the images"
    return (
        f"{item['layer']}: for each channel, {top_text} of this run that excite it most "
        f"(strongest first), each {policy_text(info)}, beside the image patch it sees."
    )


METRIC_PLOTS = {
    "deletion_insertion": (
        "Deletion (left): the class probability as each map's most important pixels are "
        "removed first, lower is better; insertion (right): as they are put back, higher is "
        "better. The dashed 'random' curve is the reference a useful map must beat."
    ),
    "randomization": (
        "Model-parameter randomization: how similar each method's maps stay to the trained "
        "model's as more layers are randomized from the top; the curves should fall. A method "
        "that stays high shows the image, not what the model learned."
    ),
}


def metric_caption(name: str) -> str:
    return METRIC_PLOTS.get(name, f"{name.replace('_', ' ')}: a plot written by the metrics step.")


SPARSITY_CAPTION = (
    "Fraction of blank channels (never above eps for this image) per conv layer, shallow to "
    "deep; thin lines: single images, thick: their mean. Rising = deeper layers are sparser."
)


def colour_stops(name: str, steps: int = 11) -> str:
    """A CSS linear-gradient over the colour map `name` (left = 0, right = max)."""
    rgba = colormaps[name](np.linspace(0.0, 1.0, steps))
    stops = ", ".join(
        f"rgb({int(r * 255 + 0.5)},{int(g * 255 + 0.5)},{int(b * 255 + 0.5)}) "
        f"{100 * i / (steps - 1):.0f}%"
        for i, (r, g, b, _a) in enumerate(rgba)
    )
    return f"linear-gradient(to right, {stops})"


def colour_bar_css() -> str:
    return (
        f".cbar.heat {{ background: {colour_stops(HEAT_CMAP)}; }}\n"
        f".cbar.act {{ background: {colour_stops(ACTIVATION_CMAP)}; }}\n"
    )
