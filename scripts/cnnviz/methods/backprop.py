"""Input-gradient maps: saliency, SmoothGrad, Integrated Gradients, guided backprop, deconvnet.

Every map here is one or more runs of a gradient session: an ONNX Runtime session over
`cnnviz.autodiff.vjp(model, wrt=[input], policy=..., batch=B)`, whose inputs are the model input
and `seed:<logits>` and whose outputs include the logits and `grad:<input>`. The seed is a one-hot
row per image (the target class), so a batch of images with different targets is one run.
The session's batch B is fixed when the graph is built; longer batches run in chunks of B and a
short last chunk is padded with zero images and zero seeds (their gradient is dropped).

Definitions (captum's where both have the method; see the notes in `integrated_gradients`):

- saliency: |d logit_t / d x|, max over the colour channels -> [H, W] (captum Saliency, abs=True,
  followed by the channel max that captum's visualizer also uses).
- SmoothGrad (Smilkov et al. 2017): the mean of the *signed* gradient at n points x + N(0, s^2),
  s = noise_level * (max(x) - min(x)); the map is then max-abs over channels. captum's
  NoiseTunnel(Saliency(abs=True)) averages |gradient| instead (the absolute value before the mean).
- Integrated Gradients (Sundararajan et al. 2017): (x - x0) * integral of the gradient along the
  straight path from the baseline x0, by captum's quadrature rules with captum's default,
  "gausslegendre" (exact for paths along which the gradient is a polynomial of degree < 2n;
  captum's "riemann_trapezoid" weights sum to 1 - 1/n, so it under-counts by 1/n, kept as is).
- guided backprop / deconvnet: the input gradient of a session built with policy "guided" /
  "deconvnet" (ReLU and ReLU6 rules in cnnviz.autodiff.policies).

Saved maps (`.npy`, float32 [H, W] at model input resolution) are max |.| over the channels for
all five methods; the signed [3, H, W] arrays are what these functions return where the method is
signed (input_gradients, guided_backprop, deconvnet_map, integrated_gradients).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError

SEED_PREFIX = "seed:"
GRAD_PREFIX = "grad:"
IG_METHODS = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle",
              "gausslegendre")


# ---- sessions ------------------------------------------------------------------------------------
def gradient_model(model: onnx.ModelProto, policy: str = "gradient", batch: int = 1,
                   seed_output: str | None = None, fallback: str = "error") -> onnx.ModelProto:
    """The vjp graph of `model` w.r.t. its (first) input, seeded at the logits by default."""
    from ..autodiff import vjp

    wrt = model_input_name(model)
    seeds = [seed_output] if seed_output else None
    g = vjp(model, wrt=[wrt], seed_outputs=seeds, policy=policy, batch=batch, fallback=fallback)
    # A final Softmax is skipped by the seed: expose the seeded logits too (IG's completeness).
    outputs = {o.name for o in g.graph.output}
    for seed in g.graph.input:
        name = seed.name[len(SEED_PREFIX):]
        if seed.name.startswith(SEED_PREFIX) and name not in outputs:
            value = onnx.ValueInfoProto()
            value.CopyFrom(seed)
            value.name = name
            g.graph.output.append(value)
    return g


def gradient_session(model: onnx.ModelProto, policy: str = "gradient", batch: int = 1,
                     device: str = "auto", threads: int | None = None,
                     fallback: str = "error") -> ort.InferenceSession:
    """One session per job and policy; `batch` images (or noise samples, or path points) per run."""
    from ..runtime import make_session

    graph = gradient_model(model, policy, batch, fallback=fallback)
    return make_session(graph, device, threads)


def model_input_name(model: onnx.ModelProto) -> str:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not names:
        raise ConfigError(f"model {model.graph.name!r} has no graph input to differentiate")
    return names[0]


class _Names:
    """The roles of a gradient session's inputs and outputs, read from its names."""

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs = session.get_inputs()
        seeds = [i for i in inputs if i.name.startswith(SEED_PREFIX)]
        plain = [i for i in inputs if not i.name.startswith(SEED_PREFIX)]
        if len(seeds) != 1 or len(plain) != 1:
            raise ConfigError(
                "expected a gradient session with one model input and one 'seed:' input, got "
                f"{[i.name for i in inputs]}; build it with methods.backprop.gradient_session"
            )
        self.input = plain[0].name
        self.seed = seeds[0].name
        self.seeded = self.seed[len(SEED_PREFIX):]
        self.grad = GRAD_PREFIX + self.input
        outputs = [o.name for o in session.get_outputs()]
        if self.grad not in outputs:
            raise ConfigError(f"gradient session has no output {self.grad!r}: {outputs}")
        # The seeded tensor's value (the logits) when the graph exposes it, for IG's completeness.
        others = [o for o in outputs if not o.startswith(GRAD_PREFIX) and o != self.input]
        self.value = self.seeded if self.seeded in outputs else (others[0] if others else None)
        batch = plain[0].shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        self.seed_shape = [d if isinstance(d, int) else None for d in seeds[0].shape[1:]]


def gradients(
    session: ort.InferenceSession, x: np.ndarray, seeds: np.ndarray, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray | None]:
    """(d <seeds, f(x)> / dx [N, ...], f(x) [N, ...] or None) in runs of the session's batch."""
    names = _Names(session)
    x = np.ascontiguousarray(x, dtype=np.float32)
    seeds = np.ascontiguousarray(seeds, dtype=np.float32)
    n = len(x)
    chunk = names.batch or max(1, batch_size)
    wanted = [names.grad] + ([names.value] if names.value else [])
    grads, values = [], []
    for start in range(0, n, chunk):
        xs, ss = x[start : start + chunk], seeds[start : start + chunk]
        real = len(xs)
        if names.batch and real < chunk:  # pad the static batch; padded rows are dropped
            xs = np.concatenate([xs, np.zeros((chunk - real,) + xs.shape[1:], np.float32)])
            ss = np.concatenate([ss, np.zeros((chunk - real,) + ss.shape[1:], np.float32)])
        out = session.run(wanted, {names.input: xs, names.seed: ss})
        grads.append(out[0][:real])
        if names.value:
            values.append(out[1][:real])
    return np.concatenate(grads), (np.concatenate(values) if values else None)


def one_hot(targets: list[int] | np.ndarray, seed_shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """[N, *seed_shape] float32 with a 1 at each row's target (flat index over seed_shape)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    size = int(np.prod(seed_shape))
    if targets.size and (targets.min() < 0 or targets.max() >= size):
        raise ConfigError(f"target class out of range 0..{size - 1}: {targets.tolist()}")
    seeds = np.zeros((len(targets), size), np.float32)
    seeds[np.arange(len(targets)), targets] = 1.0
    return seeds.reshape((len(targets), *seed_shape))


def _seed_shape(session: ort.InferenceSession, logits_shape: Any) -> tuple[int, ...]:
    if logits_shape is not None:
        shape = tuple(int(d) for d in logits_shape)
        # Accept either the per-image shape ([K]) or the batched one ([N, K]).
        return shape[1:] if len(shape) > 1 else shape
    shape = _Names(session).seed_shape
    if any(d is None for d in shape):
        raise ConfigError(f"the seed input's shape {shape} is not static; pass logits_shape")
    return tuple(shape)


# ---- the methods ---------------------------------------------------------------------------------
def input_gradients(
    session: ort.InferenceSession,
    batch: np.ndarray,
    targets: list[int],
    logits_shape: Any = None,
) -> np.ndarray:
    """[N, 3, H, W]: d logit[target_i] / d x_i for each image, whatever the session's policy."""
    batch = np.asarray(batch, dtype=np.float32)
    if len(targets) != len(batch):
        raise ConfigError(f"{len(batch)} images but {len(targets)} targets")
    seeds = one_hot(targets, _seed_shape(session, logits_shape))
    return gradients(session, batch, seeds, batch_size=len(batch))[0]


def channel_max_abs(grad: np.ndarray) -> np.ndarray:
    """[..., C, H, W] -> [..., H, W]: max |value| over the channel axis (the saved .npy map)."""
    return np.abs(np.asarray(grad, dtype=np.float32)).max(axis=-3)


def saliency(session: ort.InferenceSession, batch: np.ndarray, targets: list[int]) -> np.ndarray:
    """[N, H, W]: max over channels of |gradient| (Simonyan et al. 2014; captum Saliency abs)."""
    return channel_max_abs(input_gradients(session, batch, targets))


def guided_backprop(
    session_guided: ort.InferenceSession, batch: np.ndarray, targets: list[int]
) -> np.ndarray:
    """[N, 3, H, W] signed guided-backprop gradients (session built with policy="guided")."""
    return input_gradients(session_guided, batch, targets)


def deconvnet_map(
    session_deconv: ort.InferenceSession, batch: np.ndarray, targets: list[int]
) -> np.ndarray:
    """[N, 3, H, W] signed deconvnet signals of the target logit (policy="deconvnet")."""
    return input_gradients(session_deconv, batch, targets)


def smoothgrad_gradient(
    session: ort.InferenceSession,
    image: np.ndarray,
    target: int,
    samples: int = 25,
    noise_level: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """[3, H, W]: the mean signed gradient over `samples` noisy copies of `image`."""
    if samples < 1 or noise_level < 0:
        raise ConfigError(f"smoothgrad needs samples >= 1 and noise_level >= 0, got "
                          f"{samples}, {noise_level}")
    x = np.asarray(image, dtype=np.float32)
    noisy = smoothgrad_inputs(x, samples, noise_level, seed)
    seeds = one_hot([target] * samples, _seed_shape(session, None))
    grads, _ = gradients(session, noisy, seeds, batch_size)
    return grads.mean(axis=0, dtype=np.float64).astype(np.float32)


def smoothgrad_inputs(x: np.ndarray, samples: int, noise_level: float, seed: int) -> np.ndarray:
    """The noisy points: x + N(0, sigma^2), sigma = noise_level * (max(x) - min(x)), seeded."""
    sigma = np.float32(noise_level * float(x.max() - x.min()))
    return x[None] + sigma * unit_noise(samples, x.shape, seed)


def unit_noise(samples: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """[samples, *shape] float32 standard normal noise: the same draws for every image of a job
    (each image scales them by its own sigma), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(size=(samples, *shape)).astype(np.float32)


def smoothgrad(
    session: ort.InferenceSession,
    image: np.ndarray,
    target: int,
    samples: int = 25,
    noise_level: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """[H, W]: max over channels of |mean gradient| at the noisy points (see module notes)."""
    return channel_max_abs(
        smoothgrad_gradient(session, image, target, samples, noise_level, seed, batch_size)
    )


def make_baseline(baseline: str | float | np.ndarray, image: np.ndarray,
                  pre: dict[str, Any] | None = None) -> np.ndarray:
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
        scale = float(pre.get("scale", 255.0))
        mean = np.asarray(pre.get("mean", [0.0] * 3), np.float32).reshape(-1, 1, 1)
        std = np.asarray(pre.get("std", [1.0] * 3), np.float32).reshape(-1, 1, 1)
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


def integrated_gradients(
    session: ort.InferenceSession,
    image: np.ndarray,
    target: int,
    steps: int = 50,
    baseline: str | float | np.ndarray = "zero",
    batch_size: int = 8,
    method: str = "gausslegendre",
    pre: dict[str, Any] | None = None,
) -> tuple[np.ndarray, float]:
    """([3, H, W] attributions, relative completeness error).

    attributions = (x - x0) * sum_i w_i * grad(x0 + a_i (x - x0)), with captum's weights w_i and
    alphas a_i for `method`. The completeness error is
    |sum(attributions) - (f(x) - f(x0))| / |f(x) - f(x0)| for the target logit f; f(x) and
    f(x0) come from the same runs (two extra path points where the rule lacks the end points).
    """
    x = np.asarray(image, dtype=np.float32)
    x0 = make_baseline(baseline, x, pre)
    weights, alphas = ig_rule(method, steps)
    ends = np.array([0.0, 1.0])
    points = np.concatenate([alphas, ends]).astype(np.float32)
    path = x0[None] + points.reshape(-1, 1, 1, 1) * (x - x0)[None]
    seeds = one_hot([target] * len(points), _seed_shape(session, None))
    grads, values = gradients(session, path, seeds, batch_size)
    total = np.tensordot(weights, grads[:steps].astype(np.float64), axes=1)
    attributions = ((x - x0).astype(np.float64) * total).astype(np.float32)
    if values is None:
        return attributions, float("nan")
    f = values.reshape(len(points), -1)[:, target].astype(np.float64)
    delta = f[-1] - f[-2]
    error = abs(float(attributions.astype(np.float64).sum()) - delta)
    return attributions, error / max(abs(delta), 1e-12)


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
def _inline_gradient(b, model: onnx.ModelProto, rows_x: str, targets: str, rows: int,
                     policy: str, fallback: str, prefix: str = "model") -> dict[str, str]:
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
    names["value"] = names[seed.name[len(SEED_PREFIX):]]
    names["seeds"] = seeds
    return names


def _image_inputs(b, model: onnx.ModelProto, images: int) -> tuple[str, str, list[int]]:
    from ..graph import fix_batch
    from ..methodgraph import FLOAT, INT64

    dims = [d.dim_value for d in
            fix_batch(model, 1).graph.input[0].type.tensor_type.shape.dim][1:]
    x = b.input("images", FLOAT, [images, *dims])
    t = b.input("targets", INT64, [images])
    return x, t, dims


def gradient_graph(model: onnx.ModelProto, policy: str, images: int,
                   fallback: str = "error"):  # noqa: ANN201 - MethodGraph
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


def smoothgrad_graph(model: onnx.ModelProto, images: int, points: int, noise_level: float,
                     fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """SmoothGrad as one graph. Per image x: the rows x + sigma * noise_p (sigma = noise_level *
    (max x - min x)) for the call's `points` noise samples; out: `signed` = sum_p weight_p *
    gradient at row p (weight 1/samples; 0 for a padded point), summed by the runner over calls.
    The unit noise [P, 3, H, W] is a per-point input, drawn once per job on the host (seeded)."""
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph, repeat_rows

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    noise = b.input("noise", FLOAT, [points, *dims])
    weights = b.input("weights", FLOAT, [points])
    span = b.op("Sub", [b.reduce("ReduceMax", x, [1, 2, 3], True),
                        b.reduce("ReduceMin", x, [1, 2, 3], True)])
    sigma = b.op("Mul", [span, b.f(noise_level)])  # [B, 1, 1, 1]
    one = [1] * len(dims)
    noisy = b.op("Add", [b.reshape(x, [images, 1, *dims]),
                         b.op("Mul", [b.reshape(sigma, [images, 1, *one]), noise])])
    rows = images * points
    names = _inline_gradient(b, model, b.reshape(noisy, [rows, *dims]),
                             repeat_rows(b, t, [images], points), rows, "gradient", fallback)
    grads = b.reshape(names["grad"], [images, points, *dims])
    weighted = b.op("Mul", [grads, b.reshape(weights, [1, points, *one])])
    b.output("signed", b.reduce("ReduceSum", weighted, [1]))
    return MethodGraph(b.build("smoothgrad"), images, points, point_inputs=("noise", "weights"),
                       summed=("signed",))


def integrated_gradients_graph(model: onnx.ModelProto, images: int, points: int,
                               fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """Integrated gradients as one graph. Per image x and path point p: the row
    x0 + alpha_p (x - x0); out: `signed` = (x - x0) * sum_p weight_p * gradient at row p (summed
    by the runner over calls) and `values` [B, P], the target logit at each row (for the
    completeness check: the end points are points with weight 0). The baseline x0 [1, 3, H, W]
    is fixed for the job; alphas and weights [P] are per-point inputs."""
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph, repeat_rows

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    x0 = b.input("baseline", FLOAT, [1, *dims])
    alphas = b.input("alphas", FLOAT, [points])
    weights = b.input("weights", FLOAT, [points])
    one = [1] * len(dims)
    delta = b.op("Sub", [x, x0])  # [B, 3, H, W]
    path = b.op("Add", [x0, b.op("Mul", [b.reshape(delta, [images, 1, *dims]),
                                         b.reshape(alphas, [1, points, *one])])])
    rows = images * points
    names = _inline_gradient(b, model, b.reshape(path, [rows, *dims]),
                             repeat_rows(b, t, [images], points), rows, "gradient", fallback)
    grads = b.reshape(names["grad"], [images, points, *dims])
    total = b.reduce("ReduceSum", b.op("Mul", [grads, b.reshape(weights, [1, points, *one])]),
                     [1])
    b.output("signed", b.op("Mul", [total, delta]))
    picked = b.reduce("ReduceSum", b.op("Mul", [b.reshape(names["value"], [rows, -1]),
                                                b.reshape(names["seeds"], [rows, -1])]), [1])
    b.output("values", b.reshape(picked, [images, points]))
    return MethodGraph(b.build("integrated_gradients"), images, points,
                       point_inputs=("alphas", "weights"), fixed_inputs=("baseline",),
                       summed=("signed",), per_point=("values",))
