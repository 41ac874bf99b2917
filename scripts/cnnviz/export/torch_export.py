"""torch.onnx.export into one self-contained ModelProto, and torch's logits for verification."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper

from ..errors import ModelError
from .simplify import simplify

EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
MAX_IR_VERSION = 10  # ORT 1.31 reads IR <= 13; 10 is what opset 18 needs at most
INPUT, OUTPUT, BATCH = "input", "logits", "batch"


def export_onnx(module: Any, size: tuple[int, int], exporter: str, where: str) -> onnx.ModelProto:
    """Export `module` for [batch, 3, H, W] input: simplified, batch dim symbolic."""
    import torch

    if exporter not in EXPORTERS:
        raise ModelError(f"{where}: exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    example = torch.zeros(1, 3, *size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = _export(module, example, exporter)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporters raise many types
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ModelError(
            f"{where}: torch.onnx.export ({exporter}) failed: {exc}. "
            f"Try exporter: {other}, or export the model to ONNX yourself and use onnx:<path>"
        ) from exc
    model = simplify(model, inplace=True)
    _symbolic_batch(model, where)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def _export(module: Any, example: Any, exporter: str) -> onnx.ModelProto:
    """torch.onnx.export into a scratch folder, read back with any external data inlined: past
    2 GiB of weights both exporters write them beside the graph (a buffer cannot take them;
    dynamo is told to, TorchScript does it by itself)."""
    import torch

    dynamo = exporter == "dynamo"
    quiet = _quiet_dynamo() if dynamo else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix=f"cnnviz-{exporter}-") as tmp, quiet:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}},
            opset_version=OPSET[exporter],
            dynamo=dynamo,
            **({"external_data": True, "verbose": False} if dynamo else {}),
        )
        return _load_inlined(path)


def _load_inlined(path: Path) -> onnx.ModelProto:
    """The model at `path` with any external data read into its tensors (the files go away)."""
    model = onnx.load(str(path), load_external_data=True)
    onnx.external_data_helper.convert_model_from_external_data(model)
    return model


@contextlib.contextmanager
def _quiet_dynamo() -> Iterator[None]:
    """Hide dynamo's progress lines (stdout) and onnxscript's per-rewrite INFO logs."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _symbolic_batch(model: onnx.ModelProto, where: str) -> None:
    """Name the leading dim of the input and output 'batch'; fail if the exporter fixed it."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value"):
            raise ModelError(
                f"{where}: the exporter fixed the batch size of {value.name!r} to "
                f"{dim.dim_value}; try the other exporter"
            )
        dim.dim_param = BATCH


def torch_logits(module: Any, batch: np.ndarray) -> np.ndarray:
    """The module's float32 output for a [N, 3, H, W] batch."""
    import torch

    with torch.no_grad():
        out = module.eval()(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    if isinstance(out, tuple | list):
        out = out[0]
    return out.detach().cpu().numpy().astype(np.float32)


def torch_version() -> str:
    import torch

    return str(torch.__version__).split("+")[0]
