"""Feature visualization's optimization step as ONE ONNX graph (design principle 2a).

The numpy parts of `optvis` (parameterization, random transforms, resize, normalization, Adam)
are written here as ONNX ops, put in front of the model cut at the layer, and differentiated
with the model by `cnnviz.autodiff.vjp`; the optimizer update is appended after the gradient.
One `session.run` is one step: state in (params, Adam m and v, step index, last values, curves),
state out. `objective_job.ObjectiveJob` keeps the state on the device with I/O binding.

Step graph, lucent mode (B pictures, param size S, model input H x W; `objective_graphs`):

    spectrum [B,3,S,S//2+1,2] -> x scale -> MatMul (rfft columns) -> MatMul (ifft rows) / 4
      -> Conv 1x1 (colour decorrelation) -> Sigmoid                       = image [B,3,S,S]
    draws [B, steps, 6] -Gather(step)-> (jitter 1, cos/scale, sin/scale, jitter 2) per filter
      -> bilinear taps (Floor, Clip, masks) -> Gather of 4 taps from image - 0.5, weighted sum
         (pad 12 + jitter 8 + scale x rotate + jitter 4 in one resampling) + 0.5
      -> MatMul, MatMul (bilinear resize to H x W, align_corners) -> x gain - shift
      -> the model up to the objective's layers -> the objective (`objectives.emit`: its
         terms, their weighted sum, + the linear terms at the pre-activations while
         redirected) -> seed 1 per item -> backward of all of the above (the engine)
      -> Adam (lr, betas, eps; bias corrections per step from `bias`) -> spectrum', m', v'
Seed mode: x [B,3,H,W] -> x gain - shift -> model -> backward -> x + lr g / (rms(g) + 1e-5)
(-> projected onto the L2 ball).

Every value that the numpy version computes in float32 is computed here by the same float32
operations in the same order where the order matters for rounding (sampling positions, floors),
so both pick the same bilinear taps; sums may round differently (float32 tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import optvis as ov

F32 = np.float32
STATE_SUFFIX = "_next"


class Emitter:
    """Collects forward nodes and initializers under one name prefix."""

    def __init__(self, prefix: str = "fv") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs) -> str:
        return self.multi(op_type, inputs, 1, [out] if out else None, **attrs)[0]

    def multi(self, op_type, inputs, n_out, outs=None, **attrs) -> list[str]:
        outs = outs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs)
        )
        return outs

    def const(self, array, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def f(self, value: float) -> str:
        return self.const(np.array(value, dtype=F32), "k")

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), dtype=np.int64), "i")

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", [x, self.ints(shape)])


# ----------------------------------------------------------------------------- matrices


def irfft2_matrices(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q [2*(w//2+1), 2w], P [h, 2h]) with irfft2(z, ortho) / 4 = P @ reshape(z2 @ Q, [2h, w]).

    z2 [h, 2*(w//2+1)] holds (real, imag) pairs. z2 @ Q = [Tr | Ti], T = the c2r-weighted inverse
    transform of each row along the columns (weight 1 for DC and Nyquist, whose imaginary parts
    then drop out with sin 0, 2 otherwise); reshaped to [2h, w], row 2j + c is Tr (c=0) or Ti
    (c=1) of row j, and P[r, 2j + c] = (cos, -sin)(2 pi j r / h) / (4 sqrt(h)) takes the real
    part of the inverse transform along the rows.
    """
    w2 = w // 2 + 1
    k = np.arange(w2)[:, None]
    n = np.arange(w)[None, :]
    weight = np.full((w2, 1), 2.0)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    theta = 2 * np.pi * k * n / w
    cos, sin = weight * np.cos(theta) / np.sqrt(w), weight * np.sin(theta) / np.sqrt(w)
    q = np.zeros((2 * w2, 2 * w))
    q[0::2, :w], q[1::2, :w] = cos, -sin  # Tr = A cos - B sin
    q[0::2, w:], q[1::2, w:] = sin, cos  # Ti = A sin + B cos
    r = np.arange(h)[:, None]
    j = np.arange(h)[None, :]
    phi = 2 * np.pi * r * j / h
    p = np.zeros((h, 2 * h))
    p[:, 0::2] = np.cos(phi) / (ov.FFT_MAGIC * np.sqrt(h))
    p[:, 1::2] = -np.sin(phi) / (ov.FFT_MAGIC * np.sqrt(h))
    return q.astype(F32), p.astype(F32)


def resize_pair(in_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(Rh [H, h], RwT [w, W]): resize(x) = Rh @ x @ RwT (optvis.resize, align_corners)."""
    rh = ov.resize_matrix(in_size[0], out_size[0]).astype(F32)
    rw = ov.resize_matrix(in_size[1], out_size[1]).astype(F32)
    return rh, np.ascontiguousarray(rw.T)


# ----------------------------------------------------------------------------- forward pieces


def fourier_image(e: Emitter, spectrum: str, batch: int, size: int, decay_power: float = 1.0):
    """optvis.FourierImage.forward: [B,3,S,S//2+1,2] -> sigmoid(colour(irfft2(scale z) / 4))."""
    w2 = size // 2 + 1
    scale = ov.fft_scale(size, size, decay_power)
    scale2 = np.repeat(scale, 2, axis=1).astype(F32)  # one factor for (real, imag)
    q, p = irfft2_matrices(size, size)
    z = e.op("Mul", [e.reshape(spectrum, [batch, 3, size, 2 * w2]), e.const(scale2, "fft_scale")])
    t = e.reshape(e.op("MatMul", [z, e.const(q, "irfft_cols")]), [batch, 3, 2 * size, size])
    x = e.op("MatMul", [e.const(p, "ifft_rows"), t])
    colour = ov.COLOR_MATRIX.astype(F32).reshape(3, 3, 1, 1)
    x = e.op("Conv", [x, e.const(colour, "colour")], kernel_shape=[1, 1])
    return e.op("Sigmoid", [x])


def normalize(e: Emitter, x: str, norm: ov.Normalization) -> str:
    gain, shift = norm._coef(F32)
    return e.op("Sub", [e.op("Mul", [x, e.const(gain, "gain")]), e.const(shift, "shift")])


def resize(e: Emitter, x: str, in_size, out_size) -> str:
    """Separable bilinear resize as two MatMuls (along W first, as optvis.resize)."""
    if tuple(in_size) == tuple(out_size):
        return x
    rh, rwt = resize_pair(tuple(in_size), tuple(out_size))
    t = e.op("MatMul", [x, e.const(rwt, "resize_w")])
    return e.op("MatMul", [e.const(rh, "resize_h"), t])


def _inside(e: Emitter, v: str, lo, hi) -> str:
    """1.0 where the integer-valued float v lies in [lo, hi], else 0.0 (float arithmetic only).

    lo/hi: floats or tensor names (broadcasting)."""
    lo = e.f(lo) if not isinstance(lo, str) else lo
    hi = e.f(hi) if not isinstance(hi, str) else hi
    one = e.f(1.0)
    above = e.op("Add", [e.op("Sub", [v, lo]), one])  # >= 1 inside
    below = e.op("Add", [e.op("Sub", [hi, v]), one])
    return e.op("Clip", [e.op("Min", [above, below]), e.f(0.0), one])


def random_transform(e: Emitter, image: str, draw: str, batch: int, size: int,
                     out_size: tuple[int, int], norm: ov.Normalization) -> str:
    """optvis.Transforms.forward for one step's draws [B, 6] (jitter1 y/x, cos, sin, jitter2
    y/x): pad, jitter, scale x rotate and jitter as one four-tap Gather, then resize, normalize.

    The resampling reads the padded, jittered canvas (size c1 = S + 2 PAD - JITTER1) at
    c + R (p + jitter2 - c) (the centre c of that canvas); a tap outside the canvas or inside
    the pad reads the fill (0 after subtracting it), so its weight is masked to 0.
    """
    c1 = size + 2 * ov.PAD - ov.JITTER1
    c2 = c1 - ov.JITTER2
    centre = (c1 - 1) / 2.0
    n_out = c2 * c2
    parts = e.multi("Split", [draw, e.ints([1] * 6)], 6, axis=1)  # [B, 1] each
    off1y, off1x, cos, sin, off2y, off2x = parts
    rows, cols = np.meshgrid(np.arange(c2), np.arange(c2), indexing="ij")
    grid_y = e.const(rows.reshape(1, n_out).astype(F32), "grid_y")
    grid_x = e.const(cols.reshape(1, n_out).astype(F32), "grid_x")
    ctr = e.f(centre)
    dy = e.op("Sub", [e.op("Add", [grid_y, off2y]), ctr])  # [B, N]: integers - centre, exact
    dx = e.op("Sub", [e.op("Add", [grid_x, off2x]), ctr])
    # the order of optvis.affine_sampling: (c + cos dy) - sin dx, (c + sin dy) + cos dx
    src_y = e.op("Sub", [e.op("Add", [ctr, e.op("Mul", [cos, dy])]), e.op("Mul", [sin, dx])])
    src_x = e.op("Add", [e.op("Add", [ctr, e.op("Mul", [sin, dy])]), e.op("Mul", [cos, dx])])
    lo, hi = e.f(-1.0), e.f(float(c1))
    taps = []
    for src, off in ((src_y, off1y), (src_x, off1x)):
        pos = e.op("Clip", [src, lo, hi])
        first = e.op("Floor", [pos])
        frac = e.op("Sub", [pos, first])
        weights = (e.op("Sub", [e.f(1.0), frac]), frac)
        ends = []
        for k, where in enumerate((first, e.op("Add", [first, e.f(1.0)]))):
            # image coordinate: canvas position + jitter - pad; valid inside canvas and image
            img = e.op("Add", [where, e.op("Sub", [off, e.f(float(ov.PAD))])])
            valid = e.op("Mul", [_inside(e, where, 0.0, c1 - 1), _inside(e, img, 0.0, size - 1)])
            ends.append((e.op("Mul", [weights[k], valid]),
                         e.op("Clip", [img, e.f(0.0), e.f(float(size - 1))])))
        taps.append(ends)
    base = e.const((np.arange(batch) * size * size).reshape(batch, 1).astype(F32), "item_base")
    index_parts, weight_parts = [], []
    for wy, iy in taps[0]:
        row = e.op("Add", [base, e.op("Mul", [iy, e.f(float(size))])])
        for wx, ix in taps[1]:
            index_parts.append(e.op("Unsqueeze", [e.op("Add", [row, ix]), e.ints([0])]))
            weight_parts.append(e.op("Unsqueeze", [e.op("Mul", [wy, wx]), e.ints([0])]))
    index = e.op("Cast", [e.op("Concat", index_parts, axis=0)], to=TensorProto.INT64)  # [4,B,N]
    weight = e.op("Unsqueeze", [e.op("Concat", weight_parts, axis=0), e.ints([3])])  # [4,B,N,1]
    centred = e.op("Sub", [image, e.f(ov.FILL)])
    pixels = e.reshape(e.op("Transpose", [centred], perm=[0, 2, 3, 1]), [batch * size * size, 3])
    gathered = e.op("Gather", [pixels, index], axis=0)  # [4, B, N, 3]
    summed = e.op("ReduceSum", [e.op("Mul", [gathered, weight]), e.ints([0])], keepdims=0)
    canvas = e.op("Transpose", [e.reshape(summed, [batch, c2, c2, 3])], perm=[0, 3, 1, 2])
    canvas = e.op("Add", [canvas, e.f(ov.FILL)])
    return normalize(e, resize(e, canvas, (c2, c2), out_size), norm)


# ----------------------------------------------------------------------------- composition


def compose(cut: onnx.ModelProto, e: Emitter, image: str, inputs: list[onnx.ValueInfoProto],
            outputs: list[str]) -> onnx.ModelProto:
    """The emitted prelude feeding `cut`'s image input, as one model with `outputs`."""
    from ..graph import input_name

    model_input = input_name(cut)
    out = onnx.ModelProto()
    out.CopyFrom(cut)
    g = out.graph
    kept_inputs = [i for i in g.input if i.name != model_input]
    nodes = list(e.nodes) + [helper.make_node("Identity", [image], [model_input], name="fv/in")]
    nodes += list(g.node)
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("input")
    g.input.extend(list(inputs) + kept_inputs)
    g.initializer.extend(e.inits)
    g.ClearField("value_info")
    g.ClearField("output")
    g.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    return out


def _value(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


@dataclass
class StepSpec:
    """What the runner needs to know about a step graph: its state and constant inputs."""

    model: onnx.ModelProto
    state: dict[str, tuple[tuple[int, ...], type]]  # input name -> (shape, dtype); output: +_next
    constants: dict[str, tuple[tuple[int, ...], type]]


def _type_outputs(m: onnx.ModelProto, state: dict) -> None:
    by_name = {i.name: i for i in m.graph.input}
    fixed = []
    for o in m.graph.output:
        src = by_name.get(o.name[: -len(STATE_SUFFIX)]) if o.name.endswith(STATE_SUFFIX) else None
        if src is not None:
            fixed.append(helper.make_tensor_value_info(o.name, src.type.tensor_type.elem_type,
                                                       None))
        else:
            fixed.append(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, None))
    m.graph.ClearField("output")
    m.graph.output.extend(fixed)


def op_types(model: onnx.ModelProto) -> list[str]:
    """The op types a graph uses (sorted), e.g. to check them against the CUDA kernel list."""
    return sorted({n.op_type for n in model.graph.node})


# ----------------------------------------------------------------------------- any objective


@dataclass
class ObjectiveGraphs:
    """The step and evaluation graphs of one objective structure (`objectives.signature`)."""

    step: StepSpec
    evaluation: onnx.ModelProto
    tables: dict[str, tuple[int, ...]]  # the objective's parameter inputs (name -> shape)
    terms: int


def objective_forward(cut: onnx.ModelProto, objectives, mode: str, batch: int, steps: int,
                      size: int, input_hw: tuple[int, int], norm: ov.Normalization,
                      tensors: dict[str, str], shapes: dict[str, tuple[int, ...]],
                      redirect: dict[str, str] | None, evaluate: bool = False
                      ) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """The forward graph: parameters -> picture -> (lucent, not `evaluate`: this step's random
    transforms) -> model -> the objective (`objectives.emit`). Outputs fv:loss, fv:values,
    fv:terms (+ fv:image, lucent evaluation). Returns (model, table inputs)."""
    from . import objectives as ob

    e = Emitter("fv")
    n_terms = len(objectives[0].terms)
    inputs = []
    if mode == "lucent":
        w2 = size // 2 + 1
        inputs.append(_value("fv:spectrum", TensorProto.FLOAT, (batch, 3, size, w2, 2)))
        image = fourier_image(e, "fv:spectrum", batch, size)
        picture, pshape = image, (batch, 3, size, size)
        if evaluate:
            x = normalize(e, resize(e, image, (size, size), input_hw), norm)
        else:
            inputs.append(_value("fv:draws", TensorProto.FLOAT, (batch, steps, 6)))
            draw = e.op("Gather", ["fv:draws", "fv:step"], axis=1)  # [B, 6]
            x = random_transform(e, image, draw, batch, size, input_hw, norm)
    else:
        inputs.append(_value("fv:x", TensorProto.FLOAT, (batch, 3, *input_hw)))
        picture, pshape = "fv:x", (batch, 3, *input_hw)
        x = normalize(e, "fv:x", norm)
    on = None
    if not evaluate:
        inputs.append(_value("fv:step", TensorProto.INT64, ()))
        if redirect:  # redirected in the first steps and while the term's value is <= 0
            inputs.append(_value("fv:prev", TensorProto.FLOAT, (batch, n_terms)))
            early = e.op("Cast", [e.op("Less", ["fv:step", e.const(np.array(16, np.int64),
                                                                   "redir")])],
                         to=TensorProto.FLOAT)
            dead = e.op("Cast", [e.op("LessOrEqual", ["fv:prev", e.f(0.0)])],
                        to=TensorProto.FLOAT)
            on = e.op("Max", [dead, early])
    inputs.append(_value("fv:live", TensorProto.FLOAT, (batch,)))
    e2 = Emitter("fv/objective")
    em = ob.emit(e2, objectives, batch, tensors, shapes, picture, pshape,
                 redirect=redirect if on else None, redirect_on=on, live="fv:live")
    outputs = ["fv:loss", "fv:values", "fv:terms"]
    for src, dst in zip((em.loss, em.values, em.terms), outputs, strict=True):
        e2.op("Identity", [src], out=dst)
    if mode == "lucent" and evaluate:
        e2.op("Identity", [picture], out="fv:image")
        outputs.append("fv:image")
    inputs += [_value(n, TensorProto.FLOAT, s) for n, s in em.inputs.items()]
    m = compose(cut, e, x, inputs, outputs)
    m.graph.node.extend(e2.nodes)
    m.graph.initializer.extend(e2.inits)
    return m, em.inputs


def objective_graphs(cut: onnx.ModelProto, objectives, mode: str, batch: int, steps: int,
                     size: int, input_hw: tuple[int, int], norm: ov.Normalization, lr: float,
                     tensors: dict[str, str], shapes: dict[str, tuple[int, ...]],
                     redirect: dict[str, str] | None, norm_bound: float | None = None,
                     opset: int = 17, betas=(0.9, 0.999), eps: float = 1e-8) -> ObjectiveGraphs:
    """One step of ascent on the objective (lucent: Adam on the spectrum; seed: the normalized
    step on the picture) and the untransformed evaluation, as ONNX graphs.

    The gradient is the engine's vjp of fv:loss (seeded with ones: each item ascends its own
    objective; diversity couples the items) through the objective, the model, the transforms
    and the parameterization. State: parameters (+ Adam's m, v), step, prev terms, curves of
    the total [B, steps] and of every term [B, T, steps]."""
    from ..autodiff import vjp
    from ..autodiff.prepare import eliminate_dead_nodes, sort_topologically

    n_terms = len(objectives[0].terms)
    fwd, table_shapes = objective_forward(cut, objectives, mode, batch, steps, size, input_hw,
                                          norm, tensors, shapes, redirect)
    param = "fv:spectrum" if mode == "lucent" else "fv:x"
    pshape = (batch, 3, size, size // 2 + 1, 2) if mode == "lucent" else (batch, 3, *input_hw)
    m = vjp(fwd, wrt=[param], seed_outputs=["fv:loss"], batch=batch)
    e = Emitter("fv/step")
    g = m.graph
    e.op("Identity", [e.const(np.ones(batch, F32), "ones")], out="seed:fv:loss")
    grad = f"grad:{param}"
    state: dict[str, tuple[tuple[int, ...], type]] = {param: (pshape, F32)}
    if mode == "lucent":
        b1, b2 = betas
        bias = e.op("Gather", ["fv:bias", "fv:step"], axis=0)  # [2]: 1 - b1^t, 1 - b2^t
        c1, c2 = e.multi("Split", [bias, e.ints([1, 1])], 2, axis=0)
        ascent = e.op("Neg", [grad])  # Adam descends on -g
        m_new = e.op("Add", [e.op("Mul", [e.f(b1), "fv:m"]), e.op("Mul", [e.f(1 - b1), ascent])],
                     out="fv:m" + STATE_SUFFIX)
        v_new = e.op("Add", [e.op("Mul", [e.f(b2), "fv:v"]),
                             e.op("Mul", [e.op("Mul", [e.f(1 - b2), ascent]), ascent])],
                     out="fv:v" + STATE_SUFFIX)
        update = e.op("Div", [e.op("Mul", [e.f(lr), e.op("Div", [m_new, c1])]),
                              e.op("Add", [e.op("Sqrt", [e.op("Div", [v_new, c2])]), e.f(eps)])])
        new = e.op("Sub", [param, update])
        state.update({"fv:m": (pshape, F32), "fv:v": (pshape, F32)})
        constants = {"fv:draws": ((batch, steps, 6), F32), "fv:bias": ((steps, 2), F32)}
    else:
        axes = e.ints([1, 2, 3])
        square = e.op("Mul", [grad, grad])
        if opset >= 18:
            mean = e.op("ReduceMean", [square, axes], keepdims=1)
        else:
            mean = e.op("ReduceMean", [square], axes=[1, 2, 3], keepdims=1)
        rms = e.op("Sqrt", [mean])
        new = e.op("Add", [param, e.op("Mul", [e.op("Div", [grad, e.op("Add", [rms, e.f(1e-5)])]),
                                               e.f(lr)])])
        if norm_bound is not None:
            length = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [new, new]), axes],
                                        keepdims=1)])
            factor = e.op("Min", [e.f(1.0), e.op("Div", [e.f(norm_bound),
                                                       e.op("Max", [length, e.f(1e-12)])])])
            new = e.op("Mul", [new, factor])
        constants = {}
    e.op("Identity", [new], out=param + STATE_SUFFIX)
    step, prev, curves, tcurves = "fv:step", "fv:prev", "fv:curves", "fv:term_curves"
    column = e.op("Cast", [e.op("Equal", [e.const(np.arange(steps, dtype=np.int64), "cols"),
                                          step])], to=TensorProto.FLOAT)
    e.op("Add", [curves, e.op("Mul", [e.reshape("fv:values", [batch, 1]), column])],
         out=curves + STATE_SUFFIX)
    e.op("Add", [tcurves, e.op("Mul", [e.reshape("fv:terms", [batch, n_terms, 1]), column])],
         out=tcurves + STATE_SUFFIX)
    e.op("Identity", ["fv:terms"], out=prev + STATE_SUFFIX)
    e.op("Add", [step, e.const(np.array(1, np.int64), "one")], out=step + STATE_SUFFIX)
    g.node.extend(e.nodes)
    g.initializer.extend(e.inits)
    state.update({step: ((), np.int64), prev: ((batch, n_terms), F32),
                  curves: ((batch, steps), F32), tcurves: ((batch, n_terms, steps), F32)})
    constants.update({"fv:live": ((batch,), F32)})
    constants.update({n: (s, F32) for n, s in table_shapes.items()})
    keep = [i for i in g.input if i.name != "seed:fv:loss"]
    g.ClearField("input")
    g.input.extend(keep)
    names = {i.name for i in g.input}
    for name, (shape, dtype) in list(state.items()) + list(constants.items()):
        if name not in names:
            g.input.append(_value(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
    outs = [n + STATE_SUFFIX for n in state] + ["fv:values"]
    g.ClearField("output")
    g.output.extend(helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs)
    sort_topologically(g)
    eliminate_dead_nodes(g, set(outs))
    _type_outputs(m, state)
    # an input the step no longer reads (prev without redirect) stays bound: keep it declared
    evaluation, _ = objective_forward(cut, objectives, mode, batch, steps, size, input_hw, norm,
                                      tensors, shapes, None, evaluate=True)
    outputs = {o.name for o in evaluation.graph.output} - {"fv:loss"}
    kept = [o for o in evaluation.graph.output if o.name in outputs]
    evaluation.graph.ClearField("output")
    evaluation.graph.output.extend(kept)
    eliminate_dead_nodes(evaluation.graph, outputs)
    return ObjectiveGraphs(StepSpec(m, state, constants), evaluation, table_shapes, n_terms)
