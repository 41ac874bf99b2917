"""Input × Gradient and DeepLIFT (rescale rule): signed attributions of the target logit.

Both are one graph (cnnviz.methodgraph) run by the one runner; the saved map is the channel
SUM of the signed [3, H, W] attribution (signed [H, W]), and the attribution itself is returned.

- Input × Gradient (Shrikumar et al. 2016; captum InputXGradient): x ⊙ ∂logit_t/∂x.
- DeepLIFT, rescale rule (Shrikumar et al. 2017; captum DeepLift): (x - x0) ⊙ m, where m is the
  input's multiplier: the backward of the model on the rows [x; x0] with the rescale rules of
  cnnviz.autodiff.reference at every activation and MaxPool (Δy/Δu, read from the two halves of
  the same forward), products of two computed tensors split by the operands' means, and the
  true derivative at linear ops. The attributions sum to f_t(x) - f_t(x0) where every
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

OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "input_x_gradient": {},
    "deeplift": {
        "baseline": {
            "default": "zero",
            "type": "string",
            "enum": ["zero", "black", "white"],
            "description": (
                "the reference input x0: zeros after normalization (the dataset mean colour), or "
                "an all-black or all-white image through the model's preprocessing"
            ),
        },
    },
}

Result = tuple[int, np.ndarray, np.ndarray | None, dict[str, Any]]


def _rows(b, x: str, start: int, end: int) -> str:  # noqa: ANN001 - GraphBuilder
    """Rows [start, end) of x."""
    if b.opset >= 10:
        return b.op("Slice", [x, b.ints([start]), b.ints([end]), b.ints([0])])
    return b.op("Slice", [x], starts=[start], ends=[end], axes=[0])


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
    logit at x and at x0. The model runs once on 2B rows [x; x0] (forward and backward)."""
    from ..autodiff.reference import deeplift_rules
    from ..methodgraph import FLOAT, GraphBuilder, MethodGraph
    from .backprop import _image_inputs, _inline_gradient

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    x0 = b.input("baseline", FLOAT, [1, *dims])
    refs = b.op("Expand", [x0, b.ints([images, *dims])])
    both = b.op("Concat", [x, refs], axis=0)
    targets = b.op("Concat", [t, t], axis=0)
    rows = 2 * images
    names = _inline_gradient(
        b, model, both, targets, rows, "gradient", fallback, node_rules=deeplift_rules
    )
    multiplier = _rows(b, names["grad"], 0, images)
    signed = b.op("Mul", [b.op("Sub", [x, x0]), multiplier])
    b.output("signed", signed)
    b.output("map", b.reduce("ReduceSum", signed, [1]))
    picked = b.reduce(
        "ReduceSum",
        b.op("Mul", [b.reshape(names["value"], [rows, -1]), b.reshape(names["seeds"], [rows, -1])]),
        [1],
    )  # [2B]: x's rows, then x0's
    b.output("values", b.op("Transpose", [b.reshape(picked, [2, images])], perm=[1, 0]))
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
    """DeepLIFT (rescale) for the job's rows: `batch_size` model rows per call, i.e. half as
    many images (each image runs beside its baseline)."""
    from .backprop import make_baseline
    from .explain import _images_per_call, _row_feeds, _runner

    name = str(job.options["baseline"])
    baseline = make_baseline(name, job.inputs[0], job.card["preprocess"])
    images, _ = _images_per_call(job, 2)
    graph = deeplift_graph(job.model, images, job.fallback)
    out = _runner(job, graph).run(_row_feeds(job), None, {"baseline": baseline[None]})
    for r, (i, _) in enumerate(job.rows):
        info = {"signed": True, "picture": "relevance", "baseline": name,
                "delta_error": delta_error(out["signed"][r], out["values"][r])}
        yield i, out["map"][r], out["signed"][r], info
