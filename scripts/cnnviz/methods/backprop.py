"""Input-gradient maps: saliency, SmoothGrad, Integrated Gradients, guided backprop, deconvnet.

Every method is one graph (`gradient_graph`, `smoothgrad_graph`, `integrated_gradients_graph`,
run by the one runner, cnnviz.runner) around the engine's vjp of the model
(`gradient_model`: `cnnviz.autodiff.vjp(model, wrt=[input], policy=..., batch=B)`, inputs the
model input and `seed:<logits>`, outputs the logits and `grad:<input>`), inlined with its seed
made in the graph: a one-hot row per image and target, so images with different targets share a
call. The step-by-step definitions the graphs are tested against live in the tests
(tests/reference_methods.py).

Definitions (captum's where both have the method):

- saliency: |d logit_t / d x|, max over the colour channels -> [H, W] (captum Saliency, abs=True,
  followed by the channel max that captum's visualizer also uses).
- SmoothGrad (Smilkov et al. 2017): the mean of the *signed* gradient at n points x + N(0, s^2),
  s = noise_level * (max(x) - min(x)); the map is then max-abs over channels. captum's
  NoiseTunnel(Saliency(abs=True)) averages |gradient| instead (the absolute value before the mean).
- Integrated Gradients (Sundararajan et al. 2017): (x - x0) * integral of the gradient along the
  straight path from the baseline x0, by captum's quadrature rules with captum's default,
  "gausslegendre" (exact for paths along which the gradient is a polynomial of degree < 2n;
  captum's "riemann_trapezoid" weights sum to 1 - 1/n, so it under-counts by 1/n, kept as is).
- guided backprop / deconvnet: the input gradient under the backward policy "guided" /
  "deconvnet" (ReLU and ReLU6 rules in cnnviz.autodiff.policies).

Saved maps (float32 [H, W] at model input resolution) are max |.| over the channels for all five
methods; the graphs also return the signed [3, H, W] arrays (`signed`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError

SEED_PREFIX = "seed:"
GRAD_PREFIX = "grad:"
IG_METHODS = (
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "gausslegendre",
)


# ---- the gradient graph --------------------------------------------------------------------------
def gradient_model(
    model: onnx.ModelProto,
    policy: str = "gradient",
    batch: int = 1,
    seed_output: str | None = None,
    fallback: str = "error",
    node_rules: Any = None,
) -> onnx.ModelProto:
    """The vjp graph of `model` w.r.t. its (first) input, seeded at the logits by default
    (`node_rules`: the vjp's per-node rules, e.g. autodiff.reference.deeplift_rules)."""
    from ..autodiff import vjp

    wrt = model_input_name(model)
    seeds = [seed_output] if seed_output else None
    g = vjp(model, wrt=[wrt], seed_outputs=seeds, policy=policy, batch=batch, fallback=fallback,
            node_rules=node_rules)
    # A final Softmax is skipped by the seed: expose the seeded logits too (IG's completeness).
    outputs = {o.name for o in g.graph.output}
    for seed in g.graph.input:
        name = seed.name[len(SEED_PREFIX) :]
        if seed.name.startswith(SEED_PREFIX) and name not in outputs:
            value = onnx.ValueInfoProto()
            value.CopyFrom(seed)
            value.name = name
            g.graph.output.append(value)
    return g


def model_input_name(model: onnx.ModelProto) -> str:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not names:
        raise ConfigError(f"model {model.graph.name!r} has no graph input to differentiate")
    return names[0]


def channel_max_abs(grad: np.ndarray) -> np.ndarray:
    """[..., C, H, W] -> [..., H, W]: max |value| over the channel axis (the saved .npy map)."""
    return np.abs(np.asarray(grad, dtype=np.float32)).max(axis=-3)


def unit_noise(samples: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """[samples, *shape] float32 standard normal noise: the same draws for every image of a job
    (each image scales them by its own sigma), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(size=(samples, *shape)).astype(np.float32)


def make_baseline(
    baseline: str | float | np.ndarray, image: np.ndarray, pre: dict[str, Any] | None = None
) -> np.ndarray:
    """The IG baseline as a model input [3, H, W].

    "zero": all zeros, i.e. the dataset mean colour after (x - mean) / std normalization;
    "black" / "white": pixel 0 / 255 pushed through the model's preprocessing (needs `pre`,
    the model card's "preprocess"); a number: that constant; an array: used as is.
    """
    image = np.asarray(image, dtype=np.float32)
    if isinstance(baseline, np.ndarray):
        base = np.asarray(baseline, dtype=np.float32)
        if base.shape != image.shape:
            raise ConfigError(f"baseline shape {base.shape} differs from the image's {image.shape}")
        return base
    if isinstance(baseline, (int, float)):
        return np.full_like(image, float(baseline))
    if baseline == "zero":
        return np.zeros_like(image)
    if baseline in ("black", "white"):
        if pre is None:
            raise ConfigError(f"baseline {baseline!r} needs the model's preprocessing (pre=...)")
        pixel = 0.0 if baseline == "black" else 255.0
        from ..images import normalization

        scale, mean, std = normalization(pre)  # RGB order, as the model input
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        return np.broadcast_to((pixel / scale - mean) / std, image.shape).astype(np.float32)
    raise ConfigError(
        f"integrated gradients baseline {baseline!r}: use 'zero', 'black', 'white', a number or "
        "an array shaped like the input"
    )


def ig_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(step weights, alphas) of captum's quadrature rules, float64, weights summing to 1."""
    if method not in IG_METHODS:
        raise ConfigError(f"integrated gradients method {method!r}: use one of {IG_METHODS}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * weights, 0.5 * (1.0 + nodes)
    if steps < 2:
        raise ConfigError(f"integrated gradients with {method} needs steps >= 2, got {steps}")
    weights = np.full(steps, 1.0 / steps)
    kind = method.split("_")[1]
    if kind == "trapezoid":
        weights[[0, -1]] /= 2.0
        # captum divides by n, not n - 1: its trapezoid weights sum to 1 - 1/n. Kept, so the
        # two agree exactly; the completeness error then shows about 1/n.
        alphas = np.linspace(0.0, 1.0, steps)
    elif kind == "left":
        alphas = np.linspace(0.0, 1.0 - 1.0 / steps, steps)
    elif kind == "middle":
        alphas = np.linspace(1.0 / (2 * steps), 1.0 - 1.0 / (2 * steps), steps)
    else:
        alphas = np.linspace(1.0 / steps, 1.0, steps)
    return weights, alphas


# ---- pictures ------------------------------------------------------------------------------------
def signed_rgb(grad: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """[3, H, W] signed -> uint8 [H, W, 3] with grey = 0, scaled by a robust max |value|
    (render.signed_rgb: the render step draws pictures without importing the engine)."""
    from ..render import signed_rgb as draw

    return draw(grad, percentile)


def heat_picture(display: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A non-negative [H, W] map scaled to [0, 1] and overlaid on the display image."""
    from ..render import overlay
    from .common import normalize_map

    return overlay(display, normalize_map(heat), alpha=alpha)


# ---- whole methods as one graph (cnnviz.methodgraph; run by cnnviz.runner.Runner) -------------
def _inline_gradient(
    b,
    model: onnx.ModelProto,
    rows_x: str,
    targets: str,
    rows: int,
    policy: str,
    fallback: str,
    prefix: str = "model",
) -> dict[str, str]:
    """Inline the vjp of `model` at batch `rows` (input := rows_x, seed := one-hot of the rows'
    `targets`); returns the new names of its outputs, with "grad" and "value" (the seeded
    tensor, e.g. the logits) added."""
    from ..methodgraph import one_hot, seed_input, static_dims

    core = gradient_model(model, policy, rows, fallback=fallback)
    x = model_input_name(model)
    seed = seed_input(core)
    dims = static_dims(seed)[1:]
    seeds = one_hot(b, targets, int(np.prod(dims)), dims)
    weights = {t.name for t in model.graph.initializer}
    names = b.inline(core, {x: rows_x, seed.name: seeds}, prefix, shared=weights)
    names["grad"] = names[GRAD_PREFIX + x]
    names["value"] = names[seed.name[len(SEED_PREFIX) :]]
    names["seeds"] = seeds
    return names


def _image_inputs(b, model: onnx.ModelProto, images: int) -> tuple[str, str, list[int]]:
    from ..graph import fix_batch
    from ..methodgraph import FLOAT, INT64

    dims = [d.dim_value for d in fix_batch(model, 1).graph.input[0].type.tensor_type.shape.dim][1:]
    x = b.input("images", FLOAT, [images, *dims])
    t = b.input("targets", INT64, [images])
    return x, t, dims


def _point_gradients(
    b, model: onnx.ModelProto, rows_x: str, t: str, images: int, points: int, dims, fallback: str
) -> tuple[dict[str, str], str]:
    """Inline the plain gradient at the rows `rows_x` [images, points, *dims] (row (i, p): image
    i's point p, seeded at image i's target); (the inlined names, the gradients reshaped to
    [images, points, *dims])."""
    from ..methodgraph import repeat_rows

    rows = images * points
    names = _inline_gradient(
        b,
        model,
        b.reshape(rows_x, [rows, *dims]),
        repeat_rows(b, t, [images], points),
        rows,
        "gradient",
        fallback,
    )
    return names, b.reshape(names["grad"], [images, points, *dims])


def gradient_graph(model: onnx.ModelProto, policy: str, images: int, fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """Saliency / guided backprop / deconvnet as one graph: images [B, 3, H, W] and targets [B]
    in; `signed` (the input gradient of each target logit under `policy`) and `map` (its max
    |.| over the channels) out."""
    from ..methodgraph import GraphBuilder, MethodGraph, channel_max_abs

    b = GraphBuilder.for_model(model)
    x, t, _ = _image_inputs(b, model, images)
    names = _inline_gradient(b, model, x, t, images, policy, fallback)
    b.output("signed", names["grad"])
    b.output("map", channel_max_abs(b, names["grad"]))
    return MethodGraph(b.build(f"{policy}_gradient"), images)


def smoothgrad_graph(
    model: onnx.ModelProto, images: int, points: int, noise_level: float, fallback: str = "error"
):  # noqa: ANN201 - MethodGraph
    """SmoothGrad as one graph. Per image x: the rows x + sigma * noise_p (sigma = noise_level *
    (max x - min x)) for the call's `points` noise samples; out: `signed` = sum_p weight_p *
    gradient at row p (weight 1/samples; 0 for a padded point), summed by the runner over calls.
    The unit noise [P, 3, H, W] is a per-point input, drawn once per job on the host (seeded)."""
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    noise = b.input("noise", FLOAT, [points, *dims])
    weights = b.input("weights", FLOAT, [points])
    span = b.op(
        "Sub",
        [b.reduce("ReduceMax", x, [1, 2, 3], True), b.reduce("ReduceMin", x, [1, 2, 3], True)],
    )
    sigma = b.op("Mul", [span, b.f(noise_level)])  # [B, 1, 1, 1]
    one = [1] * len(dims)
    noisy = b.op(
        "Add",
        [
            b.reshape(x, [images, 1, *dims]),
            b.op("Mul", [b.reshape(sigma, [images, 1, *one]), noise]),
        ],
    )
    names, grads = _point_gradients(b, model, noisy, t, images, points, dims, fallback)
    weighted = b.op("Mul", [grads, b.reshape(weights, [1, points, *one])])
    b.output("signed", b.reduce("ReduceSum", weighted, [1]))
    return MethodGraph(
        b.build("smoothgrad"), images, points, point_inputs=("noise", "weights"), summed=("signed",)
    )


def integrated_gradients_graph(
    model: onnx.ModelProto, images: int, points: int, fallback: str = "error"
):  # noqa: ANN201 - MethodGraph
    """Integrated gradients as one graph. Per image x and path point p: the row
    x0 + alpha_p (x - x0); out: `signed` = (x - x0) * sum_p weight_p * gradient at row p (summed
    by the runner over calls) and `values` [B, P], the target logit at each row (for the
    completeness check: the end points are points with weight 0). The baseline x0 [1, 3, H, W]
    is fixed for the job; alphas and weights [P] are per-point inputs."""
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    x0 = b.input("baseline", FLOAT, [1, *dims])
    alphas = b.input("alphas", FLOAT, [points])
    weights = b.input("weights", FLOAT, [points])
    one = [1] * len(dims)
    delta = b.op("Sub", [x, x0])  # [B, 3, H, W]
    path = b.op(
        "Add",
        [
            x0,
            b.op(
                "Mul", [b.reshape(delta, [images, 1, *dims]), b.reshape(alphas, [1, points, *one])]
            ),
        ],
    )
    names, grads = _point_gradients(b, model, path, t, images, points, dims, fallback)
    total = b.reduce("ReduceSum", b.op("Mul", [grads, b.reshape(weights, [1, points, *one])]), [1])
    b.output("signed", b.op("Mul", [total, delta]))
    rows = images * points
    picked = b.reduce(
        "ReduceSum",
        b.op("Mul", [b.reshape(names["value"], [rows, -1]), b.reshape(names["seeds"], [rows, -1])]),
        [1],
    )
    b.output("values", b.reshape(picked, [images, points]))
    return MethodGraph(
        b.build("integrated_gradients"),
        images,
        points,
        point_inputs=("alphas", "weights"),
        fixed_inputs=("baseline",),
        summed=("signed",),
        per_point=("values",),
    )
