"""What a backward rule sees: static shapes, constants, and a small node emitter.

Rules never touch the graph directly. They read facts about forward tensors (`shape`, `dtype`,
`value`, `active`) and emit backward nodes with `op`/`const`; the builder collects what they emit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError
from .prepare import Constants


class UnsupportedOpError(ModelError):
    """An op has no backward rule (or a rule cannot handle how the node is configured)."""


class Emitter:
    """Emits ONNX nodes and constants with fresh names under `scope` (collected, not placed)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self.scope = "bwd"

    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{self.scope}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str:
        """Emit one node; returns its (first) output name (see `op_multi` for several)."""
        return self.op_multi(op_type, inputs, n_out, **attrs)[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs) -> list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return outputs

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), dtype=np.int64), "i")

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", [x, self.ints(shape)])


class Context(Emitter):
    """Facts about the prepared forward graph plus an emitter for backward nodes."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, int],
        constants: Constants,
        active: set[str],
        opset: int,
        policy: str,
    ) -> None:
        super().__init__()
        self.shapes = shapes
        self.dtypes = dtypes
        self.constants = constants
        self.active_tensors = active
        self.opset = opset
        self.policy = policy
        self.node_rules: dict = {}  # {node's first output: Rule}, see builder.NodeRules
        self.flipped_bytes = 0  # weights copied as flipped kernels so far (rules.FLIP_BUDGET_BYTES)

    # ---- facts about forward tensors -------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        if name in self.constants:
            return tuple(self.constants.shape(name))
        raise ModelError(
            f"tensor {name!r} has no static shape after shape inference; the backward graph "
            "needs every differentiated tensor's shape (fix symbolic dims other than batch "
            "when exporting)"
        )

    def np_dtype(self, name: str) -> np.dtype:
        if name in self.constants:
            return self.constants[name].dtype
        if name not in self.dtypes:
            raise ModelError(f"tensor {name!r} has no inferred element type")
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtypes[name]))

    def known_const(self, array: np.ndarray, hint: str = "c") -> str:
        """A constant that rules can read back with `value`, decoded from the graph's own copy
        when read (LRP's rule-modified weights: not kept twice)."""
        name = self.const(array, hint)
        self.constants.refer(self.initializers[-1])
        return name

    def value(self, name: str) -> np.ndarray | None:
        """The tensor's value when it is a constant (initializer or folded), else None."""
        return self.constants.get(name) if name else None

    def active(self, name: str) -> bool:
        """True when `name` depends on a wrt tensor and leads to a seed (needs an adjoint)."""
        return bool(name) and name in self.active_tensors

    # ---- emitting backward nodes -------------------------------------------------------------
    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the dtype of tensor `like`."""
        return self.const(np.array(value, dtype=self.np_dtype(like)), "k")

    # ---- small building blocks shared by rules -----------------------------------------------
    def zeros(self, shape: Sequence[int], like: str) -> str:
        value = numpy_helper.from_array(np.zeros(1, dtype=self.np_dtype(like)))
        return self.op("ConstantOfShape", [self.ints(shape)], value=value)

    def between(self, x: str, lo: str | float | None, hi: str | float | None) -> str:
        """Float mask of lo < x < hi (strict, like torch's ReLU/hardtanh backward)."""
        parts = []
        if lo is not None:
            b = lo if isinstance(lo, str) else self.scalar(lo, x)
            parts.append(self.op("Greater", [x, b]))
        if hi is not None:
            b = hi if isinstance(hi, str) else self.scalar(hi, x)
            parts.append(self.op("Less", [x, b]))
        if not parts:
            return self.scalar(1.0, x)
        both = parts[0] if len(parts) == 1 else self.op("And", parts)
        return self.op("Cast", [both], to=helper.np_dtype_to_tensor_dtype(self.np_dtype(x)))

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: bool) -> str:
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op("ReduceSum", [x], axes=list(axes), keepdims=int(keepdims))

    def unbroadcast(self, g: str, g_shape: Sequence[int], target: Sequence[int]) -> str:
        """Sum gradient `g` (shape g_shape) down to a broadcast operand's shape `target`."""
        g_shape, target = tuple(g_shape), tuple(target)
        if g_shape == target:
            return g
        lead = len(g_shape) - len(target)
        padded = (1,) * lead + target
        pairs = enumerate(zip(g_shape, padded, strict=True))
        axes = [i for i, (a, b) in pairs if b == 1 and a != 1]
        out = self.reduce_sum(g, sorted(axes), keepdims=True) if axes else g
        return self.reshape(out, target)


def attrs_of(node: onnx.NodeProto) -> dict:
    """Node attributes as Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out
