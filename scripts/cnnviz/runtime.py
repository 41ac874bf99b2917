"""ONNX Runtime sessions with deliberately chosen providers.

`auto` uses CUDA only when a CUDA session really loads (the provider being *listed* is not
enough: onnxruntime-gpu lists it even where the CUDA libraries are missing) and otherwise
falls back to CPU without printing ONNX Runtime's loud load errors. `cuda` fails clearly.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import DeviceError
from .model_file import save_with_external_data, serialize

DEVICES = ("auto", "cpu", "cuda")
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
# TF32 convolutions (the CUDA provider's default) moved input-gradient maps to r 0.993-0.9987
# against the CPU on an H200 (Grad-CAM: 0.999998); full fp32 keeps the maps the CPU's.
CUDA_OPTIONS = {"use_tf32": "0"}
QUIET = 3  # ORT log severity: errors only from here on; 4 = fatal only


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when a CUDA session really loads here (tested once, on a one-node graph)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not _cuda_libraries_present():
        return False
    probe = _identity_model()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # A failed provider load is logged by ORT's default logger, not the session's.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe, options, providers=CUDA)
    except Exception:  # noqa: BLE001 - any failure to load means "not usable"
        return False
    finally:
        ort.set_default_logger_severity(QUIET)
    return "CUDAExecutionProvider" in session.get_providers()


def _cuda_libraries_present() -> bool:
    """Look for the CUDA runtime before asking ORT, whose failed load prints to stderr."""
    import ctypes.util

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("cudart", "cublas", "cudnn"):
        if ctypes.util.find_library(name) is None and not _pip_cuda_library(name):
            return False
    return True


def _pip_cuda_library(name: str) -> bool:
    """CUDA libraries shipped as pip wheels (nvidia-*) live under site-packages/nvidia."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return False
    for root in getattr(nvidia, "__path__", []):
        if any(Path(root).rglob(f"lib{name}*.so*")):
            return True
    return False


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list for a configured device; raises DeviceError for an unusable `cuda`."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return list(CPU)
    if cuda_usable():
        return [(CUDA[0], dict(CUDA_OPTIONS)), *CUDA[1:]]
    if device == "cuda":
        raise DeviceError(
            "device: cuda was asked for, but ONNX Runtime cannot load its CUDA provider here "
            "(no GPU or no CUDA/cuDNN libraries). Use device: auto to fall back to CPU, "
            "or install the CUDA runtime matching onnxruntime-gpu."
        )
    return list(CPU)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Spinning worker threads steal the cores from whatever runs next (PNG writing, torch).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_session(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    device: str = "auto",
    threads: int | None = None,
) -> ort.InferenceSession:
    """One session per job: create it once and feed it batches."""
    return open_session(model, session_options(threads), providers_for(device))


def open_session(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    options: ort.SessionOptions,
    providers: list,
) -> ort.InferenceSession:
    """An ORT session on a file, bytes or an in-memory graph of any size.

    protobuf cannot serialize a message of 2 GiB or more, and a method graph can pass that where
    the model alone does not (LRP's rules keep modified copies of the weights: EfficientNetV2-L's
    LRP graph is over 2 GiB). Such a graph goes to ORT the way exporters write large models: a
    file with its weights beside it as external data, in a scratch folder for the session's
    creation; `model` is left as it was given."""
    if not isinstance(model, onnx.ModelProto):
        model = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(model, options, providers=providers)
    data = serialize(model)
    if data is None:  # the message would be 2 GiB or more
        return session_with_external_data(model, options, providers)
    return ort.InferenceSession(data, options, providers=providers)


def session_with_external_data(
    model: onnx.ModelProto, options: ort.SessionOptions, providers: list
) -> ort.InferenceSession:
    """A session on `model` written to a scratch folder with its weights as external data."""
    with tempfile.TemporaryDirectory(prefix="cnnviz-large-graph-") as tmp:
        path = save_with_external_data(model, Path(tmp) / "graph.onnx")
        return ort.InferenceSession(str(path), options, providers=providers)


def run_batched(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Run `session` over the leading axis of every feed in chunks, concatenating the results.

    A graph whose batch is fixed (a model exported for batch 1) gets chunks of that size."""
    fixed = [i.shape[0] for i in session.get_inputs() if i.name in feeds and i.shape]
    batch_size = min([batch_size, *(d for d in fixed if isinstance(d, int) and d > 0)])
    total = len(next(iter(feeds.values())))
    chunks: list[list[np.ndarray]] = []
    for start in range(0, total, batch_size):
        part = {k: v[start : start + batch_size] for k, v in feeds.items()}
        chunks.append(session.run(outputs, part))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _identity_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
