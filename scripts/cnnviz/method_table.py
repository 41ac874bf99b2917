"""Which per-image method needs what, in one place (stdlib only: the Snakefile imports it on
every parse). The code of each method is in cnnviz.methods.explain.METHODS; the workflow routes
options and groups jobs from these sets, explain computes families together from them.
"""

from __future__ import annotations

# Members of one family come from one run of one graph, in one job per shard.
CAM_FAMILY = ("gradcam", "gradcampp", "layercam", "hirescam", "xgradcam", "guided_gradcam")
# Methods that read `methods.cam_layer`.
CAM_LAYER_METHODS = frozenset({*CAM_FAMILY, "scorecam"})
# Forward passes only: no gradient, so `gradient_fallback` does not change their maps.
GRADIENT_FREE = frozenset({"scorecam", "occlusion"})
# Methods with their own section under `methods:` in the config.
OWN_OPTIONS = frozenset({"scorecam", "smoothgrad", "integrated_gradients", "occlusion",
                         "projections"})


def method_options(methods_config: dict, gradient_fallback: str, method: str) -> dict:
    """Only the options that change `method`'s maps (editing one reruns that method alone)."""
    options = {"target": methods_config["target"]}
    if method not in GRADIENT_FREE:
        options["gradient_fallback"] = gradient_fallback
    if method in CAM_LAYER_METHODS:
        options["cam_layer"] = methods_config["cam_layer"]
    if method in OWN_OPTIONS:
        options.update(methods_config[method])
    return options
