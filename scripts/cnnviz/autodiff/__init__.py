"""Reverse-mode differentiation of ONNX models, emitted as an ONNX graph ONNX Runtime runs.

`vjp(model, wrt, seed_outputs, policy, batch, fallback)` returns a model whose extra inputs are
the seeds (``seed:<tensor>``) and whose extra outputs are the wrt tensors and ``grad:<wrt>``.
Modules: prepare (static shapes), rules (one backward rule per op), policies (ReLU-like rules
under gradient / deconvnet / guided), fallback (in-graph central differences), builder (driver).
"""

from .builder import vjp
from .context import UnsupportedOpError
from .policies import POLICIES
from .rules import RULES

__all__ = ["POLICIES", "RULES", "UnsupportedOpError", "vjp"]
