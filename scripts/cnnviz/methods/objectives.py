"""Objectives as values: what feature visualization maximizes, composed like lucent's.

An `Objective` is a weighted sum of terms; terms are built by

    channel(layer, c)            spatial mean of channel c of the layer's tensor
    neuron(layer, c, y, x)       one unit (default: the centre; lucent's pick for even sizes)
    direction(layer, vector)     spatial mean of <vector, a(y, x)> (lucid's dot product, not cosine)
    class_logit(k)               logit k (the input of a final Softmax when the model has one)
    diversity(layer)             per picture: minus the mean cosine of its Gram matrix at the layer
                                 with the other pictures' (lucent/lucid's diversity; identical
                                 pictures give -1, so the batch mean is minus the mean pairwise
                                 cosine)
    total_variation()            sum of absolute neighbour differences of the [0, 1] picture

and combined with `+`, `-`, scalar `*` and `/`, and unary `-`. Everything is MAXIMIZED (lucent
minimizes losses that are these values negated; its diversity keeps lucid's maximization sign, so
lucent's `channel - k * diversity` is `channel + k * diversity` here), e.g.

    channel("features.10", 3) + 0.1 * diversity("features.10") - 1e-4 * total_variation()

The same objectives are written in the config (`filters.objective`, `parse`): numbers, the six
names, `+ - * /`, parentheses; layer names may be bare (features.10) or quoted. No eval.

A batch of pictures runs one graph: item i maximizes objective i; all items share the
*structure* (which kinds at which layers with which weights, `signature`) and differ only in their
parameters (channel index, position, vector, class), fed as tables. `emit` writes the value of
every term and the total as ONNX nodes behind the model, so the whole objective is inside the one
graph the optimizer differentiates (`optvis_graph.objective_step`); `evaluate` is its numpy
definition, used by the tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

KINDS = ("channel", "neuron", "direction", "class_logit", "diversity", "total_variation")
LINEAR = ("channel", "neuron", "direction")  # linear in one layer's activation
LOGITS = "logits"  # the pseudo layer of class_logit


def _num(v: float) -> str:
    """The shortest text that reads back as the same float (2 for 2.0)."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


@dataclass(frozen=True)
class Term:
    """One term; `layer` is a layer name (or a graph tensor name in the Python API)."""

    kind: str
    layer: str = ""
    channel: int = 0
    y: int | None = None
    x: int | None = None
    vector: tuple[float, ...] = ()
    cls: int = 0

    def text(self) -> str:
        if self.kind == "channel":
            return f"channel({self.layer}, {self.channel})"
        if self.kind == "neuron":
            where = "" if self.y is None else f", {self.y}, {self.x}"
            return f"neuron({self.layer}, {self.channel}{where})"
        if self.kind == "direction":
            return f"direction({self.layer}, [{', '.join(_num(v) for v in self.vector)}])"
        if self.kind == "class_logit":
            return f"class_logit({self.cls})"
        if self.kind == "diversity":
            return f"diversity({self.layer})"
        return "total_variation()"


@dataclass(frozen=True)
class Objective:
    """sum(weight * term); equal terms are merged, zero weights dropped."""

    terms: tuple[tuple[float, Term], ...]

    @staticmethod
    def of(pairs: Sequence[tuple[float, Term]]) -> Objective:
        merged: dict[Term, float] = {}
        for w, t in pairs:
            merged[t] = merged.get(t, 0.0) + float(w)
        return Objective(tuple((w, t) for t, w in merged.items() if w != 0.0))

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, int | float) and other == 0:
            return self  # sum([...]) starts at 0
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective.of(self.terms + other.terms)

    __radd__ = __add__

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, int | float):
            return NotImplemented
        return Objective.of([(w * k, t) for w, t in self.terms])

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Objective:
        return self * (1.0 / k)

    def text(self) -> str:
        """The config syntax of this objective (parse(o.text()) == o)."""
        out = ""
        for w, t in self.terms:
            sign = "-" if w < 0 else "+"
            mag = abs(w)
            body = t.text() if mag == 1.0 else f"{_num(mag)} * {t.text()}"
            out += (f"{'-' if sign == '-' else ''}{body}" if not out else f" {sign} {body}")
        return out or "0"

    def signature(self) -> tuple[tuple[str, str, float], ...]:
        """What a batch must share: (kind, layer, weight) per term, in order."""
        return tuple((t.kind, t.layer, w) for w, t in self.terms)

    def layers(self) -> list[str]:
        return list(dict.fromkeys(t.layer for _, t in self.terms if t.layer))

    def with_layers(self, rename: Callable[[str], str]) -> Objective:
        """The same objective with every layer name mapped (config names -> graph tensors)."""
        from dataclasses import replace

        return Objective(tuple((w, replace(t, layer=rename(t.layer)) if t.layer else t)
                               for w, t in self.terms))


def _one(term: Term) -> Objective:
    return Objective(((1.0, term),))


def channel(layer: str, c: int) -> Objective:
    return _one(Term("channel", layer, channel=int(c)))


def neuron(layer: str, c: int, y: int | None = None, x: int | None = None) -> Objective:
    if (y is None) != (x is None):
        raise ConfigError("neuron(layer, c, y, x): give both y and x, or neither (the centre)")
    return _one(Term("neuron", layer, channel=int(c), y=None if y is None else int(y),
                     x=None if x is None else int(x)))


def direction(layer: str, vector: Sequence[float]) -> Objective:
    vec = tuple(float(v) for v in vector)
    if not vec:
        raise ConfigError("direction(layer, vector) needs a non-empty vector")
    return _one(Term("direction", layer, vector=vec))


def class_logit(k: int) -> Objective:
    return _one(Term("class_logit", LOGITS, cls=int(k)))


def diversity(layer: str) -> Objective:
    return _one(Term("diversity", layer))


def total_variation() -> Objective:
    return _one(Term("total_variation"))


# ----------------------------------------------------------------------------- the config syntax

_TOKEN = re.compile(r"""\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
    |(?P<str>"[^"]*"|'[^']*')|(?P<name>[A-Za-z_][\w./:-]*)|(?P<op>[-+*/(),\[\]]))""", re.X)
_FUNCS: dict[str, Callable[..., Objective]] = {
    "channel": channel, "neuron": neuron, "direction": direction, "class_logit": class_logit,
    "diversity": diversity, "total_variation": total_variation,
}  # fmt: skip


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ConfigError(f"objective {text!r}: cannot read {text[pos:]!r}")
        kind = m.lastgroup or "op"
        value = m.group(kind)
        out.append((kind, value[1:-1] if kind == "str" else value))
        pos = m.end()
    return out


FILTER_DEFAULT = "channel(layer, c)"  # filters.objective's meaning of a filter picture
# filters.neurons' pictures: the unit at the centre of filter c's map (lucent's neuron objective)
NEURON_OBJECTIVE = "neuron(layer, c)"


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := ('-'|'+') factor | number | call | '(' expr ')'. A value is an Objective or a
    float; products and quotients need one number."""

    def __init__(self, text: str, bindings: dict[str, str | int] | None = None):
        self.text, self.toks, self.i = text, _tokens(text), 0
        for k, (kind, value) in enumerate(self.toks):  # bound names: a layer or a number
            if kind == "name" and bindings and value in bindings:
                bound = bindings[value]
                self.toks[k] = ("str", bound) if isinstance(bound, str) else ("num", str(bound))

    def fail(self, why: str):
        raise ConfigError(f"objective {self.text!r}: {why}; write e.g. "
                          "'channel(features.10, 3) + 0.1 * diversity(features.10)'")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            self.fail(f"expected {value or 'more'} at the end" if tok is None
                      else f"expected {value!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> Objective:
        value = self.expr()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")
        if not isinstance(value, Objective):
            self.fail("a number alone is not an objective")
        return value

    def expr(self):
        value = self.term()
        while self.peek() and self.peek()[1] in "+-" and self.peek()[0] == "op":
            op = self.take()[1]
            right = self.term()
            if isinstance(value, Objective) != isinstance(right, Objective):
                self.fail("constants cannot be added to an objective")
            value = value + right if op == "+" else value - right
        return value

    def term(self):
        value = self.factor()
        while self.peek() and self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            right = self.factor()
            if isinstance(value, Objective) and isinstance(right, Objective):
                self.fail("two objectives cannot be multiplied")
            if op == "/":
                if isinstance(right, Objective):
                    self.fail("cannot divide by an objective")
                value = value / right
            else:
                value = value * right
        return value

    def factor(self):
        tok = self.take()
        if tok == ("op", "-"):
            return -self.factor()
        if tok == ("op", "+"):
            return self.factor()
        if tok == ("op", "("):
            value = self.expr()
            self.take(")")
            return value
        if tok[0] == "num":
            return float(tok[1])
        if tok[0] == "name" and tok[1] in _FUNCS:
            return self.call(tok[1])
        self.fail(f"unexpected {tok[1]!r}")

    def arg(self):
        tok = self.peek()
        if tok is None:
            self.fail("missing argument")
        if tok[1] == "[":
            self.take()
            items = []
            while self.peek() and self.peek()[1] != "]":
                items.append(self.number())
                if self.peek() and self.peek()[1] == ",":
                    self.take()
            self.take("]")
            return items
        if tok[0] in ("name", "str"):
            self.take()
            return tok[1]
        return self.number()

    def number(self) -> float:
        sign = -1.0 if self.peek() and self.peek()[1] == "-" and self.take() else 1.0
        tok = self.take()
        if tok[0] != "num":
            self.fail(f"expected a number, found {tok[1]!r}")
        return sign * float(tok[1])

    def call(self, name: str) -> Objective:
        self.take("(")
        args = []
        while self.peek() and self.peek()[1] != ")":
            args.append(self.arg())
            if self.peek() and self.peek()[1] == ",":
                self.take()
        self.take(")")
        for i, a in enumerate(args):
            if isinstance(a, float) and not (name == "direction" and i == 1):
                if a != int(a):
                    self.fail(f"{name}: argument {i + 1} must be a whole number, got {a:g}")
                args[i] = int(a)
        try:
            return _FUNCS[name](*args)
        except TypeError:
            self.fail(f"{name} takes other arguments than {args}")


def parse(text: str, bindings: dict[str, str | int] | None = None) -> Objective:
    """The objective written in the config syntax (module doc). `bindings` name values the
    text may use as arguments: `filters.objective` is parsed per filter with layer = the job's
    layer and c = the filter, so "neuron(layer, c) - 1e-3 * total_variation()" is a neuron
    picture per filter (a whole token is replaced: a layer named features.c is not touched)."""
    return _Parser(str(text), bindings).parse()


# ----------------------------------------------------------------------------- batches


def check_batch(objectives: Sequence[Objective]) -> tuple[tuple[str, str, float], ...]:
    """The shared signature of a batch, or a ConfigError naming the first that differs."""
    if not objectives:
        raise ConfigError("an objective batch needs at least one objective")
    sig = objectives[0].signature()
    for o in objectives[1:]:
        if o.signature() != sig:
            raise ConfigError(
                f"objectives {objectives[0].text()!r} and {o.text()!r} differ in structure "
                "(kinds, layers or weights); run them as separate batches"
            )
    return sig


def centre(h: int, w: int) -> tuple[int, int]:
    """lucent's default neuron position: the centre, bottom right of the middle 2x2 if even."""
    return h // 2, w // 2


def tables(objectives: Sequence[Objective], batch: int, shapes: dict[str, tuple[int, ...]]
           ) -> dict[str, np.ndarray]:
    """The per-item parameter tables of term slot j: `t{j}:chan` [B, C, 1, 1] (channel one-hot,
    or the direction), `t{j}:pos` [B, 1, H, W] (neuron one-hot), `t{j}:cls` [B, K]. Items past
    len(objectives) repeat the first (padding). `shapes`: layer -> [C, H, W] or [K]."""
    check_batch(objectives)
    items = list(objectives) + [objectives[0]] * (batch - len(objectives))
    out: dict[str, np.ndarray] = {}
    for j, (_, first) in enumerate(objectives[0].terms):
        shape = shapes[first.layer] if first.layer else ()
        if first.kind in LINEAR:
            c, h, w = shape
            chan = np.zeros((batch, c, 1, 1), np.float32)
            pos = np.zeros((batch, 1, h, w), np.float32) if first.kind == "neuron" else None
            for i, o in enumerate(items):
                t = o.terms[j][1]
                if t.kind == "direction":
                    if len(t.vector) != c:
                        raise ConfigError(f"direction at {t.layer!r}: vector has "
                                          f"{len(t.vector)} entries, the layer {c} channels")
                    chan[i, :, 0, 0] = t.vector
                    continue
                if not 0 <= t.channel < c:
                    raise ConfigError(f"{t.text()}: the layer has channels 0..{c - 1}")
                chan[i, t.channel] = 1.0
                if pos is not None:
                    y, x = (t.y, t.x) if t.y is not None else centre(h, w)
                    if not (0 <= y < h and 0 <= x < w):
                        raise ConfigError(f"{t.text()}: the layer is {h} x {w}")
                    pos[i, 0, y, x] = 1.0
            out[f"t{j}:chan"] = chan
            if pos is not None:
                out[f"t{j}:pos"] = pos
        elif first.kind == "class_logit":
            k = int(np.prod(shape))  # [K], or [K, 1, 1] from a 1x1-conv head
            cls = np.zeros((batch, k), np.float32)
            for i, o in enumerate(items):
                t = o.terms[j][1]
                if not 0 <= t.cls < k:
                    raise ConfigError(f"{t.text()}: the model has classes 0..{k - 1}")
                cls[i, t.cls] = 1.0
            out[f"t{j}:cls"] = cls
    return out


# ----------------------------------------------------------------------------- the numpy definition


def gram_cosines(acts: np.ndarray) -> np.ndarray:
    """[B, B] cosines of the items' Gram matrices (flattened) at a [B, C, H, W] activation."""
    b, c = acts.shape[:2]
    flat = acts.reshape(b, c, -1).astype(np.float64)
    grams = (flat @ flat.transpose(0, 2, 1)).reshape(b, -1)
    grams /= np.maximum(np.linalg.norm(grams, axis=1, keepdims=True), 1e-12)
    return grams @ grams.T


def evaluate(objectives: Sequence[Objective], acts: dict[str, np.ndarray],
             image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values [n], terms [n, T]) from the activations (layer -> [n, ...]; logits under
    "logits") and the [n, 3, H, W] picture in [0, 1]: the definitions `emit` must meet."""
    check_batch(objectives)
    n = len(objectives)
    terms = np.zeros((n, len(objectives[0].terms)))
    for j, (_, first) in enumerate(objectives[0].terms):
        if first.kind == "diversity":
            cos = gram_cosines(acts[first.layer])
            off = cos.sum(1) - np.diag(cos)
            terms[:, j] = -off / max(n - 1, 1)
            continue
        if first.kind == "total_variation":
            img = image.astype(np.float64)
            terms[:, j] = (np.abs(np.diff(img, axis=2)).sum((1, 2, 3))
                           + np.abs(np.diff(img, axis=3)).sum((1, 2, 3)))
            continue
        for i, o in enumerate(objectives):
            t = o.terms[j][1]
            a = acts[t.layer][i].astype(np.float64)
            if t.kind == "channel":
                terms[i, j] = a[t.channel].mean()
            elif t.kind == "neuron":
                y, x = (t.y, t.x) if t.y is not None else centre(*a.shape[1:])
                terms[i, j] = a[t.channel, y, x]
            elif t.kind == "direction":
                terms[i, j] = np.einsum("c,chw->hw", np.asarray(t.vector), a).mean()
            else:
                terms[i, j] = a.reshape(-1)[t.cls]
    weights = np.array([w for w, _ in objectives[0].terms])
    return terms @ weights, terms


# ----------------------------------------------------------------------------- the ONNX graph


@dataclass
class Emitted:
    """Names in the emitted graph: the total [B], the terms [B, T], the loss the optimizer
    ascends [B] (total plus redirected terms), and the table inputs (name -> shape)."""

    values: str
    terms: str
    loss: str
    inputs: dict[str, tuple[int, ...]]


def emit(e, objectives: Sequence[Objective], batch: int, tensors: dict[str, str],
         shapes: dict[str, tuple[int, ...]], image: str | None, image_shape=None,
         redirect: dict[str, str] | None = None, redirect_on: str | None = None,
         live: str | None = None, prefix: str = "fv:") -> Emitted:
    """Write the objective's nodes with Emitter `e` (optvis_graph.Emitter).

    `tensors`: layer -> graph tensor ("logits" for class_logit), `shapes`: layer -> per-item
    shape, `image`: the [B, 3, H, W] picture in [0, 1] (total variation). `redirect`: layer ->
    the pre-activation tensor of its Relu/Clip; with `redirect_on` ([B, T] 0/1) the linear terms
    are also measured there and added to the loss where on (lucid's redirected ReLU: a unit
    that is dead on the start picture still gets a gradient). `live` [B]: 1 for real items,
    0 for padding (diversity compares the real items only).
    """
    sig = check_batch(objectives)
    inputs: dict[str, tuple[int, ...]] = {}
    values, extra = [], []
    for j, (kind, layer, weight) in enumerate(sig):
        if kind in LINEAR:
            c, h, w = shapes[layer]
            chan = f"{prefix}t{j}:chan"
            inputs[chan] = (batch, c, 1, 1)
            pos = None
            if kind == "neuron":
                pos = f"{prefix}t{j}:pos"
                inputs[pos] = (batch, 1, h, w)

            def linear(t: str, chan=chan, pos=pos, h=h, w=w) -> str:
                x = e.op("Mul", [t, chan])
                x = e.op("Mul", [x, pos]) if pos else e.op("Mul", [x, e.f(1.0 / (h * w))])
                return e.op("ReduceSum", [x, e.ints([1, 2, 3])], keepdims=0)

            values.append(linear(tensors[layer]))
            if redirect and redirect_on and layer in redirect:
                on = e.op("Gather", [redirect_on, e.const(np.array(j, np.int64), "slot")],
                          axis=1)
                extra.append(e.op("Mul", [e.op("Mul", [linear(redirect[layer]), on]),
                                          e.f(weight)]))
        elif kind == "class_logit":
            cls = f"{prefix}t{j}:cls"
            inputs[cls] = (batch, int(np.prod(shapes[layer])))
            logits = tensors[layer]
            if len(shapes[layer]) > 1:  # [B, K, 1, 1] (a 1x1-conv head): as [B, K]
                logits = e.reshape(logits, [batch, int(np.prod(shapes[layer]))])
            values.append(e.op("ReduceSum", [e.op("Mul", [logits, cls]), e.ints([1])],
                               keepdims=0))
        elif kind == "diversity":
            values.append(_diversity(e, tensors[layer], batch, shapes[layer], live))
        else:
            if image is None:
                raise ConfigError("total_variation() needs the picture in the graph")
            values.append(_total_variation(e, image, image_shape))
    columns = [e.op("Unsqueeze", [v, e.ints([1])]) for v in values]
    terms = e.op("Concat", columns, axis=1) if len(columns) > 1 else columns[0]
    weights = e.const(np.array([w for _, _, w in sig], np.float32), "weights")
    total = e.op("ReduceSum", [e.op("Mul", [terms, weights]), e.ints([1])], keepdims=0)
    loss = total
    for x in extra:
        loss = e.op("Add", [loss, x])
    return Emitted(total, terms, loss, inputs)


def _diversity(e, acts: str, batch: int, shape: tuple[int, ...], live: str | None) -> str:
    c = shape[0]
    flat = e.reshape(acts, [batch, c, -1])
    gram = e.op("MatMul", [flat, e.op("Transpose", [flat], perm=[0, 2, 1])])
    gram = e.reshape(gram, [batch, c * c])
    norm = e.op("Sqrt", [e.op("ReduceSum", [e.op("Mul", [gram, gram]), e.ints([1])],
                              keepdims=1)])
    unit = e.op("Div", [gram, e.op("Add", [norm, e.f(1e-12)])])
    cos = e.op("MatMul", [unit, e.op("Transpose", [unit], perm=[1, 0])])  # [B, B]
    live = live or e.const(np.ones(batch, np.float32), "live")
    mask = e.op("Mul", [e.reshape(live, [batch, 1]), e.reshape(live, [1, batch])])
    mask = e.op("Mul", [mask, e.const((1 - np.eye(batch)).astype(np.float32), "offdiag")])
    count = e.op("Max", [e.op("Sub", [e.op("ReduceSum", [live, e.ints([0])], keepdims=1),
                                      e.f(1.0)]), e.f(1.0)])
    summed = e.op("ReduceSum", [e.op("Mul", [cos, mask]), e.ints([1])], keepdims=0)
    return e.op("Neg", [e.op("Div", [summed, count])])


def _total_variation(e, image: str, shape) -> str:
    _, _, h, w = shape
    out = []
    for axis, n in ((2, h), (3, w)):
        a = e.op("Slice", [image, e.ints([1]), e.ints([n]), e.ints([axis])])
        b = e.op("Slice", [image, e.ints([0]), e.ints([n - 1]), e.ints([axis])])
        out.append(e.op("ReduceSum", [e.op("Abs", [e.op("Sub", [a, b])]), e.ints([1, 2, 3])],
                        keepdims=0))
    return e.op("Add", out)
