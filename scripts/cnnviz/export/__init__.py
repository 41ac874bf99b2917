"""The export step: a model source -> results/models/{model}/model.onnx + model.json (and
model.onnx.data, the weights, for a model past protobuf's 2 GiB: `model_file`).

torch sources are exported with torch.onnx.export and verified against torch on a real photo;
an onnx:<path> source is checked and copied. Importing this package does not import torch.
"""

from __future__ import annotations

import copy
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError, ModelError
from ..graph import (
    conv_layers,
    dequantized_views,
    input_name,
    quantized_ops,
    record_shapes,
    strip_softmax,
    weightless,
)
from ..model_file import checksum, serialize, write_model
from ..modelcard import save_card
from .labels import check_count, default_labels, read_labels
from .onnx_io import (
    RAW_PIXELS,
    InputSpec,
    adapt_input,
    fix_image_size,
    read_input,
    to_model_input,
    unpin_reshapes,
)
from .outputs import cast_before_activation, flatten_scores, select_output, strip_sigmoid
from .precision import RELATIVE_TOLERANCE as LOW_PRECISION_TOLERANCE
from .precision import widen_to_float32
from .sources import (
    DEFAULT_PREPROCESS,
    check_weights,
    efficientnet_lite0,
    load_onnx_file,
    parse_source,
    torchvision_model,
)
from .transposes import sink_transposes

__all__ = ["export_model"]

log = logging.getLogger("cnnviz.export")
ONNX_FILE = "model.onnx"
RELATIVE_TOLERANCE = 1e-3  # of the largest |logit|, at least 1e-3 absolute


def export_model(
    name: str,
    source: str,
    out_dir: str | Path,
    weights: str = "pretrained",
    exporter: str = "torchscript",
    preprocess: dict | None = None,
    labels: list[str] | str | None = None,
    verify_image: np.ndarray | None = None,
    threads: int | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Write `out_dir/model.onnx` and `out_dir/model.json`; return the card.

    `preprocess` overrides keys of the source's own preprocessing; `labels` replaces its class
    names. `verify_image` (HxWx3 uint8, default skimage's chelsea) is the photo on which ONNX
    Runtime must reproduce torch's logits. `output` names the graph output holding the class
    scores of an onnx: model with several.

    The model.onnx written always takes float32 [N, 3, H, W] RGB (see `onnx_io`): an onnx:
    model made for NHWC, BGR, grey, float64 or uint8 input gets an input adapter in front, and
    a float16 model is computed in float32 (see `precision`).
    """
    out_dir = Path(out_dir)
    where = f"model {name!r} ({source})"
    kind, arg = parse_source(source)
    started = time.perf_counter()
    image, image_name = _verify_photo(verify_image)
    if kind == "onnx":
        model, data, pre, class_names, output_kind, verification, input_entry = _from_onnx(
            arg, where, preprocess, labels, image, image_name, threads, output
        )
        weights_kind = "file"
        exporter_info: dict[str, Any] = {"torch": None, "dynamo": None}
    else:
        check_weights(weights, source)
        model, data, pre, class_names, verification = _from_torch(
            kind, arg, weights, exporter, where, preprocess, labels, image, image_name, threads
        )
        output_kind, weights_kind = "logits", weights
        input_entry = _input_entry(model)
        from .torch_export import torch_version

        exporter_info = {"torch": torch_version(), "dynamo": exporter == "dynamo"}
    layers = conv_layers(model)
    write_model(out_dir / ONNX_FILE, data)  # past 2 GiB with model.onnx.data beside it
    card = {
        "name": name,
        "source": _card_source(kind, arg, source),
        "weights": weights_kind,
        "onnx": ONNX_FILE,
        "sha256": checksum(out_dir / ONNX_FILE),
        "opset": _opset(model),
        "input": input_entry,
        "output": {
            "name": model.graph.output[0].name,
            "kind": output_kind,
            "num_classes": len(class_names),
        },
        "preprocess": pre,
        "labels": class_names,
        "layers": layers,
        "verification": verification,
        "exporter": exporter_info,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if not card["layers"]:
        log.warning("%s: the graph has no Conv layers; activation pictures will be empty", where)
    save_card(out_dir, card)
    log.info(
        "%s: exported in %.1f s, %d conv layers, verification %s",
        where,
        time.perf_counter() - started,
        len(card["layers"]),
        verification,
    )
    return card


# --------------------------------------------------------------------------- torch sources


def _from_torch(
    kind: str,
    arg: str,
    weights: str,
    exporter: str,
    where: str,
    preprocess: dict | None,
    labels: list[str] | str | None,
    image: Any,
    image_name: str,
    threads: int | None,
) -> tuple[onnx.ModelProto, bytes | onnx.ModelProto, dict, list[str], dict]:
    import torch

    from .torch_export import export_onnx, torch_logits

    if threads:
        torch.set_num_threads(threads)
    src = efficientnet_lite0(weights) if kind == "efficientnet" else torchvision_model(arg, weights)
    if src.note:
        log.info("%s: %s", where, src.note)
    pre = _merge_preprocess(src.preprocess, preprocess)
    check_preprocess(pre, where)
    size = (int(pre["size"][0]), int(pre["size"][1]))
    model = export_onnx(src.module, size, exporter, where)
    data = _serialize_checked(model, where)
    batch = _photo_batch(image, pre)
    expected = torch_logits(src.module, batch)
    got = _ort_logits(data, batch, threads)
    if got.shape != expected.shape:
        raise ModelError(f"{where}: ONNX output shape {got.shape} != torch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= tolerance:
        raise ModelError(
            f"{where}: ONNX Runtime's logits differ from torch's by {diff:.3g} on the "
            f"{image_name} photo (tolerance {tolerance:.3g}); try the other exporter"
        )
    class_names = read_labels(labels, where) if labels is not None else src.labels
    check_count(class_names, int(expected.shape[1]), where)
    verification = {
        "reference": "torch",
        "image": image_name,
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "top1": _top1(got[0], class_names, "logits"),
    }
    return model, data, pre, class_names, verification


# --------------------------------------------------------------------------- onnx:<path>


def _from_onnx(
    arg: str,
    where: str,
    preprocess: dict | None,
    labels: list[str] | str | None,
    image: Any,
    image_name: str,
    threads: int | None,
    output: str | None = None,
) -> tuple[onnx.ModelProto, bytes | onnx.ModelProto, dict, list[str], str, dict, dict]:
    model, path = load_onnx_file(arg)
    if model.ir_version > 10:
        model.ir_version = 10
    spec = read_input(model, path, (preprocess or {}).get("layout"))
    _ort_session(model, threads, f"ONNX model {path}")  # loads at all?
    model = select_output(model, output, where)
    model = cast_before_activation(model)  # Softmax -> Cast to float32: Cast -> Softmax
    model, stripped = strip_softmax(model)
    model, sigmoid = strip_sigmoid(model)
    model = dequantized_views(model)  # a quantized conv's layer picture, as float
    pre = _onnx_preprocess(spec, preprocess, where)
    given = fix_image_size(model, spec, pre["size"])
    order = str(pre.get("channel_order", "RGB")).upper()
    model, low = widen_to_float32(given)  # float16: computed (and differentiated) in float32
    wide_spec = read_input(model, path, spec.layout) if low else spec
    model, adapter = adapt_input(model, wide_spec, order)
    if adapter:  # the adapter's Transpose meets the model's own; checked below (_check_adapter)
        model = sink_transposes(model)
    model = _symbolic_batch_if_possible(model, spec.dims, pre, threads)
    try:
        model = record_shapes(model)  # static shapes where inference stops (com.microsoft ops)
    except Exception as exc:  # noqa: BLE001 - shapes are a help, not a requirement
        log.warning("%s: could not record every tensor's shape: %s", where, exc)
    data = _serialize_checked(model, where, strict=False)
    batch = _photo_batch(image, pre)
    out = _ort_logits(data, batch, threads)
    flattened = out.ndim > 2 and all(d == 1 for d in out.shape[2:])
    if flattened:
        model = flatten_scores(model)
        data = _serialize_checked(model, where, strict=False)
        out = _ort_logits(data, batch, threads)
    if out.ndim != 2:
        raise ModelError(
            f"{where}: the model's output {model.graph.output[0].name!r} has shape "
            f"{list(out.shape)}; cnnviz needs class scores shaped [batch, classes]"
            + (f" (set {_key(where, 'output')} to the output that holds them)" if output else "")
        )
    if not np.all(np.isfinite(out)):
        raise ModelError(f"{where}: the model's output on the {image_name} photo is not finite")
    sums = out.sum(axis=1)
    looks_like_probs = bool(
        np.all(out >= 0) and np.all(out <= 1) and np.allclose(sums, 1, atol=1e-3)
    )
    output_kind = "probabilities" if looks_like_probs and not stripped else "logits"
    output_kind = "sigmoid_logits" if sigmoid else output_kind
    num_classes = int(out.shape[1])
    class_names = read_labels(labels, where) if labels is not None else default_labels(num_classes)
    check_count(class_names, num_classes, where)
    verification: dict[str, Any] = {
        "reference": None,
        "image": image_name,
        "max_abs_diff": None,
        "tolerance": None,
        "top1": _top1(out[0], class_names, output_kind),
    }
    if adapter or low:
        verification.update(
            _check_adapter(given, batch, out, spec, order, where, threads, bool(adapter), low)
        )
    notes = _changes(model, stripped, sigmoid, flattened, where)
    quantized = quantized_ops(model)
    if quantized:
        notes.append(
            f"quantized (integer) graph: {', '.join(quantized)}; the gradient methods need a "
            "float model (no gradient through integer ops): export the float model for them"
        )
        verification["quantized_ops"] = quantized
    if notes:
        verification["note"] = "; ".join(notes)
    entry = {**_input_entry(model), "model_input": spec.entry(order), "adapter": adapter}
    if low:
        entry["precision"] = _precision(low)
    return model, data, pre, class_names, output_kind, verification, entry


def _precision(low: list[str]) -> str:
    """The card's words for a widened model (export/precision.py)."""
    return f"{' and '.join(low)} model computed in float32"


def _changes(
    model: onnx.ModelProto, softmax: bool, sigmoid: bool, flattened: bool, where: str
) -> list[str]:
    """The card's notes on what export changed at the output, and on a batch left fixed."""
    notes = ["final Softmax removed: the output is the logits"] if softmax else []
    if sigmoid:
        notes.append("final Sigmoid removed: the output is the logits (each class's own)")
    if flattened:
        notes.append("class scores shaped [batch, classes, 1, 1] flattened to [batch, classes]")
    fixed = _input_entry(model)["shape"][0]
    if isinstance(fixed, int):
        notes.append(
            f"the graph fixes its batch at {fixed} (it could not be made dynamic): jobs feed "
            f"{fixed} image(s) per call, and occlusion needs a dynamic batch; re-export the model "
            "with a dynamic batch axis for speed and occlusion"
        )
        log.warning("%s: %s", where, notes[-1])
    return notes


def _onnx_preprocess(spec: InputSpec, given: dict | None, where: str) -> dict:
    """The card's preprocess of an onnx: model: the config's over the defaults, the size the
    input declares, raw pixels for a uint8 input, the layout read from the input."""
    pre = _merge_preprocess(DEFAULT_PREPROCESS, given)
    pre["layout"] = spec.layout
    if spec.dtype == "uint8":
        pre = _raw_pixels(pre, given, where)
    declared = spec.size
    if all(isinstance(v, int) for v in declared):
        if given is None or "size" not in given:
            pre["size"] = list(declared)
        elif list(pre["size"]) != list(declared):
            raise ModelError(
                f"{where}: preprocess.size {pre['size']} does not match the model's input "
                f"{spec.dims}; set size to {list(declared)}"
            )
    else:
        log.info("%s: dynamic height/width fixed to %s (preprocess.size)", where, pre["size"])
    if pre.get("resize") == "center_crop" and "resize_to" not in (given or {}):
        pre["resize_to"] = int(round(max(pre["size"]) * 256 / 224))  # torchvision's 224/256
    check_preprocess(pre, where)
    return pre


def _raw_pixels(pre: dict, given: dict | None, where: str) -> dict:
    """A uint8 input takes raw 0..255 pixels: scale 1, mean 0, std 1 (any other is refused)."""
    clash = [
        key
        for key, value in RAW_PIXELS.items()
        if key in (given or {}) and np.any(np.asarray(given[key], float) != np.asarray(value))
    ]
    if clash:
        raise ConfigError(
            f"{where}: the model's input is uint8 (raw 0..255 pixels, any normalization is "
            f"inside the graph), but {_key(where, 'preprocess')} sets {', '.join(clash)}; "
            "remove them from the config"
        )
    return {**pre, **copy.deepcopy(RAW_PIXELS)}


def _check_adapter(
    given: onnx.ModelProto,
    batch: np.ndarray,
    out: np.ndarray,
    spec: InputSpec,
    order: str,
    where: str,
    threads: int | None,
    adapter: bool = True,
    low: list[str] | None = None,
) -> dict[str, Any]:
    """The adapted (and widened) graph against the model as given, fed the same photo in its
    own input. A float16 model as given rounds its intermediates to float16, the widened one
    to float32: their scores differ by about 1e-3 of the largest, hence the wider tolerance."""
    expected = _ort_logits(given, to_model_input(batch, spec, order), threads)
    expected = expected.reshape(out.shape)  # the given model's [N, C, 1, 1]: flattened in `out`
    diff = float(np.max(np.abs(out - expected)))
    relative = LOW_PRECISION_TOLERANCE if low else 1e-5
    tolerance = relative * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= tolerance:
        what = "fed through cnnviz's input adapter" if adapter else ""
        if low:
            what += (" and " if what else "") + f"widened from {' and '.join(low)} to float32"
        hint = (
            "check preprocess.layout and channel_order"
            if adapter
            else "the model depends on float16 rounding or overflow; export it in float32"
        )
        raise ModelError(
            f"{where}: the model {what} differs from the model as given by {diff:.3g} "
            f"(tolerance {tolerance:.3g}) on the photo; {hint}"
        )
    return {"reference": "the model's own input", "max_abs_diff": diff, "tolerance": tolerance}


def _key(where: str, key: str) -> str:
    name = where.split("'")[1] if where.count("'") >= 2 else "<name>"
    return f"models.{name}.{key}"


def _symbolic_batch_if_possible(
    model: onnx.ModelProto, dims: list[int | str], pre: dict, threads: int | None
) -> onnx.ModelProto:
    """Make a fixed batch dim symbolic when the graph still computes the same per image.

    Converters often pin the batch inside the graph too (tf2onnx, Keras: a Reshape to
    [1, 1280]); such a Reshape's leading 1 becomes 0 (ONNX: "copy the input's dim"), kept
    only when every image of a batch of two still gets its own scores.
    """
    if not isinstance(dims[0], int):
        return _name_batch(model)
    x = np.random.default_rng(0).standard_normal((2, 3, *pre["size"])).astype(np.float32)
    trial = _name_batch(model, clear_fixed=True)
    for candidate in (trial, unpin_reshapes(trial, dims[0])):
        if candidate is not None and _same_per_image(candidate, x, threads):
            if candidate is not trial:
                log.info("Reshapes that fixed the batch at %d made batch-free", dims[0])
            return candidate
    return model


def _same_per_image(model: onnx.ModelProto, x: np.ndarray, threads: int | None) -> bool:
    try:
        both = _ort_logits(model, x, threads)
        each = [_ort_logits(model, x[i : i + 1], threads) for i in range(len(x))]
    except Exception:  # noqa: BLE001 - the graph hard-codes its batch
        return False
    singles = np.concatenate(each)
    return both.shape == singles.shape and np.allclose(both, singles, rtol=1e-4, atol=1e-5)


def _name_batch(model: onnx.ModelProto, clear_fixed: bool = False) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    name = input_name(out)
    values = [v for v in out.graph.input if v.name == name] + list(out.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and (clear_fixed or not dims[0].HasField("dim_value")):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    if clear_fixed:
        del out.graph.value_info[:]
    return out


# --------------------------------------------------------------------------- shared helpers


def check_preprocess(pre: dict, where: str) -> None:
    """The preprocessing a model's images get, checked at export (so the export job names the
    config key to fix, instead of every image job failing later)."""
    name = where.split("'")[1] if where.count("'") >= 2 else "<name>"
    key = f"models.{name}.preprocess"
    size = [int(v) for v in pre["size"]]
    if pre.get("resize", "center_crop") not in ("center_crop", "stretch"):
        raise ConfigError(
            f"{where}: {key}.resize {pre.get('resize')!r} is not one of center_crop, stretch; "
            "fix it in the config"
        )
    if pre.get("resize", "center_crop") == "center_crop" and "resize_to" in pre:
        if int(pre["resize_to"]) < max(size):
            raise ConfigError(
                f"{where}: {key}.resize_to {pre['resize_to']} is smaller than the crop size "
                f"{size[0]}x{size[1]}; set resize_to >= {max(size)} in the config"
            )
    for stat in ("mean", "std"):
        if len(np.atleast_1d(pre.get(stat, [0.0]))) not in (1, 3):
            raise ConfigError(
                f"{where}: {key}.{stat} {pre.get(stat)} has neither 3 values (one per channel) "
                "nor 1 (all channels); fix it in the config"
            )
    if str(pre.get("channel_order", "RGB")).upper() not in ("RGB", "BGR"):
        raise ConfigError(
            f"{where}: {key}.channel_order {pre.get('channel_order')!r} is not RGB or BGR; "
            "fix it in the config"
        )


def _merge_preprocess(base: dict, override: dict | None) -> dict:
    pre = {**copy.deepcopy(base), **copy.deepcopy(override or {})}
    if pre.get("resize") == "stretch":
        pre.pop("resize_to", None)
    return pre


def _verify_photo(image: np.ndarray | None) -> tuple[Any, str]:
    """A PIL RGB image of the verification photo and its name for the card."""
    from PIL import Image

    from ..images import to_rgb

    if image is None:
        import skimage.data

        return to_rgb(Image.fromarray(skimage.data.chelsea())), "chelsea"
    return to_rgb(Image.fromarray(np.asarray(image))), "custom"


def _photo_batch(image: Any, pre: dict) -> np.ndarray:
    """[2, 3, H, W]: the photo and its mirror image, so a batch of more than one is tested."""
    from PIL import Image

    from ..images import preprocess

    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.stack([preprocess(image, pre), preprocess(mirrored, pre)]).astype(np.float32)


def _ort_session(model: onnx.ModelProto | bytes, threads: int | None, what: str) -> Any:
    from ..runtime import make_session

    try:
        return make_session(model, device="cpu", threads=threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ModelError(f"{what} does not load in ONNX Runtime: {exc}") from exc


def _ort_logits(
    model: onnx.ModelProto | bytes, batch: np.ndarray, threads: int | None
) -> np.ndarray:
    """The first output for `batch`; image by image when the graph's batch is fixed."""
    session = _ort_session(model, threads, "the exported ONNX graph")
    node = session.get_inputs()[0]
    output = session.get_outputs()[0].name
    step = node.shape[0] if isinstance(node.shape[0], int) else len(batch)
    parts = [
        session.run([output], {node.name: batch[i : i + step]})[0]
        for i in range(0, len(batch), step)
    ]
    return np.concatenate(parts).astype(np.float32)


def _top1(scores: np.ndarray, labels: list[str], kind: str) -> dict[str, Any]:
    if kind == "probabilities":
        probs = scores.astype(np.float64)
    elif kind == "sigmoid_logits":
        probs = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
    else:
        shifted = np.exp(scores.astype(np.float64) - scores.max())
        probs = shifted / shifted.sum()
    index = int(np.argmax(probs))
    return {"index": index, "label": labels[index], "prob": round(float(probs[index]), 4)}


def _input_entry(model: onnx.ModelProto) -> dict[str, Any]:
    name = input_name(model)
    value = next(v for v in model.graph.input if v.name == name)
    dims = value.type.tensor_type.shape.dim
    shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return {"name": name, "shape": shape, "dtype": "float32", "layout": "NCHW",
            "channel_order": "RGB"}  # fmt: skip


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _card_source(kind: str, arg: str, source: str) -> str:
    return f"onnx:{Path(arg).expanduser().resolve()}" if kind == "onnx" else source


def _serialize_checked(
    model: onnx.ModelProto, where: str, strict: bool = True
) -> bytes | onnx.ModelProto:
    """The model's bytes, serialized once, after onnx.checker (a warning only if not strict).

    A model of 2 GiB or more cannot be one protobuf message: it is returned as it is (written
    with external data, `model_file`), and the checker sees its graph without the weights."""
    data = serialize(model)
    try:
        onnx.checker.check_model(data if data is not None else weightless(model))
    except onnx.checker.ValidationError as exc:
        if strict:
            raise ModelError(f"{where}: the ONNX graph fails onnx.checker: {exc}") from exc
        log.warning("%s: onnx.checker complains (ONNX Runtime loads it): %s", where, exc)
    return data if data is not None else model
