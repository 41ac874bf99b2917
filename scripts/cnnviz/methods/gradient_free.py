"""Gradient-free maps: Eigen-CAM, Ablation-CAM and RISE, each its own graphs run by the one runner.

- eigencam (Muhammad & Yeasin 2020; pytorch-grad-cam's EigenCAM): the CAM layer's maps A
  [C, h, w] as a [hw, C] matrix, centred over the positions, projected on its first principal
  component (first right singular vector v1): cam = X v1 = s1 u1, u1 the first left singular
  vector. ONNX has no SVD, so the graph takes u1 from the smaller Gram matrix, K = X X^T
  [hw, hw] (or v1 from X^T X [C, C] when C < hw, and X v1), by repeated squaring (K <- K^2 /
  trace, `EIGEN_SQUARINGS` times: the eigenvalue ratios go to the power 2^20, every other
  component vanishes) and reads the column of the largest diagonal entry (a column surely not
  orthogonal to u1: its entry u1_i^2 is the largest).
  The singular vector's sign is arbitrary (LAPACK's choice in the peer); the sign rule is
  pytorch-grad-cam's own `get_2d_projection_with_sign_correction` (Seg-Eigen-CAM eq. 13): flip
  the projection when |min| > |max|, so that its largest-magnitude value is positive. The map is
  class-agnostic: one per image, whatever the target.
- ablationcam (Desai & Ramaswamy 2020; pytorch-grad-cam's AblationCAM): channel k of the layer
  zeroed, the tail of the network run from the layer on the ablated maps, the target logit y_k;
  w_k = (y - y_k) / y; cam = ReLU(sum_k w_k A_k). The prefix runs once for all images (the
  layer's maps are the scorer's input), the tail on a call's worth of ablated copies at once.
  All-zero channels (many in sparse ReLU maps) change nothing when zeroed: they are not run and
  weigh 0 (their y_k = y, as the peer computes it).
  The peer zeroes a channel when its layer's minimum is 0 (every ReLU layer) and otherwise sets
  it to min - 1e7; zeroing is the paper's ablation, and the one here.
- rise (Petsiuk et al. 2018): N random binary s x s grids (each cell kept with probability p),
  bilinearly upsampled to (s + 1) * cell (cell = ceil(H / s)) as the paper's code does
  (skimage resize, order 1, mode 'reflect': `rise_upsampling`), cropped at a random shift in
  [0, cell) per axis; the paper's saliency is sum_i P_t(x * M_i) M_i / (N p), P_t the target's
  softmax probability (the paper's score; the model's own output when it already gives
  probabilities). Masking multiplies the normalised input, so a hidden pixel is the dataset
  mean (as the paper's PyTorch code does). The seeded grids and shifts are drawn on the host
  (`rise_masks`: N * s^2 bits); upsampling, shifting, masking and scoring run in the graph, a
  call's worth of masks at a time, summed over calls by the runner (sum_i P_i M_i and the
  coverage sum_i M_i); the one division per pixel is `rise_finish`.
  Estimator: both sums estimate E[P_t | pixel kept] (E[sum_i M_i] = N p), but dividing by N p
  leaves the random unevenness of the coverage, times the mean score, in the map: on
  EfficientNet-Lite0 (the cat, p ~ 0.73 under masks) maps from two independent sets of 2000
  masks correlate 0.25 with the paper's N p and 0.97 with the coverage (0.92 already at 500).
  The default is the coverage; `estimator: paper` gives the paper's exactly.

Eigen-CAM and Ablation-CAM are finished like every CAM (cam._finish_in_graph: ReLU, min-max
normalise at the layer's size, bilinear upsample to the input size, normalise). RISE's map is
not normalised: it is non-negative by construction, in units of the target's probability (the
mean score when the pixel is kept), and is summed over the mask chunks, so no single call sees
the whole map to normalise it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..methodgraph import FLOAT, INT64

EIGEN_SQUARINGS = 20  # K^(2^20): a second eigenvalue 0.9999 of the first leaves 0.9999^1e6

# ---- shared pieces -------------------------------------------------------------------------
def _layer_acts(b, model: onnx.ModelProto, x: str, tensor: str, images: int,
                prefix: str) -> tuple[str, list[int]]:
    """Inline the model up to `tensor` on `x`: (the tensor's name here, its static shape)."""
    from ..autodiff.prepare import prepare
    from ..graph import cut_at
    from ..methodgraph import static_dims
    from .backprop import model_input_name

    cut = prepare(cut_at(model, [tensor]), images)
    names = b.inline(cut, {model_input_name(model): x}, prefix)
    shape = next(static_dims(o) for o in cut.graph.output if o.name == tensor)
    if len(shape) != 4 or not all(shape):
        raise ConfigError(f"a CAM needs a [N, C, h, w] layer; {tensor!r} is {shape}")
    return names[tensor], shape


def _target_scores(b, card: dict[str, Any], logits: str, rows: int, targets: str,
                   probability: bool) -> str:
    """[rows]: each row's score of its target (`targets` [rows]); the softmax probability
    when `probability` (unless the model's output already is one), else the output itself."""
    from ..methodgraph import one_hot

    classes = int(card["output"]["num_classes"])
    scores = b.reshape(logits, [rows, -1])
    if probability and card.get("output", {}).get("kind", "logits") != "probabilities":
        scores = b.op("Softmax", [scores], axis=1)
    picked = b.op("Mul", [scores, one_hot(b, targets, classes, [classes])])
    return b.reduce("ReduceSum", picked, [1])


def _output_name(card: dict[str, Any], model: onnx.ModelProto) -> str:
    outputs = [o.name for o in model.graph.output]
    name = card.get("output", {}).get("name")
    return name if name in outputs else outputs[0]


def _cam_layer(job: Any) -> str | None:
    layer = job.options["cam_layer"]
    return None if layer in (None, "auto") else layer


def _unique_images(job: Any) -> tuple[list[int], dict[int, int]]:
    """The distinct images of the job's rows, and each one's position among them."""
    index = list(dict.fromkeys(i for i, _ in job.rows))
    return index, {i: k for k, i in enumerate(index)}


# ---- Eigen-CAM -----------------------------------------------------------------------------
def eigencam_graph(model: onnx.ModelProto, card: dict[str, Any], layer: str | None,
                   images: int):  # noqa: ANN201 - MethodGraph
    """In: images [B, 3, H, W]. Out: `map` [B, H, W] (finished) and `projection` [B, h, w]
    (the signed first-component projection, before the ReLU)."""
    from ..methodgraph import GraphBuilder, MethodGraph
    from .backprop import _image_inputs
    from .cam import _finish_in_graph, layer_tensor

    tensor = layer_tensor(card, layer)
    b = GraphBuilder.for_model(model)
    x, _, dims = _image_inputs(b, model, images)
    b.inputs = [i for i in b.inputs if i.name != "targets"]
    a, shape = _layer_acts(b, model, x, tensor, images, "model")
    channels, low = shape[1], shape[2:]
    hw = low[0] * low[1]
    flat = b.op("Transpose", [b.reshape(a, [images, channels, hw])], perm=[0, 2, 1])  # [B,hw,C]
    centred = b.op("Sub", [flat, b.reduce("ReduceMean", flat, [1], keepdims=True)])
    transposed = b.op("Transpose", [centred], perm=[0, 2, 1])
    if hw <= channels:  # K = X X^T [hw, hw]: its top eigenvector is u1, the projection's shape
        column = _top_eigenvector(b, b.op("MatMul", [centred, transposed]), hw, images)
    else:  # X^T X [C, C]: its top eigenvector is v1; the projection is X v1
        v1 = _top_eigenvector(b, b.op("MatMul", [transposed, centred]), channels, images)
        column = b.op("MatMul", [centred, v1])
    projection = b.reshape(column, [images, *low])
    top = b.reduce("ReduceMax", projection, [1, 2], keepdims=True)
    bottom = b.reduce("ReduceMin", projection, [1, 2], keepdims=True)
    flip = b.op("Greater", [b.op("Abs", [bottom]), b.op("Abs", [top])])
    sign = b.op("Sub", [b.f(1.0), b.op("Mul", [b.op("Cast", [flip], to=FLOAT), b.f(2.0)])])
    projection = b.op("Mul", [projection, sign])
    b.output("projection", projection)
    b.output("map", _finish_in_graph(b, projection, low, dims[-2:]))
    graph = MethodGraph(b.build("eigencam"), images, image_inputs=("images",))
    graph.metadata["layer"] = tensor
    return graph


def _top_eigenvector(b, gram: str, n: int, images: int) -> str:
    """[B, n, 1]: +-(a positive multiple of) the top eigenvector of each symmetric positive
    semi-definite `gram` [B, n, n], by `EIGEN_SQUARINGS` trace-normalised squarings and the
    column of the largest diagonal entry."""
    eye = b.float_const(np.eye(n)[None], "eye")
    power = gram
    for _ in range(EIGEN_SQUARINGS):
        trace = b.reduce("ReduceSum", b.op("Mul", [power, eye]), [1, 2], keepdims=True)
        # a zero matrix (all positions alike) stays zero: its map is flat, finished to zeros
        power = b.op("Div", [power, b.op("Max", [trace, b.f(1e-30)])])
        power = b.op("MatMul", [power, power])
    diagonal = b.reduce("ReduceSum", b.op("Mul", [power, eye]), [2])  # [B, n]
    # the column of the (first) largest diagonal entry: never two, whose signs could cancel
    first = b.op("ArgMax", [diagonal], axis=1, keepdims=1)  # [B, 1]
    index = b.const(np.arange(n, dtype=np.int64)[None], "index")
    pick = b.op("Cast", [b.op("Equal", [first, index])], to=FLOAT)  # [B, n]
    return b.op("MatMul", [power, b.reshape(pick, [images, n, 1])])


def run_eigencam(job: Any) -> Iterator[Any]:
    """Eigen-CAM: one map per distinct image of the job (the method ignores the target)."""
    from .explain import _images_per_call, _runner

    index, position = _unique_images(job)
    images, _ = _images_per_call(dataclasses.replace(job, rows=[(i, 0) for i in index]))
    graph = eigencam_graph(job.model, job.card, _cam_layer(job), images)
    out = _runner(job, graph).run({"images": job.inputs[index]})
    info = {"layer": graph.metadata["layer"]}
    for i, _ in job.rows:
        yield i, out["map"][position[i]], None, info


# ---- Ablation-CAM --------------------------------------------------------------------------
def ablation_graphs(model: onnx.ModelProto, card: dict[str, Any], layer: str | None, images: int,
                    points: int):  # noqa: ANN201 - three MethodGraphs and the layer tensor
    """Ablation-CAM as three graphs around a per-image choice of channels (`ablation_plan`):

    - `acts`: images [B, 3, H, W] -> `acts` [B, C, h, w], the layer's maps;
    - `scores`: one image's maps (`acts` [1, C, h, w], and `images` [1, 3, H, W] only when
      the tail also reads the input: a path around the layer) and target, the call's `points`
      channels (`channels` [P] int64, a per-point input; -1 ablates nothing) -> `score` [1] the
      target logit of the image and `scores` [1, P] the target logits with each channel zeroed
      (the tail alone, on P + 1 rows: the prefix is not run again per call, which on a large
      model was most of the method's time);
    - `finish`: `acts` [B, C, h, w] and `weights` [B, C] -> `map` [B, H, W].
    """
    from ..autodiff.prepare import prepare
    from ..autodiff.tail import tail_model
    from ..methodgraph import GraphBuilder, MethodGraph, one_hot, repeat_rows
    from .backprop import _image_inputs, model_input_name
    from .cam import _finish_in_graph, layer_tensor

    tensor = layer_tensor(card, layer)
    b = GraphBuilder.for_model(model)
    x, _, dims = _image_inputs(b, model, images)
    b.inputs = [i for i in b.inputs if i.name != "targets"]
    a, shape = _layer_acts(b, model, x, tensor, images, "model")
    b.output("acts", a)
    acts = MethodGraph(b.build("ablationcam_acts"), images, image_inputs=("images",))
    channels, low = shape[1], shape[2:]

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, 1)
    a = b.input("acts", FLOAT, [1, channels, *low])
    chosen = b.input("channels", INT64, [points])
    keep = b.op("Sub", [b.f(1.0), one_hot(b, chosen, channels, [channels])])  # [P, C]
    ablated = b.op("Mul", [a, b.reshape(keep, [points, channels, 1, 1])])
    rows = points + 1
    tail = prepare(tail_model(model, tensor, [_output_name(card, model)]), rows)
    feeds = {tensor: b.op("Concat", [a, ablated], axis=0)}
    x_name = model_input_name(model)
    reads_input = any(i.name == x_name for i in tail.graph.input)  # a path around the layer
    if reads_input:
        feeds[x_name] = repeat_rows(b, x, [1, *dims], rows)
    else:
        b.inputs = [i for i in b.inputs if i.name != "images"]
    names = b.inline(tail, feeds, "tail")
    scores = _target_scores(b, card, names[tail.graph.output[0].name], rows,
                            repeat_rows(b, t, [1], rows), probability=False)
    b.output("score", b.op("Slice", [scores, b.ints([0]), b.ints([1]), b.ints([0])]))
    b.output("scores", b.reshape(
        b.op("Slice", [scores, b.ints([1]), b.ints([rows]), b.ints([0])]), [1, points]))
    scorer = MethodGraph(b.build("ablationcam_scores"), 1, points,
                         image_inputs=("images", "acts", "targets") if reads_input
                         else ("acts", "targets"),
                         point_inputs=("channels",), per_point=("scores",),
                         point_padding={"channels": -1})

    b = GraphBuilder.for_model(model)
    a = b.input("acts", FLOAT, [images, channels, *low])
    w = b.input("weights", FLOAT, [images, channels])
    raw = b.reduce("ReduceSum", b.op("Mul", [a, b.reshape(w, [images, channels, 1, 1])]), [1])
    b.output("map", _finish_in_graph(b, raw, low, dims[-2:]))
    finish = MethodGraph(b.build("ablationcam_finish"), images, image_inputs=("acts", "weights"))
    return acts, scorer, finish, tensor


def ablation_plan(acts: np.ndarray) -> np.ndarray:
    """The channels of one image's maps [C, h, w] worth ablating: those not all zero."""
    flat = np.asarray(acts).reshape(len(acts), -1)
    return np.flatnonzero(np.any(flat != 0, axis=1))


def ablation_weights(scorer: Any, image: np.ndarray, acts: np.ndarray, target: int,
                     channels: np.ndarray) -> tuple[np.ndarray, float]:
    """One image's weights [C] (float32) w_k = (y - y_k) / y over the ablated `channels`
    (0 elsewhere: zeroing an all-zero channel changes nothing), and y, its target logit.
    `scorer`: the runner of `ablation_graphs`' scores graph; image [1, 3, H, W], acts its layer
    maps [1, C, h, w] (from the acts graph)."""
    channels = np.asarray(channels, np.int64)
    fed = channels if len(channels) else np.array([-1], np.int64)  # -1: the image itself
    feeds = {"images": image, "acts": acts, "targets": np.array([target], np.int64)}
    out = scorer.run({k: v for k, v in feeds.items() if k in scorer.graph.image_inputs},
                     {"channels": fed})
    score = float(out["score"][0])
    weights = np.zeros(acts.shape[1], np.float64)
    ablated = out["scores"][0][: len(channels)].astype(np.float64)
    weights[channels] = (score - ablated) / score
    return weights.astype(np.float32), score


def run_ablationcam(job: Any) -> Iterator[Any]:
    """Ablation-CAM: the layer's maps of every image in one graph, each image's non-zero
    channels ablated in batches in another, the weighted maps finished in a third."""
    from .explain import _images_per_call, _runner, max_rows

    rows = max_rows(job.card, int(job.options["batch_size"]))
    images, _ = _images_per_call(job)
    acts_graph, scores_graph, finish_graph, tensor = ablation_graphs(
        job.model, job.card, _cam_layer(job), images, rows
    )
    index, position = _unique_images(job)
    acts = _runner(job, acts_graph).run({"images": job.inputs[index]})["acts"]
    scorer = _runner(job, scores_graph)
    weights, infos = [], []
    for i, target in job.rows:
        own = acts[position[i]]
        channels = ablation_plan(own)
        w, score = ablation_weights(scorer, job.inputs[i : i + 1], own[None], target, channels)
        weights.append(w)
        infos.append({"layer": tensor, "channels": len(own), "ablated": len(channels),
                      "score": round(score, 6)})
    rows_acts = acts[[position[i] for i, _ in job.rows]]
    maps = _runner(job, finish_graph).run({"acts": rows_acts, "weights": np.stack(weights)})
    for r, (i, _) in enumerate(job.rows):
        yield i, maps["map"][r], None, infos[r]


# ---- RISE ----------------------------------------------------------------------------------
def rise_cells(size: tuple[int, int] | list[int], grid: int) -> tuple[int, int]:
    """The cell size per axis, ceil(side / s), as the paper's code."""
    return math.ceil(size[0] / grid), math.ceil(size[1] / grid)


def rise_masks(count: int, grid: int, p: float, seed: int,
               size: tuple[int, int] | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The seeded random draws: grids [N, s, s] float32 of 0/1 (1 with probability p) and
    shifts [N, 2] int64 in [0, cell) per axis."""
    if not 0 < p <= 1 or grid < 1 or count < 1:
        raise ConfigError(f"rise needs masks >= 1, grid >= 1 and 0 < p <= 1; got {count}, "
                          f"{grid}, {p}")
    rng = np.random.default_rng(seed)
    grids = (rng.random((count, grid, grid)) < p).astype(np.float32)
    cells = rise_cells(size, grid)
    shifts = np.stack([rng.integers(0, c, count) for c in cells], axis=1).astype(np.int64)
    return grids, shifts


def rise_upsampling(size_out: int, size_in: int) -> np.ndarray:
    """[size_out, size_in] weights of skimage's resize(order=1, mode='reflect',
    anti_aliasing=False) along one axis (half-pixel centres; past the first and last centre
    the grid is mirrored about them), the paper's upsampling."""
    out = np.arange(size_out, dtype=np.float64)
    src = (out + 0.5) * (size_in / size_out) - 0.5
    low = np.floor(src).astype(np.int64)
    frac = src - low

    def mirror(i: np.ndarray) -> np.ndarray:
        if size_in == 1:
            return np.zeros_like(i)
        period = 2 * (size_in - 1)
        i = np.abs(i) % period
        return np.where(i >= size_in, period - i, i)

    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), mirror(low)), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), mirror(low + 1)), frac)
    return m


def rise_graph(model: onnx.ModelProto, card: dict[str, Any], images: int, points: int,
               grid: int):  # noqa: ANN201 - MethodGraph
    """RISE as one graph. Per call: `points` grids (`grids` [P, s, s]) and shifts (`shifts`
    [P, 2]) -> masks [P, H, W] (rows and columns of the upsampled grid picked at the shift:
    M = R_top G R_left^T, R = the upsampling matrix's rows shift .. shift + H); every image
    [B, 3, H, W] times every mask scored; out `map` [B, H, W] = sum_p P_t(x M_p) M_p and
    `coverage` [1, H, W] = sum_p M_p, summed by the runner over calls. A padded point's grid
    is zeros: its mask hides everything and weighs nothing."""
    from ..autodiff.prepare import prepare
    from ..methodgraph import GraphBuilder, MethodGraph, repeat_rows
    from .backprop import _image_inputs, model_input_name

    b = GraphBuilder.for_model(model)
    x, t, dims = _image_inputs(b, model, images)
    _, height, width = dims
    grids = b.input("grids", FLOAT, [points, grid, grid])
    shifts = b.input("shifts", INT64, [points, 2])
    cells = rise_cells((height, width), grid)

    def rows_at(axis: int, side: int) -> str:  # [P, side, s]: upsampled rows shift + i
        up = rise_upsampling((grid + 1) * cells[axis], grid)
        shift = b.op("Slice", [shifts, b.ints([axis]), b.ints([axis + 1]), b.ints([1])])
        at = b.op("Add", [shift, b.const(np.arange(side, dtype=np.int64)[None], "offsets")])
        return b.op("Gather", [b.float_const(up, "upsample"), at], axis=0)

    tops, lefts = rows_at(0, height), rows_at(1, width)
    masks = b.op("MatMul", [b.op("MatMul", [tops, grids]),
                            b.op("Transpose", [lefts], perm=[0, 2, 1])])  # [P, H, W]
    hidden = b.op("Mul", [b.reshape(x, [images, 1, *dims]),
                          b.reshape(masks, [1, points, 1, height, width])])
    rows = images * points
    forward = prepare(model, rows)
    names = b.inline(forward, {model_input_name(model): b.reshape(hidden, [rows, *dims])},
                     "model")
    scores = _target_scores(b, card, names[_output_name(card, forward)], rows,
                            repeat_rows(b, t, [images], points), probability=True)
    flat = b.reshape(masks, [points, height * width])
    total = b.op("MatMul", [b.reshape(scores, [images, points]), flat])
    b.output("map", b.reshape(total, [images, height, width]))
    coverage = b.op("Expand", [b.reduce("ReduceSum", masks, [0], keepdims=True),
                               b.ints([images, height, width])])
    b.output("coverage", coverage)
    return MethodGraph(b.build("rise"), images, points, point_inputs=("grids", "shifts"),
                       summed=("map", "coverage"))


def rise_finish(total: np.ndarray, coverage: np.ndarray, estimator: str, count: int,
                p: float) -> np.ndarray:
    """The saliency [H, W] float32 from one image's sums: total / coverage (a pixel no mask
    keeps gets 0) or total / (N p), the paper's."""
    if estimator == "paper":
        return (total / (count * p)).astype(np.float32)
    if estimator != "coverage":
        raise ConfigError(f"rise estimator must be coverage or paper, got {estimator!r}")
    return np.where(coverage > 0, total / np.maximum(coverage, 1e-30), 0).astype(np.float32)


def run_rise(job: Any) -> Iterator[Any]:
    """RISE: the seeded masks (the same for every image), scored in batches of `batch`."""
    from .explain import _images_per_call, _row_feeds, _runner, max_rows

    count, grid, p = int(job.options["masks"]), int(job.options["grid"]), float(job.options["p"])
    seed, estimator = int(job.options["seed"]), str(job.options["estimator"])
    grids, shifts = rise_masks(count, grid, p, seed, job.inputs.shape[-2:])
    rows = max_rows(job.card, int(job.options["batch_size"]))
    images, points = _images_per_call(dataclasses.replace(job, batch_size=rows), count)
    graph = rise_graph(job.model, job.card, images, points, grid)
    out = _runner(job, graph).run(_row_feeds(job), {"grids": grids, "shifts": shifts})
    info = {"masks": count, "grid": grid, "p": p, "seed": seed, "estimator": estimator}
    for r, (i, _) in enumerate(job.rows):
        yield i, rise_finish(out["map"][r], out["coverage"][r], estimator, count, p), None, info
