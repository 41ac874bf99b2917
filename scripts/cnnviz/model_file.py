"""How a model lies on disk: one ONNX file, or the graph with its weights beside it.

protobuf cannot serialize a message of 2 GiB or more, so a model that large (torchvision's
regnet_y_128gf: 2.6 GB of weights) is written the way exporters write large models: the graph in
`model.onnx`, its weights in `model.onnx.data` as external data. onnx.load and ONNX Runtime read
both from the graph's path. A model that fits stays one file, what every tool reads.

Importing this module does not import onnx (the workflow's planner uses it at parse time).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

# Tensors under 1 KiB stay in the graph: ORT's shape inference reads shape constants only there.
EXTERNAL_FROM_BYTES = 1024
DATA_SUFFIX = ".data"


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model as one protobuf message, or None when it is 2 GiB or more."""
    from google.protobuf.message import EncodeError

    try:
        return model.SerializeToString()
    except EncodeError:
        return None


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """`path` with the model's weights (tensors >= EXTERNAL_FROM_BYTES) in `path`.data beside
    it; returns `path`. `model` is not changed: the graph written has references into the data
    file in place of those tensors, whose bytes are copied out one tensor at a time (onnx's
    save_model moves all of them out of the model and needs them read back: two copies of a
    model's weights at once)."""
    from onnx import TensorProto

    location = path.name + DATA_SUFFIX
    stub = copy_without(model, "graph")
    stub.graph.CopyFrom(copy_without(model.graph, "initializer"))
    with open(path.with_name(location), "wb") as fh:
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor)
            if raw is None or len(raw) < EXTERNAL_FROM_BYTES:
                stub.graph.initializer.add().CopyFrom(tensor)
                continue
            ref = stub.graph.initializer.add()
            ref.name, ref.data_type = tensor.name, tensor.data_type
            ref.dims.extend(tensor.dims)
            ref.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", fh.tell()), ("length", len(raw))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, str(value)
            fh.write(raw)
    path.write_bytes(stub.SerializeToString())
    return path


def _raw_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """A tensor's data as ONNX stores it raw (little-endian), or None for strings and tensors
    already outside."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type == TensorProto.STRING:
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def copy_without(message: object, skip: str) -> object:
    """A copy of a protobuf message leaving out field `skip` (a model without its graph, a graph
    without its initializers: the rest is small)."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(out, field.name).extend(value)
        elif field.message_type is not None:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def write_model(
    path: str | os.PathLike[str],
    model: onnx.ModelProto | bytes,
    external: bool | None = None,
) -> list[Path]:
    """Write `model` at `path` atomically; return the files written.

    One file when the model is bytes or fits one protobuf message; the graph and `path`.data
    otherwise, or whenever `external` is True. The data file goes into place before the graph,
    so a reader that finds the graph finds its weights; a data file that an earlier, larger
    version of the model left is removed when the model becomes one file.
    """
    from .artifacts import write_with

    path = Path(path)
    data_file = path.with_name(path.name + DATA_SUFFIX)
    data = model if isinstance(model, bytes) else None if external else serialize(model)
    if data is not None:
        write_with(path, lambda tmp: tmp.write_bytes(data))
        data_file.unlink(missing_ok=True)
        return [path]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = save_with_external_data(model, Path(tmp) / path.name)
        os.replace(staged.with_name(data_file.name), data_file)
        os.replace(staged, path)
    return [path, data_file]


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The graph file and the external data files its tensors name."""
    return [Path(path), *external_data_files(path)]


def model_bytes(path: str | os.PathLike[str]) -> int:
    """The size of the model's files together (0 for those missing)."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file())


def checksum(path: str | os.PathLike[str]) -> str:
    """sha256 over the model's files in order: the graph, then its external data. For a model
    in one file this is the file's own sha256."""
    digest = hashlib.sha256()
    for name in model_files(path):
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_EXTERNAL_CACHE: dict[str, list[str]] = {}


def external_data_files(model_path: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX model's tensors name (beside the model), parsed once per
    version of the file. Empty when the file does not parse: export reports that."""
    path = Path(model_path)
    key = stat_key(path)
    if key not in _EXTERNAL_CACHE:
        names: set[str] = set()
        try:
            import onnx
            from onnx.external_data_helper import _get_all_tensors, uses_external_data

            model = onnx.load(str(path), load_external_data=False)
            for tensor in _get_all_tensors(model):
                if uses_external_data(tensor):
                    entry = {e.key: e.value for e in tensor.external_data}
                    if entry.get("location"):
                        names.add(entry["location"])
        except Exception:  # noqa: BLE001 - not our error to raise here
            names = set()
        _EXTERNAL_CACHE[key] = sorted(names)
    return [path.parent / name for name in _EXTERNAL_CACHE[key]]


def stat_key(path: Path) -> str:
    """A file's version: its change time too, which a write sets and no one can set back."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
