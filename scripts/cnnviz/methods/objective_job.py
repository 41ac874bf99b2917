"""Run any objective (`objectives`) as feature visualization: one graph per structure.

`ObjectiveJob` builds the step and evaluation graphs of `optvis_graph.objective_graphs` for
one model, objective structure, mode and batch, and runs a batch of objectives with the state on
the device (`loop`). Filter pictures are the case `channel(layer, c)` per item
(`optimize_filters` runs them here), class models `class_logit(k)` (+ diversity).

Layer names in the objectives are graph tensor names here; `resolve` maps the config's layer
names (model.json) and `logits` to tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph import cut_at
from . import objectives as ob
from . import optvis as ov
from .filters import (
    GRAPH_OPSET,
    PARAM_SIZE,
    SEED_NOISE,
    NotAGraphCase,
    adam_bias,
    filter_rng,
    model_opset,
    pre_activation,
    transform_table,
)


def logits_tensor(model: onnx.ModelProto) -> str:
    """The model's logits: its first output, or the input of the final Softmax making it."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        if out in node.output and node.op_type in ("Softmax", "LogSoftmax"):
            return node.input[0]
    return out


def resolve(objective: ob.Objective, card: dict, model: onnx.ModelProto) -> ob.Objective:
    """Config layer names -> graph tensors (model.json's layer table; a tensor name passes)."""
    from ..modelcard import find_layer

    def tensor(layer: str) -> str:
        if layer == ob.LOGITS:
            return logits_tensor(model)
        return find_layer(card, layer)["tensor"]

    return objective.with_layers(tensor)


@dataclass
class ObjectiveResult:
    """One row per objective."""

    objectives: list[ob.Objective]
    images: np.ndarray  # [n, H, W, 3]: lucent's picture, or seed mode's optimized input
    curves: np.ndarray  # [n, steps] the total objective seen at each step (before its update)
    term_curves: np.ndarray  # [n, T, steps] every term at each step
    start: np.ndarray  # [n] the total on the start picture, untransformed
    final: np.ndarray  # [n] the total on the final picture, untransformed
    final_terms: np.ndarray  # [n, T]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class ObjectiveJob:
    """The graphs of one objective structure as sessions; `run_objectives` optimizes a batch.
    `per_filter` (channel -> objective; default channel(layer, c)) serves `run`.

    The state is bound once as device buffers (ONNX Runtime I/O binding on the session's
    device), two bindings swap the input and output buffers, so a step is one
    `run_with_iobinding`, and nothing crosses to the host until the end (the curves are state
    too). The random draws of all steps are one [B, steps, 6] input.
    """

    per_filter: Callable[[int], ob.Objective] | None = None

    def __init__(self, model: onnx.ModelProto, objectives: Sequence[ob.Objective], batch: int,
                 *, mode: str, steps: int, lr: float, norm: ov.Normalization,
                 param_size: int = PARAM_SIZE, norm_bound: float | None = None,
                 device: str = "auto", threads: int | None = None):
        from ..autodiff.prepare import prepare, static_shapes
        from ..graph import input_name
        from ..runtime import make_session
        from . import optvis_graph as og

        ob.check_batch(objectives)
        if mode == "lucent" and model_opset(model) < GRAPH_OPSET:
            raise ConfigError(
                f"lucent mode differentiates its random transforms with ScatterElements(add), "
                f"opset >= {GRAPH_OPSET}; the model has opset {model_opset(model)}: re-export "
                "it at a newer opset, or use mode seed"
            )
        self.template = objectives[0]
        self.batch, self.mode, self.steps = batch, mode, steps
        tensors = {layer: (logits_tensor(model) if layer == ob.LOGITS else layer)
                   for layer in self.template.layers()}
        cut = cut_at(model, list(dict.fromkeys(tensors.values())))
        shapes = static_shapes(prepare(cut, batch).graph)
        self.input_shape = tuple(int(d) for d in shapes[input_name(cut)][1:])
        self.shapes = {layer: tuple(int(d) for d in shapes[t][1:]) for layer, t in tensors.items()}
        linear = {t.layer for _, t in self.template.terms if t.kind in ob.LINEAR}
        for layer in linear | {t.layer for _, t in self.template.terms if t.kind == "diversity"}:
            if len(self.shapes[layer]) != 3:
                raise NotAGraphCase(f"{layer!r} has shape {self.shapes[layer]}, not [C, H, W]")
        first = next((t.layer for _, t in self.template.terms if t.kind in ob.LINEAR), None)
        self.layer_shape = self.shapes[first] if first else ()
        redirect = {layer: pre for layer in linear
                    if (pre := pre_activation(model, tensors[layer])) is not None}
        hw = tuple(self.input_shape[1:])
        self.size = min(param_size, *hw)
        self.graphs = og.objective_graphs(cut, objectives, mode, batch, steps, self.size, hw,
                                          norm, lr, tensors, self.shapes, redirect, norm_bound,
                                          model_opset(model))
        self.spec = self.graphs.step
        self.eval_graph = self.graphs.evaluation
        self.norm_bound = norm_bound
        self.session = make_session(self.spec.model, device, threads)
        self.eval_session = make_session(self.eval_graph, device, threads)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _pad(self, a: np.ndarray) -> np.ndarray:
        """Fill a chunk up to the graph's batch with copies of its first item."""
        if len(a) == self.batch:
            return np.ascontiguousarray(a)
        extra = np.repeat(a[:1], self.batch - len(a), axis=0)
        return np.ascontiguousarray(np.concatenate([a, extra]))

    def loop(self, state: dict[str, np.ndarray], constants: dict[str, np.ndarray],
             steps: int) -> dict[str, np.ndarray]:
        """`steps` runs of the step graph with its state on the device; the final state."""
        import onnxruntime as ort

        alive = []  # on the CPU an OrtValue wraps the numpy buffer: keep the arrays alive

        def put(a: np.ndarray):
            alive.append(np.array(a, order="C"))
            return ort.OrtValue.ortvalue_from_numpy(alive[-1], self.device, 0)

        buffers = {n: (put(a), put(np.zeros_like(a))) for n, a in state.items()}
        fixed = {n: put(a) for n, a in constants.items()}
        values = put(np.zeros(self.batch, dtype=np.float32))
        bindings = []
        for parity in (0, 1):
            io = self.session.io_binding()
            for n, v in fixed.items():
                io.bind_ortvalue_input(n, v)
            for n, pair in buffers.items():
                io.bind_ortvalue_input(n, pair[parity])
                io.bind_ortvalue_output(n + "_next", pair[1 - parity])
            io.bind_ortvalue_output("fv:values", values)
            bindings.append(io)
        for k in range(steps):
            self.session.run_with_iobinding(bindings[k % 2])
        final = {n: pair[steps % 2].numpy().copy() for n, pair in buffers.items()}
        alive.clear()  # the device buffers are not read again
        return final

    def initial_state(self, steps: int) -> dict[str, np.ndarray]:
        """The step counter, the last terms (redirection) and the curves, all zero."""
        t = self.graphs.terms
        return {"fv:step": np.array(0, dtype=np.int64),
                "fv:prev": np.zeros((self.batch, t), np.float32),
                "fv:curves": np.zeros((self.batch, steps), np.float32),
                "fv:term_curves": np.zeros((self.batch, t, steps), np.float32)}

    def constants(self, objectives: Sequence[ob.Objective]) -> dict[str, np.ndarray]:
        tables = ob.tables(objectives, self.batch, self.shapes)
        live = np.zeros(self.batch, np.float32)
        live[: len(objectives)] = 1.0
        return {"fv:live": live, **{f"fv:{k}": v for k, v in tables.items()}}

    def evaluate_state(self, param: np.ndarray, consts: dict[str, np.ndarray]) -> dict:
        name = "fv:spectrum" if self.mode == "lucent" else "fv:x"
        feeds = {i.name: consts[i.name] for i in self.eval_session.get_inputs()
                 if i.name in consts}
        outs = self.eval_session.run(None, {name: param, **feeds})
        return dict(zip([o.name for o in self.eval_session.get_outputs()], outs, strict=True))

    def run_objectives(self, objectives: Sequence[ob.Objective],
                       rngs: Sequence[np.random.Generator], steps: int
                       ) -> tuple[np.ndarray, ...]:
        """Optimize one batch (<= batch objectives, one random stream each): (images HWC,
        curves [n, steps], term curves [n, T, steps], start [n], final [n], final terms)."""
        n = len(objectives)
        if n > self.batch or len(rngs) != n:
            raise ValueError(f"{n} objectives, {len(rngs)} streams for a batch of {self.batch}")
        consts = self.constants(objectives)
        state = self.initial_state(steps)
        if self.mode == "lucent":
            param = ov.FourierImage(self.size, self.size)
            spectrum = self._pad(np.stack([param.init(r) for r in rngs]))
            draws = self._pad(np.stack([transform_table(r, steps) for r in rngs]))
            start = self.evaluate_state(spectrum, consts)["fv:values"]
            state.update({"fv:spectrum": spectrum, "fv:m": np.zeros_like(spectrum),
                          "fv:v": np.zeros_like(spectrum)})
            consts.update({"fv:draws": draws, "fv:bias": adam_bias(steps)})
            out = self.loop(state, consts, steps)
            final = self.evaluate_state(out["fv:spectrum"], consts)
            images = final["fv:image"][:n].transpose(0, 2, 3, 1)
        else:
            x = np.stack([0.5 + (r.random(self.input_shape) - 0.5) * 2 * SEED_NOISE
                          for r in rngs]).astype(np.float32)
            if self.norm_bound is not None:
                x = ov.project_ball(x, self.norm_bound)
            state["fv:x"] = self._pad(x)
            out = self.loop(state, consts, steps)
            final = self.evaluate_state(out["fv:x"], consts)
            start = out["fv:curves"][:, 0]
            images = out["fv:x"][:n].transpose(0, 2, 3, 1)
        f64 = np.float64
        return (images, out["fv:curves"][:n].astype(f64), out["fv:term_curves"][:n].astype(f64),
                np.asarray(start)[:n].astype(f64), final["fv:values"][:n].astype(f64),
                final["fv:terms"][:n].astype(f64))

    def run(self, channels, steps, lr, seed, norm, param_size, norm_bound):
        """One filter chunk for `filters.optimize_filters`: `per_filter(c)` per item, the
        filter's own stream (`filter_rng(seed, c)`): (images HWC, curves, start, final)."""
        make = self.per_filter or (lambda c: ob.channel(self.template.terms[0][1].layer, c))
        objectives = [make(c) for c in channels]
        images, curves, _, start, final, _ = self.run_objectives(
            objectives, [filter_rng(seed, c) for c in channels], steps)
        return images, curves, start, final


def optimize(model: onnx.ModelProto, objectives: Sequence[ob.Objective], *, mode: str = "lucent",
             steps: int = 256, lr: float | None = None, seed: int = 0,
             preprocess: dict | None = None, param_size: int = PARAM_SIZE,
             norm_bound: float | None = None, device: str = "auto",
             threads: int | None = None) -> ObjectiveResult:
    """Maximize each objective (graph tensor names) as one batch; item i draws its start and
    transforms from `filter_rng(seed, i)`. Diversity terms compare the pictures of this batch."""
    from .filters import LUCENT_LR, MODES, SEED_STEP

    if mode not in MODES:
        raise ConfigError(f"visualization mode {mode!r} is not one of {', '.join(MODES)}")
    if steps < 1:
        raise ConfigError(f"feature visualization needs steps >= 1, got {steps}")
    objectives = list(objectives)
    started = time.perf_counter()
    step = lr if lr is not None else (LUCENT_LR if mode == "lucent" else SEED_STEP)
    norm = ov.Normalization.from_preprocess(preprocess or {})
    job = ObjectiveJob(model, objectives, len(objectives), mode=mode, steps=steps, lr=step,
                       norm=norm, param_size=param_size, norm_bound=norm_bound, device=device,
                       threads=threads)
    images, curves, tcurves, start, final, fterms = job.run_objectives(
        objectives, [filter_rng(seed, i) for i in range(len(objectives))], steps)
    if mode == "seed":
        images = ov.deprocess(images)
    return ObjectiveResult(objectives, images.astype(np.float32), curves, tcurves, start, final,
                           fterms, time.perf_counter() - started,
                           {"providers": job.providers, "lr": step, "mode": mode,
                            "input_shape": list(job.input_shape)})
