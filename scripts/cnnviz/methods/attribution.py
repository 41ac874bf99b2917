"""Input × Gradient and DeepLIFT (rescale rule): signed attributions of the target logit.

Both are one graph (cnnviz.methodgraph) run by the one runner; the saved map is the channel
SUM of the signed [3, H, W] attribution (signed [H, W]), and the attribution itself is returned.

- Input × Gradient (Shrikumar et al. 2016; captum InputXGradient): x ⊙ ∂logit_t/∂x.
- DeepLIFT, rescale rule (Shrikumar et al. 2017; captum DeepLift): (x - x0) ⊙ m, where m is the
  input's multiplier: the model's backward with the rules of cnnviz.autodiff.reference (Δy/Δu at
  every activation and MaxPool, with the baseline's activations from a one-row copy of the
  forward in the same graph; products of two computed tensors split by the operands' means) and
  the true derivative at linear ops. The attributions sum to f_t(x) - f_t(x0) where every
  nonlinearity of the model is one of these; the graph also returns both logits, and each map's
  info holds the relative summation-to-delta error.
  Baselines as Integrated Gradients' (`backprop.make_baseline`): "zero" (the dataset mean colour
  after normalization), "black" or "white" pixels through the model's preprocessing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

Result = tuple[int, np.ndarray, np.ndarray | None, dict[str, Any]]


def input_x_gradient_graph(model: onnx.ModelProto, images: int, fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """In: images [B, 3, H, W], targets [B]. Out: `signed` = x ⊙ gradient of the target logit,
    `map` = its channel sum [B, H, W]."""
    from ..methodgraph import GraphBuilder, MethodGraph
    from .backprop import _image_inputs, _inline_gradient

    b = GraphBuilder.for_model(model)
    x, t, _ = _image_inputs(b, model, images)
    names = _inline_gradient(b, model, x, t, images, "gradient", fallback)
    signed = b.op("Mul", [x, names["grad"]])
    b.output("signed", signed)
    b.output("map", b.reduce("ReduceSum", signed, [1]))
    return MethodGraph(b.build("input_x_gradient"), images)


def deeplift_graph(model: onnx.ModelProto, images: int, fallback: str = "error"):  # noqa: ANN201 - MethodGraph
    """In: images [B, 3, H, W], targets [B], and the job's baseline [1, 3, H, W] (fixed).
    Out: `signed` = (x - x0) ⊙ multiplier, `map` its channel sum, `values` [B, 2] = the target
    logit at x and at x0. The model's forward and backward run on the B images and its forward
    once more on the baseline (one row), whose tensors the rescale rules read
    (autodiff.reference)."""
    from ..autodiff.reference import REF, attach_reference, deeplift_rules
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph, one_hot, seed_input, static_dims
    from .backprop import SEED_PREFIX, _image_inputs, gradient_model, model_input_name

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    x0 = b.input("baseline", FLOAT, [1, *dims])
    core = gradient_model(model, "gradient", images, fallback=fallback, node_rules=deeplift_rules)
    seed = seed_input(core)
    logits = seed.name[len(SEED_PREFIX):]
    x_name = model_input_name(model)
    core = attach_reference(core, model, x_name, [logits])
    seed_dims = static_dims(seed)[1:]
    seeds = one_hot(b, t, int(np.prod(seed_dims)), seed_dims)
    weights = {init.name for init in model.graph.initializer}
    names = b.inline(core, {x_name: x, seed.name: seeds, REF + x_name: x0}, "model",
                     shared=weights)
    del core  # copied into the builder: freed before the graph is built and opened
    signed = b.op("Mul", [b.op("Sub", [x, x0]), names["grad:" + x_name]])
    b.output("signed", signed)
    b.output("map", b.reduce("ReduceSum", signed, [1]))
    flat_seeds = b.reshape(seeds, [images, -1])
    picked = [
        b.reduce("ReduceSum", b.op("Mul", [b.reshape(names[v], [rows, -1]), flat_seeds]), [1],
                 keepdims=True)
        for v, rows in ((logits, images), (REF + logits, 1))
    ]  # the target logit at x and at x0, [B, 1] each
    b.output("values", b.op("Concat", picked, axis=1))
    return MethodGraph(b.build("deeplift"), images, fixed_inputs=("baseline",))


def delta_error(attributions: np.ndarray, values: np.ndarray) -> float:
    """|sum(attributions) - (f(x) - f(x0))| / |f(x) - f(x0)| for one image (values: [f(x),
    f(x0)]): 0 up to rounding where every nonlinearity on the path is rescaled."""
    delta = float(values[0]) - float(values[1])
    total = float(np.asarray(attributions, np.float64).sum())
    return abs(total - delta) / max(abs(delta), 1e-12)


def run_input_x_gradient(job: Any) -> Iterator[Result]:
    """Input × Gradient for the job's rows (`job`: cnnviz.methods.explain.Job)."""
    from .explain import _images_per_call, _row_feeds, _runner

    images, _ = _images_per_call(job)
    out = _runner(job, input_x_gradient_graph(job.model, images, job.fallback)).run(
        _row_feeds(job)
    )
    for r, (i, _) in enumerate(job.rows):
        yield i, out["map"][r], out["signed"][r], {"signed": True, "picture": "relevance"}


def run_deeplift(job: Any) -> Iterator[Result]:
    """DeepLIFT (rescale) for the job's rows, `batch_size` images per call (plus the baseline's
    one-row forward)."""
    from .backprop import make_baseline
    from .explain import _images_per_call, _row_feeds, _runner

    name = str(job.options["baseline"])
    baseline = make_baseline(name, job.inputs[0], job.card["preprocess"])
    images, _ = _images_per_call(job)
    graph = deeplift_graph(job.model, images, job.fallback)
    out = _runner(job, graph).run(_row_feeds(job), None, {"baseline": baseline[None]})
    for r, (i, _) in enumerate(job.rows):
        info = {"signed": True, "picture": "relevance", "baseline": name,
                "delta_error": delta_error(out["signed"][r], out["values"][r])}
        yield i, out["map"][r], out["signed"][r], info
