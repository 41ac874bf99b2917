"""Filter visualization by activation maximization: the input that makes one channel fire.

Two modes, one driver:
- ``seed``: the seed tutorial's (Chollet's) gradient ascent. A grey image plus small noise,
  loss = the channel's mean, step = lr * g / (rms(g) + 1e-5) on the image itself, then
  Chollet's deprocess (centre, std 0.1, clip) to show it.
- ``lucent`` (default): lucent's recipe. The image is a scaled Fourier spectrum in a decorrelated
  colour space, squashed by a sigmoid; every step sees it padded, jittered, scaled, rotated and
  jittered again (one random draw per filter), resized to the model's input and normalized;
  Adam (lr 0.05) ascends the channel's mean.

What is maximized: the spatial mean of one channel of the layer's tensor; for a ReLU6 layer
(bounded above) of the conv's response just before the activation (`objective_tensor`). A
filter that is dead on its start image (Relu/Clip output zero everywhere) would get a zero
gradient: for the first 16 steps, and while it stays dead, the gradient of its pre-activation
is added (lucid's redirected ReLU, at the objective's own activation only).

A whole optimization step is one ONNX graph (`optvis_graph`, engine "graph", the default):
parameterization, the step's random transforms (drawn on the host once for all steps, picked
in-graph by the step index), resize and normalization, the model cut at the layer (nothing after
the layer is computed), the objective, the backward of all of it (`cnnviz.autodiff.vjp`) and the
Adam / normalized-step update. The objective is `objectives.channel(tensor, c)` per item, one
case of the objective algebra: `objective_job.ObjectiveJob` builds and runs it (until 2026-12 a
`GraphJob` here wrote the channel seed by hand; the objective's graph gave bit-identical
pictures, curves and finals, so it went). It runs with ONNX Runtime I/O binding: the state
(parameters, Adam's m and v, the step index, the curves) stays on the device between steps and
is read back once, at the end. Engine "numpy" is the earlier host loop (the model's gradient from
`LayerObjective`, the rest in numpy, `optvis`), kept as the reference the graph is tested
against and for models below opset 16 (the resampling's adjoint needs ScatterElements' add).
All filters of a chunk are one batch: item i's seed selects its own channel, so a chunk of 16
filters costs one batched forward + backward per step. Every filter draws its start and its
transforms from its own stream, seeded by (seed, channel), so a filter's picture does not depend
on the batch it ran in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph import cut_at
from . import optvis as ov

if TYPE_CHECKING:
    from .objectives import Objective

MODES = ("lucent", "seed")
LUCENT_LR = 0.05  # Adam's learning rate (lucent's default)
SEED_STEP = 1.0 / 255.0  # Chollet's step: one grey level per step, in [0, 1] image units
SEED_NOISE = 10.0 / 255.0  # the grey start's noise amplitude (Chollet: 128 + U(0, 20))
PARAM_SIZE = 128  # lucent param.image(128), resized to the model's input size
MAX_TILE = 128  # grid tiles are at most this many pixels wide
REDIRECTED = ("Relu", "Clip")  # activations whose zero-gradient region can trap a filter
REDIRECT_STEPS = 16  # lucid redirects ReLU gradients for its first 16 steps
OBJECTIVES = ("auto", "activation", "filter")
ENGINES = ("graph", "numpy")
GRAPH_OPSET = 16  # the step graph's resampling adjoint is a ScatterElements(add), opset 16+


@dataclass
class FilterResult:
    """What an optimization produced, one row per filter (in `channels` order)."""

    channels: list[int]
    images: np.ndarray  # [K, H, W, 3] float32 in [0, 1]: what to show
    raw: np.ndarray  # [K, H, W, 3] the optimized image itself (seed mode: before deprocess)
    curves: np.ndarray  # [K, steps] the channel mean seen at each step (before its update)
    start_image: np.ndarray  # [K] the channel mean on the starting image, untransformed
    final: np.ndarray  # [K] the channel mean on the final image, untransformed
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class LayerObjective:
    """One ONNX Runtime session: per batch item i, mean(A_i[c_i]) and its gradient wrt the input.

    The model is cut at `tensor` (the layer becomes the only output), so the gradient graph
    computes nothing after the layer. The batch is fixed; shorter batches are padded.

    When `tensor` is the output of a Relu or Clip, its input (the pre-activation) is seeded too:
    a filter that is zero everywhere on its start image has a zero gradient and would never
    move. For items marked `redirect`, the gradient of the pre-activation's channel mean is
    added (lucid's redirected ReLU gradient, applied at the objective's own activation).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        tensor: str,
        batch: int,
        device: str = "auto",
        threads: int | None = None,
    ):
        from ..autodiff import vjp
        from ..graph import input_name
        from ..runtime import make_session

        self.tensor = tensor
        self.batch = batch
        self.input = input_name(model)
        self.pre = pre_activation(model, tensor)
        seeds = [tensor] + ([self.pre] if self.pre else [])
        self.graph = vjp(cut_at(model, [tensor]), wrt=[self.input], seed_outputs=seeds,
                         batch=batch)
        self.session = make_session(self.graph, device, threads)
        feeds = {i.name: i.shape for i in self.session.get_inputs()}
        self.layer_shape = tuple(int(d) for d in feeds[f"seed:{tensor}"][1:])
        self.input_shape = tuple(int(d) for d in feeds[self.input][1:])
        self.providers = self.session.get_providers()

    def __call__(
        self,
        x: np.ndarray,
        channels: Sequence[int],
        need_grad: bool = True,
        redirect: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(values [n], grad [n, C, H, W] or None) for n <= batch inputs and their channels."""
        n = len(channels)
        feed = np.zeros((self.batch, *self.input_shape), dtype=np.float32)
        feed[:n] = x
        seed = np.zeros((self.batch, *self.layer_shape), dtype=np.float32)
        spatial = float(np.prod(self.layer_shape[1:]))
        for i, c in enumerate(channels):
            seed[i, c] = 1.0 / spatial
        feeds = {self.input: feed, f"seed:{self.tensor}": seed}
        if self.pre:
            pre_seed = np.zeros_like(seed)
            for i, c in enumerate(channels):
                if redirect is not None and redirect[i]:
                    pre_seed[i, c] = 1.0 / spatial
            feeds[f"seed:{self.pre}"] = pre_seed
        names = [self.tensor, f"grad:{self.input}"] if need_grad else [self.tensor]
        out = self.session.run(names, feeds)
        act = out[0]
        values = np.array([act[i, c].mean() for i, c in enumerate(channels)], dtype=np.float64)
        return values, (out[1][:n] if need_grad else None)


def objective_tensor(model: onnx.ModelProto, tensor: str, objective: str = "auto") -> str:
    """The tensor whose channel means are maximized for the layer tensor `tensor`.

    "activation": `tensor` itself. "filter": the conv filter's response before the layer's
    Relu/Clip (the activation's input; `tensor` when there is none). "auto": "filter" when the
    activation is bounded above (ReLU6: a channel mean cannot pass 6, and once most positions
    sit at 6 the gradient vanishes and stops shaping the picture; lucid likewise visualizes
    `*_pre_relu` tensors), else "activation".
    """
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"filter objective {objective!r} is not one of {', '.join(OBJECTIVES)}"
        )
    if objective == "activation":
        return tensor
    pre = pre_activation(model, tensor)
    if pre is None:
        return tensor
    if objective == "filter" or _bounded_above(model, tensor):
        return pre
    return tensor


def _bounded_above(model: onnx.ModelProto, tensor: str) -> bool:
    """True when `tensor` is made by a Clip with a finite upper bound."""
    node = next((n for n in model.graph.node if tensor in n.output), None)
    if node is None or node.op_type != "Clip":
        return False
    if len(node.input) < 3 or not node.input[2]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return "max" in attrs and np.isfinite(attrs["max"])
    bound = node.input[2]
    for init in model.graph.initializer:
        if init.name == bound:
            return bool(np.all(np.isfinite(onnx.numpy_helper.to_array(init))))
    for const in model.graph.node:
        if const.op_type == "Constant" and bound in const.output:
            attr = const.attribute[0]
            if attr.name != "value":
                return True
            return bool(np.all(np.isfinite(onnx.numpy_helper.to_array(attr.t))))
    return True  # a computed bound: assume finite (ReLU6-like)


def pre_activation(model: onnx.ModelProto, tensor: str) -> str | None:
    """The input of the Relu/Clip producing `tensor`, or None (no dead zone to redirect)."""
    for node in model.graph.node:
        if tensor in node.output:
            return node.input[0] if node.op_type in REDIRECTED else None
    return None


def filter_rng(seed: int, channel: int) -> np.random.Generator:
    """The random stream of one filter: its start and every transform it sees."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(channel)]))


def chunks(items: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split into the fewest chunks of at most batch_size, as even as possible."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    count = math.ceil(len(items) / batch_size)
    size = math.ceil(len(items) / max(count, 1))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def optimize_filters(
    model: onnx.ModelProto,
    tensor: str,
    channels: Sequence[int],
    *,
    mode: str = "lucent",
    steps: int = 256,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    preprocess: dict | None = None,
    param_size: int = PARAM_SIZE,
    norm_bound: float | None = None,
    device: str = "auto",
    threads: int | None = None,
    engine: str = "graph",
    objective_for: Callable[[int], Objective] | None = None,
) -> FilterResult:
    """Maximize the spatial mean of each channel in `channels` of `tensor`, or with
    `objective_for`, the objective it gives for each channel (tensor names; graph engine only).

    `lr`: Adam's learning rate (lucent; default 0.05) or the normalized step (seed; default
    1/255, one grey level). `preprocess`: model.json's preprocess (mean, std, scale); identity
    when None. `norm_bound` (seed mode): project each image onto the L2 ball of that radius
    after every step. Returns images in [0, 1]: lucent's parameterized image at param_size
    (capped at the input size), or the deprocessed input-size image in seed mode.
    `engine`: "graph" (each step one ONNX Runtime run, state on the device) or "numpy" (the
    host loop); "graph" falls back to "numpy" for models below opset 16 (info["engine"]).
    """
    if mode not in MODES:
        raise ConfigError(f"filter visualization mode {mode!r} is not one of {', '.join(MODES)}")
    if steps < 1:
        raise ConfigError(f"filter visualization needs steps >= 1, got {steps}")
    channels = [int(c) for c in channels]
    if not channels:
        raise ConfigError("filter visualization needs at least one filter")
    if engine not in ENGINES:
        raise ConfigError(f"filter engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "graph" and model_opset(model) < GRAPH_OPSET:
        engine = "numpy"
    custom = objective_for is not None
    if objective_for is None:
        from .objectives import channel

        def objective_for(c: int) -> Objective:
            return channel(tensor, c)
    norm = ov.Normalization.from_preprocess(preprocess or {})
    groups = chunks(channels, batch_size)
    step = lr if lr is not None else (LUCENT_LR if mode == "lucent" else SEED_STEP)
    started = time.perf_counter()
    objective = None
    if engine == "graph":
        try:
            from .objective_job import ObjectiveJob

            objective = ObjectiveJob(model, [objective_for(channels[0])], len(groups[0]),
                                     mode=mode, steps=steps, lr=step, norm=norm,
                                     param_size=param_size, norm_bound=norm_bound,
                                     device=device, threads=threads)
            objective.per_filter = objective_for
        except NotAGraphCase:
            engine = "numpy"
    if objective is None:
        if custom:
            raise ConfigError(
                f"the objective {objective_for(channels[0]).text()!r} needs the graph engine "
                f"(opset >= {GRAPH_OPSET}, a [C, H, W] layer); only channel(layer, c) runs "
                "on the numpy engine"
            )
        objective = LayerObjective(model, tensor, len(groups[0]), device, threads)
    setup = time.perf_counter() - started
    n_channels = objective.layer_shape[0]
    bad = [c for c in channels if not 0 <= c < n_channels]
    if bad:
        raise ConfigError(
            f"layer tensor {tensor!r} has {n_channels} channels; filters {bad} do not exist"
        )
    run = (type(objective).run if engine == "graph"
           else _run_lucent if mode == "lucent" else _run_seed)
    parts = [
        run(objective, group, steps, step, seed, norm, param_size, norm_bound)
        for group in groups
    ]
    raw, curves, start, final = (np.concatenate(p) for p in zip(*parts, strict=True))
    images = ov.deprocess(raw) if mode == "seed" else raw
    return FilterResult(
        channels=channels,
        images=images.astype(np.float32),
        raw=raw.astype(np.float32),
        curves=curves,
        start_image=start,
        final=final,
        seconds=time.perf_counter() - started,
        info={"providers": objective.providers, "batch": objective.batch, "lr": step,
              "input_shape": list(objective.input_shape), "setup_seconds": setup,
              "engine": engine},
    )


def _run_lucent(objective, channels, steps, lr, seed, norm, param_size, norm_bound):
    height, width = objective.input_shape[1:]
    size = min(param_size, height, width)
    param = ov.FourierImage(size, size)
    transforms = ov.Transforms((size, size), (height, width), norm)
    rngs = [filter_rng(seed, c) for c in channels]
    spectrum = np.stack([param.init(r) for r in rngs])
    adam = ov.Adam(lr)
    start, _ = objective(transforms.plain(param.forward(spectrum)), channels, need_grad=False)
    curves = np.zeros((len(channels), steps))
    for k in range(steps):
        image = param.forward(spectrum)
        x = transforms.forward(image, [ov.draw_transform(r) for r in rngs])
        curves[:, k], grad = objective(x, channels, redirect=_redirect(curves, k))
        g_spectrum = param.backward(transforms.backward(grad))
        spectrum = adam.step(spectrum, -g_spectrum)
    image = param.forward(spectrum)
    final, _ = objective(transforms.plain(image), channels, need_grad=False)
    return image.transpose(0, 2, 3, 1), curves, start, final


def _run_seed(objective, channels, steps, lr, seed, norm, param_size, norm_bound):
    shape = objective.input_shape
    rngs = [filter_rng(seed, c) for c in channels]
    x = np.stack([0.5 + (r.random(shape) - 0.5) * 2 * SEED_NOISE for r in rngs]).astype(
        np.float32
    )
    if norm_bound is not None:
        x = ov.project_ball(x, norm_bound)
    curves = np.zeros((len(channels), steps))
    for k in range(steps):
        curves[:, k], grad = objective(norm(x), channels, redirect=_redirect(curves, k))
        x = x + ov.normalized_step(norm.vjp(grad), lr).astype(np.float32)
        if norm_bound is not None:
            x = ov.project_ball(x, norm_bound)
    final, _ = objective(norm(x), channels, need_grad=False)
    return x.transpose(0, 2, 3, 1), curves, curves[:, 0].copy(), final


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def transform_table(rng: np.random.Generator, steps: int) -> np.ndarray:
    """[steps, 6] float32: one filter's draws for every step, in the order `optvis.Transforms`
    takes them from its stream: jitter 1 (y, x), cos / scale, sin / scale, jitter 2 (y, x).
    cos and sin are computed as `optvis.affine_sampling` does (float64, then float32)."""
    table = np.zeros((steps, 6), dtype=np.float32)
    for k in range(steps):
        d = ov.draw_transform(rng)
        theta = np.deg2rad(np.float64(d.angle))
        inv = 1.0 / np.float64(d.scale)
        table[k] = (d.jitter1[0], d.jitter1[1], np.float32(inv * np.cos(theta)),
                    np.float32(inv * np.sin(theta)), d.jitter2[0], d.jitter2[1])
    return table


def adam_bias(steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> np.ndarray:
    """[steps, 2] float32: Adam's bias corrections 1 - b1^t, 1 - b2^t for t = 1..steps."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    return np.stack([1 - betas[0] ** t, 1 - betas[1] ** t], axis=1).astype(np.float32)


class NotAGraphCase(Exception):
    """The step graph does not cover this layer (not a [C, H, W] feature map)."""


def _redirect(curves: np.ndarray, k: int) -> list[bool]:
    """Redirect item i's gradient in the first steps, and while its last value was <= 0."""
    if k < REDIRECT_STEPS:
        return [True] * curves.shape[0]
    return [bool(v <= 0.0) for v in curves[:, k - 1]]


# ----------------------------------------------------------------------------- layers, filters


def default_layers(card: dict[str, Any], n: int = 4) -> list[str]:
    """About `n` layer names spread from shallow to deep: the last layer of each resolution.

    Each spatial resolution of the network is a stage; its last full (not depthwise) conv is
    the stage's output. Of those stages, `n` evenly spaced ones are chosen, always including
    the first and the last, so the grid shows edges and colours, then textures, then parts.
    """
    rows = [r for r in card["layers"] if r.get("shape") and len(r["shape"]) == 3]
    if not rows or n < 1:
        return []
    stages: dict[tuple[int, int], dict] = {}
    for row in rows:
        res = (int(row["shape"][1]), int(row["shape"][2]))
        depthwise = row.get("groups", 1) > 1 and row.get("groups") == row["shape"][0]
        if res not in stages or not depthwise:
            stages[res] = row
    ends = sorted(stages.values(), key=lambda r: r["depth"])
    if len(ends) < n:  # few resolutions: spread over all layers instead
        ends = rows
    picks = np.unique(np.round(np.linspace(0, len(ends) - 1, min(n, len(ends)))).astype(int))
    return [ends[i]["name"] for i in picks]


def resolve_filters(filters: int | Sequence[int], count: int, where: str) -> list[int]:
    """An int n: the first n filters (all if fewer); a list: those filters, checked."""
    if isinstance(filters, int | np.integer):
        if filters < 1:
            raise ConfigError(f"{where}: filters must be at least 1, got {filters}")
        return list(range(min(int(filters), count)))
    chosen = [int(f) for f in filters]
    bad = [f for f in chosen if not 0 <= f < count]
    if bad or not chosen:
        raise ConfigError(
            f"{where}: filters {bad or chosen} are not in 0..{count - 1}; "
            "list existing filter indices or give a count"
        )
    return chosen


# ----------------------------------------------------------------------------- the job


def visualize_layer(
    model_dir: Path,
    layer: str,
    out_dir: Path,
    mode: str = "lucent",
    filters: int | list[int] = 64,
    steps: int = 256,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    threads: int | None = None,
    objective: str = "auto",
    engine: str = "graph",
    expression: str | None = None,
) -> dict:
    """Optimize the filters of one layer and write its artifacts; return their paths + summary.

    Files (stem = the layer's friendly name from model.json, safe in file names):
    `{out_dir}/{stem}.{mode}.png` the grid (filters row-major in the listed order),
    `.npy` float32 [K, H, W, 3] in [0, 1], `.json` curves and values, `.curve.png` the curves.
    `lr` None means the mode's default (lucent: Adam 0.05; seed: 1/255 per step).
    `objective` picks the maximized tensor (see `objective_tensor`; "auto": the pre-activation
    for ReLU6 layers, the layer's tensor otherwise); the JSON names it ("objective_tensor").
    `engine`: "graph" (each step one ONNX Runtime run, state on the device) or "numpy".
    `expression`: what each filter's picture maximizes (`filters.objective`, the syntax of
    `objectives.parse` with `layer` = this layer's maximized tensor and `c` = the filter; other
    layer names are model.json's); None or "channel(layer, c)" is the filter's channel mean.
    """
    from ..artifacts import write_json, write_npy
    from ..modelcard import find_layer, load_card, model_path
    from .objectives import FILTER_DEFAULT, LOGITS, parse

    card = load_card(model_dir)
    row = find_layer(card, layer)
    where = f"model {card.get('name')!r} layer {row['name']!r}"
    channels = resolve_filters(filters, int(row["shape"][0]), where)
    model = onnx.load(str(model_path(model_dir, card)))
    target = objective_tensor(model, row["tensor"], objective)
    expression = (expression or FILTER_DEFAULT).strip()
    objective_for = None
    if " ".join(expression.split()) != FILTER_DEFAULT:
        from .objective_job import logits_tensor

        def tensor_of(name: str) -> str:
            if name == target:
                return name
            return logits_tensor(model) if name == LOGITS else find_layer(card, name)["tensor"]

        def objective_for(c: int) -> Objective:
            return parse(expression, {"layer": target, "c": c}).with_layers(tensor_of)

        objective_for(channels[0])  # a bad expression fails before any work
    result = optimize_filters(
        model, target, channels, mode=mode, steps=steps, lr=lr, seed=seed,
        batch_size=batch_size, preprocess=card.get("preprocess"), device=device, threads=threads,
        engine=engine, objective_for=objective_for,
    )
    out_dir = Path(out_dir)
    stem = out_dir / f"{row['name']}.{mode}"
    paths = {
        "png": str(stem) + ".png",
        "npy": str(stem) + ".npy",
        "json": str(stem) + ".json",
        "curve": str(stem) + ".curve.png",
    }
    write_npy(paths["npy"], result.images)
    from ..render import save_png

    save_png(paths["png"], image_grid(result.images))
    kind = "" if target == row["tensor"] else ", before its activation"
    save_curves(paths["curve"], result, f"{card.get('name')} {row['name']} ({mode}{kind})",
                "channel mean activation" if objective_for is None else "objective")
    summary = {
        "model": card.get("name"),
        "layer": row["name"],
        "tensor": row["tensor"],
        "objective": objective,
        "objective_tensor": target,
        "expression": expression,
        "mode": mode,
        "filters": result.channels,
        "steps": steps,
        "lr": result.info["lr"],
        "seed": seed,
        "batch_size": result.info["batch"],
        "image_shape": list(result.images.shape[1:]),
        "input_shape": result.info["input_shape"],
        "providers": result.info["providers"],
        "engine": result.info["engine"],
        "seconds": round(result.seconds, 3),
        "filter_steps_per_second": round(len(channels) * steps / max(result.seconds, 1e-9), 3),
        "start_image": result.start_image.tolist(),
        "start": result.curves[:, 0].tolist(),
        "final": result.final.tolist(),
        "curves": np.round(result.curves, 6).tolist(),
        "curve_note": (
            f"curves[k][t]: {expression} for filter c = k, layer = objective_tensor, on the "
            "input of step t (lucent: the randomly transformed image); start_image/final: on "
            "the untransformed image"
        ),
        "files": paths,
    }
    write_json(paths["json"], summary)
    return summary


# ----------------------------------------------------------------------------- pictures


def image_grid(images: np.ndarray, max_tile: int = MAX_TILE, sep: int = 2) -> np.ndarray:
    """[K, H, W, 3] in [0, 1] -> uint8 near-square grid, row-major, white separators."""
    from PIL import Image

    from ..render import grid_shape

    k, h, w = images.shape[:3]
    factor = min(1.0, max_tile / max(h, w))
    th, tw = max(1, round(h * factor)), max(1, round(w * factor))
    rows, cols = grid_shape(k)
    out = np.full((rows * (th + sep) - sep, cols * (tw + sep) - sep, 3), 255, dtype=np.uint8)
    for i in range(k):
        tile = np.rint(np.clip(images[i], 0.0, 1.0) * 255.0).astype(np.uint8)
        if (th, tw) != (h, w):
            tile = np.asarray(Image.fromarray(tile).resize((tw, th), Image.Resampling.LANCZOS))
        r, c = divmod(i, cols)
        out[r * (th + sep) : r * (th + sep) + th, c * (tw + sep) : c * (tw + sep) + tw] = tile
    return out


def save_curves(path: str, result: FilterResult, title: str,
                ylabel: str = "channel mean activation") -> None:
    """Activation against step per filter (thin lines), the median (thick), start/final marks."""
    from matplotlib.figure import Figure

    from ..render import save_figure

    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(result.curves.shape[1])
    for curve in result.curves:
        ax.plot(steps, curve, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps, np.median(result.curves, axis=0), color="tab:blue", linewidth=2.0,
            label="median over filters")
    ax.scatter(np.full(len(result.final), steps[-1]), result.final, s=8, color="tab:red",
               zorder=3, label="final image, untransformed")
    ax.axhline(float(np.median(result.start_image)), color="grey", linestyle="--",
               linewidth=1.0, label="start image (median)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(path, fig)
