"""Every per-image method, declared once.

A method is one entry of `METHODS`: its name, caption, the function computing its raw maps
(imported only when a job runs it), the family it is computed with, what it needs (a cut
layer, the engine's backward) and its options with their defaults. Everything else is derived
from here: the explain step's dispatch and option defaults, the workflow's option routing and
job grouping, the report's method order and captions, and the config schema's `methods:`
block (written by `python3 -m cnnviz.registry --write-schema`; tests/test_registry.py fails
when the schema, config/config.yaml, config/README.md or README.md disagree with it).

Adding a method: one function `run(job) -> Iterator[Result]` in its own module under
cnnviz/methods, one `Method(...)` entry below, `--write-schema`, and its tests.

Stdlib only: the Snakefile imports this module on every parse.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    """One setting of a method (`methods.<method>.<name>` in the config)."""

    default: Any
    description: str
    schema: Mapping[str, Any]  # JSON-schema constraints (type, minimum, enum, ...)


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # the report's name for it
    what: str  # what the map shows, one clause (captions)
    run: str  # "module:function" computing the maps (see cnnviz.methods.explain.Result)
    family: str | None = None  # members of one family come from one run (see FAMILIES)
    gradient: bool = True  # runs the engine's backward: `gradient_fallback` changes its maps
    cam_layer: bool = False  # reads `methods.cam_layer`
    options: Mapping[str, Option] = field(default_factory=dict)
    reading: str = "heat"  # how to read the picture; "heat" = captions.HEAT_READING
    scored: bool = True  # per-image maps the metrics can score (projections are not)


def _int(default: int, description: str, minimum: int | None = None) -> Option:
    schema: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    return Option(default, description, schema)


def _choice(default: str, description: str, *values: str) -> Option:
    return Option(default, description, {"enum": list(values)})


SIGNED_READING = (
    "grey = no effect; colours show the sign of the gradient per RGB channel (brighter = "
    "positive, darker = negative)"
)
# Signed attributions (relevance, DeepLIFT, input x gradient): rows marked "picture": "relevance"
# are drawn by render.relevance_picture.
RELEVANCE_READING = (
    "red = evidence for the class, blue = against it, white = none (scaled to this map's "
    "largest magnitude, over a grey copy of the image)"
)
_CAM = "cnnviz.methods.explain:cam_family"

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("gradcam", "Grad-CAM", "the layer's channels weighted by their mean gradient for "
           "the class", _CAM, family="cam", cam_layer=True),
    Method("gradcampp", "Grad-CAM++", "Grad-CAM with weights from higher-order gradient terms "
           "(better with several objects)", _CAM, family="cam", cam_layer=True),
    Method("layercam", "LayerCAM", "positive gradient times activation, position by position "
           "(finer detail than Grad-CAM)", _CAM, family="cam", cam_layer=True),
    Method("hirescam", "HiResCAM", "gradient times activation, position by position, summed "
           "over the channels (Grad-CAM without averaging the gradient over the map)", _CAM,
           family="cam", cam_layer=True),
    Method("xgradcam", "XGrad-CAM", "the layer's channels weighted by their gradient averaged "
           "with the activation as weight (Axiom-based Grad-CAM)", _CAM, family="cam",
           cam_layer=True),
    Method("eigencam", "Eigen-CAM", "the layer's activations projected on their first "
           "principal component (no gradients and no class: the same map for every target)",
           "cnnviz.methods.gradient_free:run_eigencam", gradient=False, cam_layer=True),
    Method("ablationcam", "Ablation-CAM", "each channel weighted by how much the class score "
           "drops when the channel is zeroed (no gradients)",
           "cnnviz.methods.gradient_free:run_ablationcam", gradient=False, cam_layer=True,
           options={"batch_size": _int(64, "ablated copies of the layer's maps run through the "
                                  "rest of the network per call", 1)}),
    Method("scorecam", "Score-CAM", "each channel weighted by how much the class score rises "
           "when the image is masked by it (no gradients)", "cnnviz.methods.explain:scorecam",
           gradient=False, cam_layer=True,
           options={"batch_size": _int(64, "masked images per ONNX Runtime call", 1)}),
    Method("layercam_fusion", "LayerCAM, fused", "LayerCAM at several depths, shallow to "
           "deep, each scaled and fused into one map (fine detail from the shallow layers)",
           "cnnviz.methods.layercam_fusion:run_layercam_fusion", options={
               "layers": Option("auto", "auto (the last layer of each resolution stage, the "
                                "deepest `stages` of them) or comma-separated layer names "
                                "(or tensor names), shallow to deep", {"type": "string"}),
               "stages": _int(4, "with layers: auto, how many resolution stages give a layer",
                              1),
               "fusion": _choice("mean", "mean of the scaled layer maps (pytorch-grad-cam) or "
                                 "the maximum of tanh(2 map) (the paper, TorchCAM)", "mean",
                                 "max"),
           }),
    Method("fullgrad", "FullGrad", "the input gradient times the input plus, for every layer "
           "with a bias, its gradient times the bias, each scaled and summed (Srinivas & "
           "Fleuret)", "cnnviz.methods.fullgrad:run_fullgrad", options={
               "normalization": _choice("channel", "where each term is min-max scaled before "
                                        "the sum: per channel (pytorch-grad-cam's FullGrad) or "
                                        "per layer (the authors' code)", "channel", "layer"),
           }),
    Method("guided_gradcam", "Guided Grad-CAM", "guided backpropagation multiplied by "
           "Grad-CAM: pixel detail inside the class region", _CAM, family="cam",
           cam_layer=True),
    Method("saliency", "Saliency", "|d class score / d pixel|, the largest over R, G, B",
           "cnnviz.methods.explain:saliency"),
    Method("smoothgrad", "SmoothGrad", "the gradient averaged over noisy copies of the image "
           "(less speckle than saliency)", "cnnviz.methods.explain:smoothgrad", options={
               "samples": _int(25, "noisy copies", 1),
               "noise_level": Option(0.15, "noise sigma as a fraction of the input's range",
                                     {"type": "number", "exclusiveMinimum": 0}),
               "seed": _int(0, "RNG seed"),
           }),
    Method("integrated_gradients", "Integrated Gradients", "gradients summed along a path "
           "from a blank baseline to the image; they add up to the score change",
           "cnnviz.methods.explain:integrated_gradients", options={
               "steps": _int(50, "path points", 2),
               "baseline": _choice("zero", "zero (the mean image after normalization), black "
                                   "or white", "zero", "black", "white"),
           }),
    Method("input_x_gradient", "Input × Gradient", "each pixel's value times the class "
           "score's gradient there: its first-order share of the score",
           "cnnviz.methods.attribution:run_input_x_gradient", reading=RELEVANCE_READING),
    Method("deeplift", "DeepLIFT", "each pixel's share of the change in class score from the "
           "baseline to the image (rescale rule, Shrikumar et al.); the shares add up to it",
           "cnnviz.methods.attribution:run_deeplift", reading=RELEVANCE_READING, options={
               "baseline": _choice("zero", "the reference input: zero (the mean image after "
                                   "normalization), black or white", "zero", "black",
                                   "white"),
           }),
    Method("lrp", "LRP", "layer-wise relevance propagation (Bach et al.): the class score "
           "passed back layer by layer by the composite's rule per layer; the relevance adds "
           "up to the score, less what the layers' biases absorb",
           "cnnviz.methods.lrp:run_lrp", reading=RELEVANCE_READING, options={
               "composite": _choice("epsilon_plus_flat", "which rule at which layer (zennit's "
                                    "composites): epsilon_plus_flat = flat at the first layer, "
                                    "z+ at convolutions, epsilon at dense layers; "
                                    "epsilon_gamma_box = z-box (the pixel range) first, gamma "
                                    "at convolutions, epsilon at dense layers; see "
                                    "config/README.md for the others",
                                    "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus",
                                    "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat",
                                    "epsilon_plus_wsquare", "epsilon", "zplus", "alpha_beta",
                                    "gamma"),
               "epsilon": Option(1e-6, "the epsilon rule's stabilizer (larger absorbs weak or "
                                 "contradictory relevance, e.g. 0.25)",
                                 {"type": "number", "minimum": 0}),
               "gamma": Option(0.25, "the gamma rule's weight of positive contributions",
                               {"type": "number", "minimum": 0}),
           }),
    Method("guided_backprop", "Guided backprop", "the gradient with negative signals stopped "
           "at every ReLU, both ways: the edges that support the class",
           "cnnviz.methods.explain:guided_backprop"),
    Method("deconvnet", "Deconvnet", "Zeiler & Fergus's deconvnet: the class signal projected "
           "back through rectified unpooling", "cnnviz.methods.explain:deconvnet"),
    Method("occlusion", "Occlusion", "the drop in class probability when a grey window covers "
           "each place (bright = covering it hurts the class most)",
           "cnnviz.methods.explain:occlusion", gradient=False, options={
               "window": _int(32, "grey patch size, in model input pixels", 1),
               "stride": _int(16, "step between patches, in model input pixels", 1),
           }),
    Method("rise", "RISE", "the class score under random masks of the image, averaged with "
           "each mask as its weight (Petsiuk et al.; no gradients)",
           "cnnviz.methods.gradient_free:run_rise", gradient=False, options={
               "masks": _int(2000, "random masks N (the paper used 4000 for ResNet-50; with "
                             "the coverage estimator 2000 give the same map at Pearson 0.97 "
                             "across mask sets on EfficientNet-Lite0)", 1),
               "grid": _int(7, "cells per side of the random binary grid (the paper's 7)", 1),
               "p": Option(0.5, "probability that a grid cell keeps the image (the paper's "
                           "0.5)", {"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
               "estimator": _choice("coverage", "coverage: sum_i P_i M_i / sum_i M_i, the "
                                    "mean score of the masks that keep each pixel; paper: "
                                    "sum_i P_i M_i / (N p). Equal in expectation; coverage is "
                                    "far less noisy (Lite0, 2000 masks: two mask sets' maps "
                                    "correlate 0.97 against 0.25)", "coverage", "paper"),
               "seed": _int(0, "seed of the grids and shifts (the same masks for every "
                            "image)", 0),
               "batch_size": _int(32, "masked images scored per ONNX Runtime call", 1),
           }),
    Method("projections", "Projections", "the strongest units of a layer projected back to "
           "pixels (left) beside the image patch they see (right)",
           "cnnviz.methods.explain:projections", reading="left: " + SIGNED_READING,
           scored=False, options={
               "layers": Option("auto", "layers to project from; auto = three layers spread "
                                "over the depth", {"oneOf": [
                                    {"const": "auto"},
                                    {"type": "array", "minItems": 1,
                                     "items": {"type": "string"}}]}),
               "top_k": _int(4, "strongest channels per layer", 1),
               "policy": _choice("auto", "the backward rule: auto = deconvnet where max "
                                 "pooling lies below the layer, guided backprop elsewhere "
                                 "(a deconvnet projection without switches is the same for "
                                 "every image)", "auto", "deconvnet", "guided", "gradient"),
           }),
]}  # fmt: skip

# A family's members are computed by one function from one graph: {family: "module:function"},
# called with (job, members) and returning {member: results}.
FAMILIES: dict[str, str] = {"cam": _CAM}


def family_members(family: str) -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.family == family)


CAM_FAMILY = family_members("cam")
SCORED = tuple(m.name for m in METHODS.values() if m.scored)


def defaults(method: str) -> dict[str, Any]:
    """The method's own options at their defaults."""
    return {name: option.default for name, option in METHODS[method].options.items()}


# Options every method of a kind shares (`methods.target`, `methods.cam_layer`).
TARGET_DEFAULT, CAM_LAYER_DEFAULT = "top1", "auto"


def with_defaults(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` (a job's options) with the method's own options, and the shared ones it reads,
    filled in where absent."""
    shared = {"target": TARGET_DEFAULT}
    if METHODS[method].cam_layer:
        shared["cam_layer"] = CAM_LAYER_DEFAULT
    return {**shared, **defaults(method), **given}


def method_options(methods_config: Mapping[str, Any], gradient_fallback: str,
                   method: str) -> dict[str, Any]:
    """Only the options that change `method`'s maps (editing one reruns that method alone)."""
    spec = METHODS[method]
    options: dict[str, Any] = {"target": methods_config["target"]}
    if spec.gradient:
        options["gradient_fallback"] = gradient_fallback
    if spec.cam_layer:
        options["cam_layer"] = methods_config["cam_layer"]
    if spec.options:
        options.update(with_defaults(method, methods_config.get(method) or {}))
    return options


def resolve(path: str) -> Callable[..., Any]:
    """The function named "module:function" (imported on first use: numpy, onnx)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- the config schema's `methods:` block ---------------------------------------------------
def methods_schema() -> dict[str, Any]:
    """The JSON schema of the config's `methods:` section."""
    names = list(METHODS)
    properties: dict[str, Any] = {
        "enabled": {"type": "array", "uniqueItems": True,
                    "items": {"$ref": "#/$defs/method"}, "default": names},
        "target": {
            "description": "Classes to explain: top1, {top_k: k}, or a list of class indices "
                           "or labels.",
            "default": TARGET_DEFAULT,
            "oneOf": [
                {"const": "top1"},
                {"type": "object", "additionalProperties": False, "required": ["top_k"],
                 "properties": {"top_k": {"type": "integer", "minimum": 1}}},
                {"type": "array", "minItems": 1, "items": {"oneOf": [
                    {"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}},
            ],
        },
        "cam_layer": {"description": "Layer for the CAM family; auto = the last conv layer "
                      "with a spatial output.", "type": "string", "default": CAM_LAYER_DEFAULT},
    }  # fmt: skip
    for method in METHODS.values():
        if method.options:
            properties[method.name] = {
                "type": "object", "additionalProperties": False, "default": {},
                "properties": {
                    name: {**option.schema, "default": option.default,
                           "description": option.description}
                    for name, option in method.options.items()
                },
            }  # fmt: skip
    return {"type": "object", "additionalProperties": False, "default": {},
            "description": "Per-image explanations; one job per model, shard and method "
                           "(a family's members share one).",
            "properties": properties}  # fmt: skip


def method_defs() -> dict[str, Any]:
    """`$defs` of the schema: a method name, and a method the metrics can score."""
    return {"method": {"enum": list(METHODS)}, "scored_method": {"enum": list(SCORED)}}


# Generated blocks of the schema file: {key: (indent, content)}. The rest is written by hand;
# it refers to the method names as {"$ref": "#/$defs/method"} (or scored_method).
def _blocks() -> dict[str, tuple[int, dict[str, Any]]]:
    return {"$defs": (0, method_defs()), "methods": (2, methods_schema())}


def _marks(key: str, indent: int) -> tuple[str, str]:
    pad = " " * indent
    return (f"{pad}# >>> {key}: generated by cnnviz.registry (--write-schema)\n",
            f"{pad}# <<< {key}\n")


def schema_block(key: str) -> str:
    """The schema file's generated lines for `key` (JSON is YAML), between their marks."""
    indent, content = _blocks()[key]
    begin, end = _marks(key, indent)
    body = _flow(content, indent + 2)
    return begin + " " * indent + f"{key}:\n" + " " * (indent + 2) + body + "\n" + end


def _flow(value: Any, indent: int) -> str:
    """JSON (so YAML) with one key per line, and small values (lists of names, short
    objects) on one line."""
    # YAML 1.1 (PyYAML) reads 1e-06 as a string: write exponents with a mantissa dot
    flat = re.sub(r"(?<![\w.])(-?\d+)e([-+]?\d+)", r"\1.0e\2", json.dumps(value))
    if not isinstance(value, dict) or len(flat) + indent <= 96:
        return flat
    pad = " " * (indent + 2)
    items = [f"{pad}{json.dumps(k)}: {_flow(v, indent + 2)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def write_schema(path: Path) -> bool:
    """Replace the generated blocks of the schema file at `path`; True when it changed."""
    text = original = path.read_text(encoding="utf-8")
    for key, (indent, _) in _blocks().items():
        begin, end = _marks(key, indent)
        head, found, rest = text.partition(begin)
        if not found or end not in rest:
            raise SystemExit(f"{path}: no block marked {begin.strip()!r} ... {end.strip()!r}")
        text = head + schema_block(key) + rest.split(end, 1)[1]
    if text != original:
        path.write_text(text, encoding="utf-8")
    return text != original


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-schema", action="store_true",
                        help="rewrite workflow/schemas/config.schema.yaml's methods block")
    args = parser.parse_args(argv)
    schema = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
    if args.write_schema:
        print(f"{schema}: {'rewritten' if write_schema(schema) else 'up to date'}")
    else:
        for method in METHODS.values():
            print(f"{method.name:22} {method.title}: {method.what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
