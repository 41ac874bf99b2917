"""Layer-wise relevance propagation (LRP) as backward rules of the reverse-mode engine.

Relevance is the backward signal: the vjp seeds the target output with its relevance and every
node hands its inputs the relevance its rule assigns them; what arrives at the model input is the
attribution (zennit's convention: relevance flows as the grad_output of a modified backward).
A *composite* picks the rule per node (`composite_rules`, passed to `vjp(node_rules=...)`).

Rules of an affine node y = F_W(x) + b (Conv, grouped and depthwise too, Gemm, MatMul; a
following inference BatchNormalization or constant bias Add is merged into W and b, as zennit's
MergeBatchNorm canonizer does, and then passes relevance through), with R the relevance at y,
x+ = max(x, 0), x- = min(x, 0), W+ / W- and b+ / b- the clamped parameters and
stab(z) = z + e * sign(z) (sign(0) = +1), e = 1e-6 unless said otherwise (zennit 0.5.1's
stabilizer):

- epsilon:  R_x = x * F_W^T(R / stab_eps(y))
- zplus:    z = F_W+(x+) + F_W-(x-) + b+,  R_x = x+ * F_W+^T(R/stab(z)) + x- * F_W-^T(R/stab(z))
- alpha_beta: alpha times z+'s share minus beta times the negative one (z = F_W-(x+) + F_W+(x-)
  + b-, the weights swapped in the transposes)
- gamma:    W^p = W + gamma W+, W^n = W + gamma W-; where y > 0 the positive contributions
  z = F_W^p(x+) + F_W^n(x-) + b + gamma b+ share R, where y < 0 the negative ones
  z = F_W^n(x+) + F_W^p(x-) + b + gamma b- (zennit's generalized gamma rule)
- zbox(low, high): z = F_W(x) - F_W+(low) - F_W-(high),
  R_x = x * F_W^T(g) - low * F_W+^T(g) - high * F_W-^T(g), g = R / stab(z)
- flat:     R_x = F_1^T(R / stab(F_1(1)))  (every weight and input 1, no bias)
- wsquare:  R_x = F_W2^T(R / stab(F_W2(1) + b^2))  (W2 = W * W; zennit squares the bias too)

A zero Pad node feeding a Conv (TorchScript's TF-"same" padding) is that conv's padding for the
rules with synthetic inputs (flat, wsquare, zbox: ones and bounds only inside, no relevance on the
border), as zennit pads the modified inputs of such a module.

Other nodes: `pass_rule` (relevance unchanged) at activations and at a BatchNormalization that
is not merged (zennit's Pass); `norm_rule` (R_i = x_i * d y/d x_i applied to R / stab(y): the
share of each summand) at Add / Sum (residual sums) and average pooling (AveragePool,
GlobalAveragePool, ReduceMean: zennit's Norm). Every other op keeps its gradient rule: MaxPool's
switch (winner-take-all, torch's max-pool backward, which zennit's composites leave as is),
Flatten / Reshape / Concat / Pad route it unchanged, and a Mul of two computed tensors (a
squeeze-excitation gate) is differentiated, as zennit does with torch's functional ops.

Every rule is linear in R (stabilizers depend on the forward values only), so seeding a one-hot
and scaling the result by the target logit equals zennit's seed "one-hot times the output".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import ConfigError
from .context import Context, attrs_of
from .rules import RULES, Rule

STABILIZER = 1e-6  # zennit 0.5.1's stabilizer of every rule but epsilon, and its default epsilon
LINEAR_OPS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = frozenset({
    "Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "Gelu",
    "Sigmoid", "Tanh", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish",
})  # fmt: skip
NORM_OPS = frozenset({"Add", "Sum", "AveragePool", "GlobalAveragePool", "ReduceMean"})
# What keeps a tensor non-negative: then x- = 0 and the rules skip their x- terms.
_ROUTING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
                      "Identity", "Dropout", "Squeeze", "Unsqueeze", "Transpose"})


@dataclass
class Affine:
    """An affine node y = F_W(x) + b, with the followers merged into W and b."""

    node: onnx.NodeProto  # Conv / Gemm / MatMul, data input first, constant weight second
    weight: np.ndarray
    bias: np.ndarray | None  # broadcastable to the output
    weight_name: str | None  # the graph's own weight when W is not changed by a merge
    output: str  # y: the last merged follower's output
    followers: list[onnx.NodeProto]
    nonnegative: bool  # the input is known to be >= 0 (after a ReLU)
    # 1 inside, 0 on the border a zero Pad node added to the input ([1, 1, *spatial]), else None
    pad_mask: np.ndarray | None = None


# ---- building blocks ---------------------------------------------------------------------------
def stabilize(ctx: Context, z: str, eps: float, like: str | None = None) -> str:
    """z + eps * sign(z), sign(0) = +1 (zennit's `stabilize`); `like`: a forward tensor of z's
    dtype when z is an emitted one."""
    like = like or z
    shift = ctx.op("Where", [ctx.op("Less", [z, ctx.scalar(0.0, like)]), ctx.scalar(-eps, like),
                             ctx.scalar(eps, like)])
    return ctx.op("Add", [z, shift])


def _weight(ctx: Context, lin: Affine, w: np.ndarray | None, hint: str) -> str:
    """A constant holding `w` (None: the layer's own weight), known to the rules as a value."""
    if w is None and lin.weight_name is not None:
        return lin.weight_name
    dtype = ctx.np_dtype(lin.node.input[0])
    return ctx.known_const(np.ascontiguousarray(lin.weight if w is None else w, dtype=dtype), hint)


def _forward(ctx: Context, lin: Affine, w: str, x: str) -> str:
    """F_w(x): the node's op with weight `w` and no bias."""
    node = lin.node
    keep = {k: v for k, v in attrs_of(node).items() if k != "beta"}
    return ctx.op(node.op_type, [x, w], **keep)


def _transpose(ctx: Context, lin: Affine, w: str, g: str) -> str:
    """F_w^T(g): the input adjoint of F_w at g (the op's own backward rule)."""
    fake = onnx.NodeProto()
    fake.CopyFrom(lin.node)
    del fake.input[:]
    fake.input.extend([lin.node.input[0], w])
    return RULES[lin.node.op_type](ctx, fake, [g])[0]


def _bias(ctx: Context, z: str, b: np.ndarray | None, like: str) -> str:
    if b is None or not np.any(b):
        return z
    return ctx.op("Add", [z, ctx.const(np.asarray(b, dtype=ctx.np_dtype(like)), "b")])


def _synthetic_input(ctx: Context, lin: Affine, value: np.ndarray | float, hint: str) -> str:
    """A constant input of the layer (ones, z-box's bounds) at batch 1: what zennit's input
    modifiers make, before the padding, so that a zero Pad node's border stays 0."""
    x = lin.node.input[0]
    shape = (1, *ctx.shape(x)[1:])
    full = np.broadcast_to(np.asarray(value, np.float64), shape)
    if lin.pad_mask is not None:
        full = full * lin.pad_mask
    return ctx.const(np.ascontiguousarray(full, dtype=ctx.np_dtype(x)), hint)


def _unpadded(ctx: Context, lin: Affine, r: str) -> str:
    """Relevance on a zero Pad node's border dropped (it would be the padding's)."""
    if lin.pad_mask is None:
        return r
    return ctx.op("Mul", [r, ctx.const(lin.pad_mask.astype(ctx.np_dtype(lin.node.input[0])),
                                       "unpadded")])


def _parts(ctx: Context, lin: Affine, x: str) -> tuple[str, str | None]:
    """(x+, x-), x- None where the input is known to be non-negative."""
    if lin.nonnegative:
        return x, None
    return ctx.op("Relu", [x]), ctx.op("Min", [x, ctx.scalar(0.0, x)])


def _sum(ctx: Context, terms: Sequence[str | None]) -> str:
    terms = [t for t in terms if t is not None]
    return terms[0] if len(terms) == 1 else ctx.op("Sum", terms)


def _out(node: onnx.NodeProto, rx: str) -> list:
    return [rx] + [None] * (len(node.input) - 1)


def _clamped(a: np.ndarray | None, positive: bool) -> np.ndarray | None:
    if a is None:
        return None
    return np.maximum(a, 0) if positive else np.minimum(a, 0)


# ---- rules of affine nodes ---------------------------------------------------------------------
def epsilon_rule(lin: Affine, epsilon: float) -> Rule:
    def rule(ctx, node, gys):
        g = ctx.op("Div", [gys[0], stabilize(ctx, lin.output, epsilon)])
        x = node.input[0]
        return _out(node, ctx.op("Mul", [x, _transpose(ctx, lin, _weight(ctx, lin, None, "w"), g)]))

    return rule


def alpha_beta_rule(lin: Affine, alpha: float, beta: float, stabilizer: float = STABILIZER) -> Rule:
    """zennit's AlphaBeta (alpha - beta = 1); alpha 1, beta 0 is z+ (ZPlus)."""

    def rule(ctx, node, gys):
        x = node.input[0]
        xp, xn = _parts(ctx, lin, x)
        wp = _weight(ctx, lin, np.maximum(lin.weight, 0), "wpos")
        # W- only where it is used (a signed input, or beta): z+ after a ReLU needs W+ alone
        wn = _weight(ctx, lin, np.minimum(lin.weight, 0), "wneg") if xn or beta else None

        def share(w_of_xp: str, w_of_xn: str, b: np.ndarray | None) -> str:
            z = _forward(ctx, lin, w_of_xp, xp)
            if xn is not None:
                z = ctx.op("Add", [z, _forward(ctx, lin, w_of_xn, xn)])
            g = ctx.op("Div", [gys[0], stabilize(ctx, _bias(ctx, z, b, x), stabilizer, x)])
            terms = [ctx.op("Mul", [xp, _transpose(ctx, lin, w_of_xp, g)])]
            if xn is not None:
                terms.append(ctx.op("Mul", [xn, _transpose(ctx, lin, w_of_xn, g)]))
            return _sum(ctx, terms)

        r = share(wp, wn, _clamped(lin.bias, True))
        if alpha != 1.0:
            r = ctx.op("Mul", [r, ctx.scalar(alpha, x)])
        if beta:
            neg = share(wn, wp, _clamped(lin.bias, False))
            r = ctx.op("Sub", [r, ctx.op("Mul", [neg, ctx.scalar(beta, x)])])
        return _out(node, r)

    return rule


def zplus_rule(lin: Affine, stabilizer: float = STABILIZER) -> Rule:
    return alpha_beta_rule(lin, 1.0, 0.0, stabilizer)


def gamma_rule(lin: Affine, gamma: float, stabilizer: float = STABILIZER) -> Rule:
    def rule(ctx, node, gys):
        x = node.input[0]
        xp, xn = _parts(ctx, lin, x)
        w, b = lin.weight, lin.bias
        wp = _weight(ctx, lin, w + gamma * np.maximum(w, 0), "wgpos")
        wn = _weight(ctx, lin, w + gamma * np.minimum(w, 0), "wgneg")
        y = lin.output

        def normed(w_of_xp: str, w_of_xn: str, bias, positive: bool) -> str:
            z = _forward(ctx, lin, w_of_xp, xp)
            if xn is not None:
                z = ctx.op("Add", [z, _forward(ctx, lin, w_of_xn, xn)])
            z = _bias(ctx, z, bias, x)
            side = ctx.op("Greater" if positive else "Less", [y, ctx.scalar(0.0, y)])
            mask = ctx.op("Cast", [side], to=helper.np_dtype_to_tensor_dtype(ctx.np_dtype(y)))
            return ctx.op("Mul", [mask, ctx.op("Div", [gys[0], stabilize(ctx, z, stabilizer, x)])])

        b_pos = None if b is None else b + gamma * np.maximum(b, 0)
        b_neg = None if b is None else b + gamma * np.minimum(b, 0)
        gp = normed(wp, wn, b_pos, True)
        gn = normed(wn, wp, b_neg, False)
        terms = [ctx.op("Mul", [xp, ctx.op("Add", [_transpose(ctx, lin, wp, gp),
                                                   _transpose(ctx, lin, wn, gn)])])]
        if xn is not None:
            terms.append(ctx.op("Mul", [xn, ctx.op("Add", [_transpose(ctx, lin, wn, gp),
                                                           _transpose(ctx, lin, wp, gn)])]))
        return _out(node, _sum(ctx, terms))

    return rule


def zbox_rule(lin: Affine, low: np.ndarray, high: np.ndarray,
              stabilizer: float = STABILIZER) -> Rule:
    """`low` / `high`: the input's bounds, broadcastable to the input [1, C, H, W] (per channel
    [1, C, 1, 1] for images); the padding of a convolution stays 0, as in zennit."""

    def rule(ctx, node, gys):
        x = node.input[0]
        lo = _synthetic_input(ctx, lin, low, "low")
        hi = _synthetic_input(ctx, lin, high, "high")
        w = _weight(ctx, lin, None, "w")
        wp = _weight(ctx, lin, np.maximum(lin.weight, 0), "wpos")
        wn = _weight(ctx, lin, np.minimum(lin.weight, 0), "wneg")
        box = ctx.op("Add", [_forward(ctx, lin, wp, lo), _forward(ctx, lin, wn, hi)])
        z = ctx.op("Sub", [_forward(ctx, lin, w, x), box])
        g = ctx.op("Div", [gys[0], stabilize(ctx, z, stabilizer, x)])
        r = ctx.op("Sub", [
            ctx.op("Mul", [x, _transpose(ctx, lin, w, g)]),
            ctx.op("Add", [ctx.op("Mul", [lo, _transpose(ctx, lin, wp, g)]),
                           ctx.op("Mul", [hi, _transpose(ctx, lin, wn, g)])]),
        ])  # fmt: skip
        return _out(node, r)

    return rule


def _unit_input_rule(lin: Affine, w: np.ndarray, bias: np.ndarray | None,
                     stabilizer: float) -> Rule:
    """R_x = F_w^T(R / stab(F_w(1) + bias)): flat and w-square (the input is not used)."""

    def rule(ctx, node, gys):
        x = node.input[0]
        wc = _weight(ctx, lin, w, "wunit")
        z = _bias(ctx, _forward(ctx, lin, wc, _synthetic_input(ctx, lin, 1.0, "ones")), bias, x)
        g = ctx.op("Div", [gys[0], stabilize(ctx, z, stabilizer, x)])
        return _out(node, _unpadded(ctx, lin, _transpose(ctx, lin, wc, g)))

    return rule


def flat_rule(lin: Affine, stabilizer: float = STABILIZER) -> Rule:
    return _unit_input_rule(lin, np.ones_like(lin.weight), None, stabilizer)


def wsquare_rule(lin: Affine, stabilizer: float = STABILIZER) -> Rule:
    bias = None if lin.bias is None else lin.bias * lin.bias
    return _unit_input_rule(lin, lin.weight * lin.weight, bias, stabilizer)


# ---- rules of other nodes ----------------------------------------------------------------------
def pass_rule(ctx: Context, node: onnx.NodeProto, gys: list) -> list:
    """Relevance unchanged (zennit's Pass: activations, unmerged BatchNorm, merged followers)."""
    return _out(node, gys[0])


def norm_rule(stabilizer: float = STABILIZER) -> Rule:
    """R_i = x_i * (d y / d x_i)^T (R / stab(y)): each summand's share (zennit's Norm at sums
    and average pooling); a constant operand (a bias) keeps its share."""

    def rule(ctx, node, gys):
        g = ctx.op("Div", [gys[0], stabilize(ctx, node.output[0], stabilizer)])
        grads = RULES[node.op_type](ctx, node, [g])
        return [
            ctx.op("Mul", [x, gx]) if gx is not None else None
            for x, gx in zip(node.input, grads, strict=False)
        ]

    return rule


# ---- composites --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Composite:
    """Which rule at which affine node: `first` at the first node of kind `first_kind`
    ("linear": any affine node, "conv": a Conv), then `conv` at Conv, `dense` at Gemm/MatMul."""

    conv: str
    dense: str
    first: str | None = None
    first_kind: str = "linear"
    description: str = ""


COMPOSITES: dict[str, Composite] = {
    "epsilon_plus_flat": Composite("zplus", "epsilon", "flat", "linear",
                                   "flat at the first layer, z+ at convolutions, epsilon at dense "
                                   "layers (zennit EpsilonPlusFlat)"),
    "epsilon_gamma_box": Composite("gamma", "epsilon", "zbox", "conv",
                                   "z-box at the first convolution (the input's pixel range), "
                                   "gamma at convolutions, epsilon at dense layers "
                                   "(zennit EpsilonGammaBox)"),
    "epsilon_plus": Composite("zplus", "epsilon", None, "linear",
                              "z+ at convolutions, epsilon at dense layers (zennit EpsilonPlus)"),
    "epsilon_alpha2_beta1": Composite("alpha_beta", "epsilon", None, "linear",
                                      "alpha2-beta1 at convolutions, epsilon at dense layers "
                                      "(zennit EpsilonAlpha2Beta1)"),
    "epsilon_alpha2_beta1_flat": Composite("alpha_beta", "epsilon", "flat", "linear",
                                           "flat first, then as epsilon_alpha2_beta1 "
                                           "(zennit EpsilonAlpha2Beta1Flat)"),
    "epsilon_plus_wsquare": Composite("zplus", "epsilon", "wsquare", "linear",
                                      "w-square at the first layer (unbounded inputs), z+ at "
                                      "convolutions, epsilon at dense layers"),
    "epsilon": Composite("epsilon", "epsilon", None, "linear", "epsilon at every layer"),
    "zplus": Composite("zplus", "zplus", None, "linear", "z+ at every layer"),
    "alpha_beta": Composite("alpha_beta", "alpha_beta", None, "linear",
                            "alpha2-beta1 at every layer"),
    "gamma": Composite("gamma", "gamma", None, "linear", "gamma at every layer"),
}  # fmt: skip
RULE_NAMES = ("epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare")


@dataclass(frozen=True)
class LrpSettings:
    """Parameters of the rules: epsilon (epsilon rule), gamma, alpha / beta, and the input's
    bounds for z-box (broadcastable to the first convolution's input [1, C, H, W])."""

    epsilon: float = STABILIZER
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    stabilizer: float = STABILIZER


def make_rule(name: str, lin: Affine, s: LrpSettings) -> Rule:
    if name == "epsilon":
        return epsilon_rule(lin, s.epsilon)
    if name == "zplus":
        return zplus_rule(lin, s.stabilizer)
    if name == "alpha_beta":
        return alpha_beta_rule(lin, s.alpha, s.beta, s.stabilizer)
    if name == "gamma":
        return gamma_rule(lin, s.gamma, s.stabilizer)
    if name == "flat":
        return flat_rule(lin, s.stabilizer)
    if name == "wsquare":
        return wsquare_rule(lin, s.stabilizer)
    if name == "zbox":
        if s.low is None or s.high is None:
            raise ConfigError("the z-box rule needs the input's bounds (low, high)")
        return zbox_rule(lin, s.low, s.high, s.stabilizer)
    raise ConfigError(f"LRP rule {name!r} is not one of {', '.join(RULE_NAMES)}")


def composite_rules(
    composite: str | Composite, settings: LrpSettings | None = None
) -> Callable[[Context, onnx.GraphProto], Mapping[str, Rule]]:
    """The engine's node rules (`vjp(node_rules=...)`) of a composite, chosen on the prepared
    graph: affine nodes in topological order (the first one gets `first`), activations pass,
    sums and average pools norm; the rest keep their gradient rule."""
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ConfigError(f"LRP composite {composite!r} is not one of {', '.join(COMPOSITES)}")
        composite = COMPOSITES[composite]
    settings = settings or LrpSettings()

    def choose(ctx: Context, graph: onnx.GraphProto) -> dict[str, Rule]:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        producers = {o: n for n in graph.node for o in n.output}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        outputs = {o.name for o in graph.output}
        rules: dict[str, Rule] = {}
        first_done = composite.first is None
        norm = norm_rule(settings.stabilizer)
        for node in graph.node:
            if not node.output or node.output[0] in rules:
                continue
            if not any(ctx.active(o) for o in node.output) or not ctx.active(node.input[0]):
                continue
            op = node.op_type
            if op in ACTIVATIONS or op == "BatchNormalization":
                rules[node.output[0]] = pass_rule
            elif op in NORM_OPS:
                rules[node.output[0]] = norm
            elif op in LINEAR_OPS:
                lin = affine(ctx, node, consumers, producers, outputs)
                if lin is None:
                    continue
                kind = "conv" if op == "Conv" else "dense"
                name = composite.conv if kind == "conv" else composite.dense
                if not first_done and composite.first_kind in ("linear", kind):
                    name, first_done = composite.first, True
                rules[node.output[0]] = make_rule(name, lin, settings)
                for follower in lin.followers:
                    rules[follower.output[0]] = pass_rule
        return rules

    return choose


# ---- finding affine nodes ------------------------------------------------------------------------
def affine(
    ctx: Context,
    node: onnx.NodeProto,
    consumers: Mapping[str, list[onnx.NodeProto]],
    producers: Mapping[str, onnx.NodeProto],
    outputs: set[str],
) -> Affine | None:
    """The node as y = F_W(x) + b with a constant W (None when it is not one: a weight computed
    at run time keeps the gradient rule), followed BatchNorm / bias Add merged."""
    op = node.op_type
    if len(node.input) < 2 or ctx.active(node.input[1]):
        return None
    weight = ctx.value(node.input[1])
    if weight is None:
        return None
    a = attrs_of(node)
    out_shape = ctx.shape(node.output[0])
    if op == "Conv":
        m = weight.shape[0]
        channel_shape = (1, m) + (1,) * (len(out_shape) - 2)
        out_axis = 0
        b = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = None if b is None else b.reshape(channel_shape)
    elif op == "Gemm":
        if a.get("transA", 0):
            return None
        out_axis = 0 if a.get("transB", 0) else 1
        m = weight.shape[out_axis]
        channel_shape = (m,)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = ctx.value(node.input[2])
            if c is None or c.size != m:
                return None
            bias = float(a.get("beta", 1.0)) * c.reshape(m)
    else:  # MatMul
        if weight.ndim != 2:
            return None
        out_axis, m, channel_shape, bias = 1, weight.shape[1], (weight.shape[1],), None
    # The weight as stored (float64 only once a BatchNorm is merged in): a model's weights
    # twice over in float64 is more than a large model can hold (regnet_y_128gf: 5.2 GB).
    bias = None if bias is None else np.asarray(bias, np.float64)
    lin = Affine(node, weight, bias, node.input[1], node.output[0], [],
                 _nonnegative(ctx, node.input[0], producers),
                 _pad_mask(ctx, producers.get(node.input[0])) if op == "Conv" else None)
    while lin.output not in outputs and len(consumers.get(lin.output, [])) == 1:
        nxt = consumers[lin.output][0]
        merged = _merge(ctx, lin, nxt, channel_shape, out_axis)
        if merged is None:
            break
        lin.weight, lin.bias = merged
        lin.output = nxt.output[0]
        lin.followers.append(nxt)
    if lin.followers and any(f.op_type == "BatchNormalization" for f in lin.followers):
        lin.weight_name = None
    return lin


def _merge(ctx, lin: Affine, nxt, channel_shape, out_axis):
    """(W, b) with `nxt` (inference BatchNormalization or Add of a per-channel constant) merged."""
    m = channel_shape[-1] if len(channel_shape) == 1 else channel_shape[1]
    bias = lin.bias if lin.bias is not None else np.zeros(channel_shape)
    if nxt.op_type == "BatchNormalization" and nxt.input[0] == lin.output:
        a = attrs_of(nxt)
        values = [ctx.value(n) for n in nxt.input[1:5]]
        if a.get("training_mode", 0) or any(v is None for v in values):
            return None
        scale, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
        s = scale / np.sqrt(var + a.get("epsilon", 1e-5))
        shape = [1] * lin.weight.ndim
        shape[out_axis] = m
        weight = lin.weight * s.reshape(shape)
        bias = (bias - mean.reshape(channel_shape)) * s.reshape(channel_shape)
        return weight, bias + beta.reshape(channel_shape)
    if nxt.op_type == "Add":
        other = [i for i in nxt.input if i != lin.output]
        value = ctx.value(other[0]) if len(other) == 1 else None
        if value is None or value.size != m:
            return None
        if len(channel_shape) > 1 and (value.ndim < len(channel_shape) - 1
                                       or value.shape[-len(channel_shape) + 1] != m):
            return None  # a conv's bias must run along the channel axis
        if len(channel_shape) == 1 and value.shape[-1] != m:
            return None
        return lin.weight, bias + np.asarray(value, np.float64).reshape(channel_shape)
    return None


def _pad_mask(ctx: Context, pad: onnx.NodeProto | None) -> np.ndarray | None:
    """[1, 1, *spatial] of a Conv's input made by a zero Pad of the spatial axes (1 inside)."""
    if pad is None or pad.op_type != "Pad" or ctx.opset < 11:
        return None
    value = ctx.value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
    pads = ctx.value(pad.input[1]) if len(pad.input) > 1 else None
    constant = attrs_of(pad).get("mode", "constant") == "constant"
    if not constant or pads is None or (value is not None and float(np.asarray(value)) != 0):
        return None
    if len(pad.input) > 3 and pad.input[3]:
        return None  # pads of chosen axes (opset 18): not seen in exports yet
    shape = ctx.shape(pad.output[0])
    rank = len(shape)
    pads = [int(p) for p in pads]
    if any(pads[:2]) or any(pads[rank:rank + 2]) or any(p < 0 for p in pads):
        return None
    mask = np.zeros((1, 1, *shape[2:]))
    inside = tuple(slice(b, n - e) for b, e, n in zip(pads[2:rank], pads[rank + 2:], shape[2:],
                                                      strict=True))
    mask[(0, 0, *inside)] = 1.0
    return mask


def _nonnegative(ctx: Context, name: str, producers: Mapping[str, onnx.NodeProto]) -> bool:
    """True when `name` is a ReLU's (or a Clip at >= 0's) output, possibly pooled or reshaped."""
    for _ in range(64):
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type == "Relu":
            return True
        if node.op_type == "Clip":
            lo = (ctx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
                  ) if ctx.opset >= 11 else attrs_of(node).get("min")
            return lo is not None and float(np.asarray(lo)) >= 0
        if node.op_type not in _ROUTING:
            return False
        name = node.input[0]
    return False


__all__ = [
    "ACTIVATIONS", "COMPOSITES", "Composite", "LrpSettings", "NORM_OPS", "RULE_NAMES",
    "STABILIZER", "composite_rules", "flat_rule", "gamma_rule", "make_rule", "norm_rule",
    "pass_rule", "stabilize", "wsquare_rule", "zbox_rule", "zplus_rule",
]  # fmt: skip
