"""Test helper (torch allowed): real CNN exports and torch-autograd reference gradients.

- `export(arch)`: the model (seeded random weights, or EfficientNet-Lite0 pretrained) exported
  raw by torch.onnx (TorchScript opset 17 or dynamo opset 18; input "input", output "logits",
  dynamic batch "batch"), cached on disk by architecture, size, exporter, seed and torch version.
- `reference(...)`: gradients of the chosen logit of each sample w.r.t. the input and,
  optionally, an intermediate module output, under the three backward policies.

Policies are applied by patching the functional ReLUs for the duration of the reference:
`torch.nn.functional.relu`, `relu6` and `hardtanh` (nn.ReLU / nn.ReLU6 modules call these, and
DenseNet / GoogLeNet call F.relu directly, so one patch covers modules and functional calls and a
module reused at several places (EfficientNet's single nn.ReLU6 for stem and head) is handled per
call). The replacement clamps like the original, never in place, and its backward is
- gradient: g * (lo < x < hi) (torch's own masks: strict, as in relu's `result > 0`);
- deconvnet: clamp(g, 0);
- guided: clamp(g, 0) * (lo < x < hi).
This is the same as full backward hooks on the modules (guided = clamp(grad_in, 0) for ReLU and
ReLU6, deconvnet = clamp(grad_out, 0)), without their in-place and reuse pitfalls.
Not covered: `torch.relu` / `Tensor.relu` called directly (none of the architectures here do).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# torch's OpenMP workers spin-wait by default: on a shared 2-core machine that makes torch
# several times slower than itself (ORT's counterpart is allow_spinning 0). Only effective
# when torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TORCHSCRIPT_OPSET, DYNAMO_OPSET = 17, 18


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and where its "last conv activation" is."""

    build: Callable[[], torch.nn.Module]
    size: int  # input H = W
    feature: str  # module path whose output is the intermediate tensor
    feature_call: int = -1  # which call of that module (EfficientNet reuses its ReLU6)
    pretrained: bool = False


def _torchvision(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _efficientnet_lite0() -> torch.nn.Module:
    return pretrained_effnet()


def pretrained_effnet(own_head_relu6: bool = False) -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 exactly as the pipeline exports it (eval mode).

    `own_head_relu6`: the stock class applies one ReLU6 module (`_swish`) to stem *and* head, so
    a hook on it (pytorch-grad-cam's layer) sees the stem; this gives the head its own module.
    """
    import types

    from cnnviz.export.sources import efficientnet_lite0

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading
        net = efficientnet_lite0("pretrained").module
    if own_head_relu6:
        net.head_act = torch.nn.ReLU6()

        def extract_features(self, inputs):  # the stock method, with head_act on the head
            x = self._swish(self._bn0(self._conv_stem(inputs)))
            for idx, block in enumerate(self._blocks):
                rate = self._global_params.drop_connect_rate
                block_rate = rate * float(idx) / len(self._blocks) if rate else rate
                x = block(x, drop_connect_rate=block_rate)
            return self.head_act(self._bn1(self._conv_head(x)))

        net.extract_features = types.MethodType(extract_features, net)
    return net.eval()


class ClampReLU(torch.nn.ReLU):
    """ReLU6 as an nn.ReLU subclass, so captum's guided/deconvolution rules apply to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, 0.0, 6.0)


def swap_relu6(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with every nn.ReLU6 replaced by ClampReLU (same function)."""
    out = copy.deepcopy(module)

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU6):
                setattr(parent, name, ClampReLU())
            else:
                visit(child)

    visit(out)
    return out


class PerCall(torch.nn.Module):
    """Copies of one module, the k-th used at the k-th call of each forward (k mod copies)."""

    def __init__(self, module: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.copies = torch.nn.ModuleList(copy.deepcopy(module) for _ in range(calls))
        self.calls = 0

    def forward(self, x):  # noqa: ANN001, ANN201 - torch
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(x)


def one_module_per_call(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of `net` in which every leaf module called more than once per forward is replaced
    by a PerCall of that many copies (captum's DeepLift needs one module per use)."""
    net = copy.deepcopy(net)
    counts: dict[str, int] = {}
    handles = []
    for name, module in net.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
            ))  # fmt: skip
    with torch.no_grad():
        net(x[:1])
    for handle in handles:
        handle.remove()
    for name, calls in counts.items():
        if calls > 1:
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, PerCall(getattr(parent, attr), calls))
    return net


# Sizes: the smallest the exporter takes. VGG and AlexNet end in AdaptiveAvgPool2d(7 / 6), which
# the TorchScript exporter only exports when the feature map is a multiple of it (224 for both);
# EfficientNet-Lite0 is pretrained with static "same" pads for 224.
ARCHS: dict[str, Arch] = {
    "efficientnet_lite0": Arch(_efficientnet_lite0, 224, "_swish", -1, pretrained=True),
    "vgg16": Arch(_torchvision("vgg16"), 224, "features.29"),
    "resnet50": Arch(_torchvision("resnet50"), 64, "layer4"),
    "mobilenet_v2": Arch(_torchvision("mobilenet_v2"), 64, "features"),
    "mobilenet_v3_small": Arch(_torchvision("mobilenet_v3_small"), 64, "features"),
    "densenet121": Arch(_torchvision("densenet121"), 64, "features"),
    "googlenet": Arch(
        _torchvision("googlenet", aux_logits=False, init_weights=True), 64, "inception5b"
    ),  # fmt: skip
    "squeezenet1_0": Arch(_torchvision("squeezenet1_0"), 64, "features"),
    "alexnet": Arch(_torchvision("alexnet"), 224, "features.11"),
}


def cache_dir() -> Path:
    root = os.environ.get("CNNVIZ_TEST_CACHE") or Path.home() / ".cache" / "cnnviz-tests"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(arch: str, seed: int = 0, size: int | None = None) -> torch.nn.Module:
    """The torch model in eval mode, float32, every `inplace` flag off (hooks need the values).

    size: input H = W the BatchNorm statistics are calibrated at (default: the arch's).
    """
    torch.manual_seed(seed)
    spec = ARCHS[arch]
    model = spec.build().eval()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    if not spec.pretrained:
        _calibrate_batchnorm(model, size or spec.size)
    return model


def _calibrate_batchnorm(model: torch.nn.Module, size: int, n: int = 8) -> None:
    """Set BatchNorm running statistics from one random batch (seeded by the caller).

    Fresh running stats (mean 0, var 1) do not normalize anything: activations of a random
    ResNet / DenseNet / GoogLeNet then grow or vanish layer by layer (GoogLeNet's logits differ
    between inputs by 1e-13, below float32 finite differences). Batch statistics make the
    random network behave like a trained one in scale.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(n, 3, size, size))
    model.eval()


def export(
    arch: str,
    dynamo: bool = False,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    size: int | None = None,
) -> Path:
    """Path of the cached raw ONNX export of `arch` (exported now when missing).

    `model` (the result of `build(arch, seed, size)`) saves building it again.
    """
    size = size or ARCHS[arch].size
    exporter = "dynamo" if dynamo else "ts"
    key = f"{arch}-{size}-{exporter}-seed{seed}-bn1-torch{torch.__version__}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = cache_dir() / f"{arch}-{size}-{exporter}-{tag}.onnx"
    if path.is_file():
        return path
    model = model if model is not None else build(arch, seed, size)
    example = torch.zeros(1, 3, size, size)
    proto = _export_dynamo(model, example) if dynamo else _export_torchscript(model, example)
    if proto.ir_version > 10:
        proto.ir_version = 10
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=TORCHSCRIPT_OPSET, dynamo=False,
        )  # fmt: skip
        return onnx.load(str(path))


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    import onnx.external_data_helper

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(None):
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=DYNAMO_OPSET, dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
        proto = onnx.load(str(path), load_external_data=True)
    onnx.external_data_helper.convert_model_from_external_data(proto)
    return proto


# ---------------------------------------------------------------------------- policies


class _PolicyClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi, policy):  # noqa: D102
        ctx.save_for_backward(x)
        ctx.bounds, ctx.policy = (lo, hi), policy
        return x.clamp(min=lo, max=hi)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = (x > lo) & (x < hi) if hi is not None else x > lo
        if ctx.policy == "gradient":
            gx = g * inside
        elif ctx.policy == "deconvnet":
            gx = g.clamp(min=0)
        else:
            gx = g.clamp(min=0) * inside
        return gx, None, None, None


# ONNX op types of the piecewise activations whose kinks `policy_patch` records.
PIECEWISE = ("Relu", "Clip", "HardSwish", "HardSigmoid")


@contextlib.contextmanager
def policy_patch(policy: str, record: list | None = None) -> Iterator[None]:
    """Route F.relu / F.relu6 / F.hardtanh through `_PolicyClamp` while inside the block.

    With `record`, every call of these and of F.hardswish / F.hardsigmoid appends
    (ONNX op type, kinks, input as numpy) in call order: the forward's kink-side decisions.
    """
    if policy not in ("gradient", "deconvnet", "guided"):
        raise ValueError(policy)
    names = ("relu", "relu6", "hardtanh", "hardswish", "hardsigmoid")
    saved = {name: getattr(F, name) for name in names}

    def note(op: str, kinks: tuple, x: torch.Tensor) -> None:
        if record is not None:
            record.append((op, kinks, x.detach().numpy().copy()))

    def relu(input, inplace=False):  # noqa: A002 - torch's signature
        note("Relu", (0.0,), input)
        return _PolicyClamp.apply(input, 0.0, None, policy)

    def relu6(input, inplace=False):  # noqa: A002
        note("Clip", (0.0, 6.0), input)
        return _PolicyClamp.apply(input, 0.0, 6.0, policy)

    def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):  # noqa: A002
        note("Clip", (float(min_val), float(max_val)), input)
        return _PolicyClamp.apply(input, float(min_val), float(max_val), policy)

    def hardswish(input, inplace=False):  # noqa: A002
        note("HardSwish", (-3.0, 3.0), input)
        return saved["hardswish"](input)

    def hardsigmoid(input, inplace=False):  # noqa: A002
        note("HardSigmoid", (-3.0, 3.0), input)
        return saved["hardsigmoid"](input)

    F.relu, F.relu6, F.hardtanh = relu, relu6, hardtanh
    F.hardswish, F.hardsigmoid = hardswish, hardsigmoid
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


# ---------------------------------------------------------------------------- references


def reference(
    model: torch.nn.Module,
    x: np.ndarray,
    targets: list[int],
    policy: str = "gradient",
    feature: str | None = None,
    feature_call: int = -1,
    dtype: torch.dtype = torch.float32,
    record: list | None = None,
) -> dict[str, np.ndarray]:
    """d logits[i, targets[i]] / d input (and / d feature) for each sample i, as numpy.

    Returns {"logits", "input"} and, with `feature` (a module path), {"feature" (its value),
    "grad_feature"}. float64 runs a double copy of the model (the kink-flip referee).
    `record`: see `policy_patch`.
    """
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    calls: list[torch.Tensor] = []
    handle = None
    if feature is not None:

        def keep(_module, _inputs, output):
            output.retain_grad()
            calls.append(output)

        handle = net.get_submodule(feature).register_forward_hook(keep)
    try:
        with policy_patch(policy, record), torch.enable_grad():
            logits = net(xt)
            picked = logits[torch.arange(len(targets)), torch.as_tensor(targets)]
            picked.sum().backward()
    finally:
        if handle is not None:
            handle.remove()
    out = {"logits": logits.detach().numpy(), "input": xt.grad.numpy()}
    if feature is not None:
        hit = calls[feature_call]
        out["feature"] = hit.detach().numpy()
        out["grad_feature"] = hit.grad.numpy()
    return out


def onnx_tensor_matching(
    model: onnx.ModelProto, x: np.ndarray, value: np.ndarray, rtol: float = 1e-3
) -> str:
    """The ONNX tensor whose value on `x` equals `value` (a torch module's output).

    Exporters name tensors differently (TorchScript scopes, dynamo op names), so the
    intermediate tensor is found by value among those of the same shape.
    """
    from cnnviz.autodiff.finite_diff import tensor_values
    from cnnviz.autodiff.prepare import prepare, static_shapes

    # prepare() folds the shape arithmetic that leaves raw TorchScript exports' shapes unknown
    shapes = static_shapes(prepare(model, 1).graph)
    want = (1, *value.shape[1:])
    produced = {o for node in model.graph.node for o in node.output}
    candidates = [name for name, shape in shapes.items() if shape == want and name in produced]
    if not candidates:
        raise LookupError(f"no tensor of shape [*, {want}] in the ONNX graph")
    values = tensor_values(model, {"input": x}, candidates)
    scale = np.abs(value).max()
    errors = [float(np.abs(v - value).max() / scale) for v in values]
    best = int(np.argmin(errors))
    if errors[best] > rtol:
        raise LookupError(f"no ONNX tensor matches the feature (best {candidates[best]}: "
                          f"{errors[best]:.2e})")  # fmt: skip
    return candidates[best]


def kink_flips(
    model: onnx.ModelProto, x: np.ndarray, record: list, sample: int
) -> dict[str, int] | None:
    """Activations on the other side of a kink in ORT's float32 forward than in `record`.

    `record` holds a torch (float64) forward's ReLU / Clip / HardSwish / HardSigmoid inputs in
    call order (`reference(..., record=...)`); the ONNX nodes of those types, in graph order,
    are matched to them one to one. Returns {node name: number of flipped units} for
    `sample` (empty: no flip), or None when the two sequences do not line up (then flips
    cannot be counted this way). MaxPool switches are not compared.
    """
    from cnnviz.autodiff.finite_diff import tensor_values

    nodes = [n for n in model.graph.node if n.op_type in PIECEWISE]
    if [n.op_type for n in nodes] != [op for op, _, _ in record]:
        return None
    values = tensor_values(model, {"input": x}, [n.input[0] for n in nodes])
    flips = {}
    for node, ours, (_, kinks, theirs) in zip(nodes, values, record, strict=True):
        if ours.shape != theirs.shape:
            return None
        bounds = np.asarray(kinks)
        side_ours = np.searchsorted(bounds, ours[sample], side="left")
        side_theirs = np.searchsorted(bounds, theirs[sample], side="left")
        count = int((side_ours != side_theirs).sum())
        if count:
            flips[node.name or node.output[0]] = count
    return flips


# ---------------------------------------------------------------------------- comparisons


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return float(np.abs(got - ref).max() / scale) if scale > 0 else float(np.abs(got).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.linalg.norm(a) == np.linalg.norm(b))


# ---- zennit on EfficientNet-Lite0 (benchmarks/bench_peers.py; tests/test_lrp_peers.py has the
# same two pieces for its own fixture) --------------------------------------------------------
def _zennit_block_forward(self, inputs, drop_connect_rate=None):  # noqa: ANN001, ANN202
    """MBConvBlock's eval forward (Lite: no squeeze-excitation) with the skip connection as a
    zennit Sum of the stacked summands, so zennit's Norm rule applies where ours applies to the
    ONNX Add."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
    return x


def zennit_effnet_canonizers(net: torch.nn.Module) -> list:
    """zennit canonizers that make `pretrained_effnet()` the network of its ONNX export: every
    BatchNorm merged into its conv (the export folds them) and the residual Adds as zennit Sums."""
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm
    from zennit.layer import Sum

    pairs = [(("_conv_stem",), "_bn0"), (("_conv_head",), "_bn1")]
    for i, block in enumerate(net._blocks):
        prefix = f"_blocks.{i}."
        if block._block_args.expand_ratio != 1:
            pairs.append(((prefix + "_expand_conv",), prefix + "_bn0"))
        pairs += [((prefix + "_depthwise_conv",), prefix + "_bn1"),
                  ((prefix + "_project_conv",), prefix + "_bn2")]

    def residual(name, module):  # noqa: ANN001, ANN202
        if type(module).__name__ != "MBConvBlock":
            return None
        return {"forward": _zennit_block_forward.__get__(module), "canonizer_sum": Sum()}

    return [NamedMergeBatchNorm(pairs), AttributeCanonizer(residual)]
