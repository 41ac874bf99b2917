"""Models as other converters lay them out (issue 16, items 2 and 4), each beside its twin.

Built with onnx.helper the way tf2onnx/Keras exports, Caffe conversions and raw-pixel exports
write them: an NHWC input with a Transpose to NCHW, BatchNormalization unfolded into Mul/Add,
an explicit constant Pad, a Softmax output; BGR input with mean subtraction in 0..255; a uint8
NHWC input Cast to float with the normalization (Sub/Mul) inside the graph. Each has a twin:
the same weights laid out as cnnviz's own input (NCHW, RGB, float), so the twin computes the
same function of the image. Through export, gradcheck and every per-image method, the
converter-style model's maps must equal the twin's, in image coordinates (the input is not
square, so a transposed map has the wrong shape) and with signed channels in RGB order.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz import modelcard, registry
from cnnviz.autodiff.gradcheck import gradcheck
from cnnviz.errors import ConfigError, ModelError
from cnnviz.export import export_model
from cnnviz.images import stage_shard
from cnnviz.methods.explain import explain_shard
from cnnviz.methods.shard_maps import read_array, read_index, read_shard_maps
from cnnviz.registry import SCORED
from onnx import TensorProto, helper, numpy_helper
from onnx_build import finish_model
from PIL import Image

H, W = 20, 16  # not square: a map in the wrong layout has the wrong shape
CLASSES = 5
MEAN_BGR = [104.0, 117.0, 123.0]
PIXEL_MEAN = np.array([124.0, 116.0, 104.0], np.float32)  # RGB, 0..255
PIXEL_STD = np.array([58.0, 57.0, 57.5], np.float32)
OPTIONS = {"samples": 2, "steps": 4, "window": 4, "stride": 4, "batch_size": 4}
# Methods that store a signed map beside the heat map: the RGB gradient pictures and the
# relevance pictures (their registry entries read as relevance).
SIGNED = {"guided_backprop", "deconvnet", "guided_gradcam"} | {
    m.name for m in registry.METHODS.values() if m.reading == registry.RELEVANCE_READING
}


def _weights(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    gamma, beta = rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8)
    mean, var = rng.normal(0, 0.1, 8), rng.uniform(0.5, 1.5, 8)
    scale = gamma / np.sqrt(var + 1e-3)
    return {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(f32),
        "bn_mul": scale.astype(f32).reshape(1, 8, 1, 1),  # BN unfolded (tf2onnx, Keras)
        "bn_add": (beta - mean * scale).astype(f32).reshape(1, 8, 1, 1),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(f32),
        "fc": (rng.standard_normal((CLASSES, 8)) * 0.5).astype(f32),
        "fc_b": rng.normal(0, 0.1, CLASSES).astype(f32),
    }


def _body(x: str, weights: dict[str, np.ndarray], pad_mode: str = "constant") -> list:
    """NCHW float `x` -> Conv -> Mul/Add (BN) -> Relu -> Pad -> Conv/2 -> Relu -> GAP -> Gemm."""
    return [
        helper.make_node(
            "Conv", [x, "w1"], ["c1"], name="conv1/Conv2D", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Mul", ["c1", "bn_mul"], ["bn1"], name="bn1/mul"),
        helper.make_node("Add", ["bn1", "bn_add"], ["bn2"], name="bn1/add"),
        helper.make_node("Relu", ["bn2"], ["r1"], name="conv1/Relu"),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad2/Pad", mode=pad_mode),
        helper.make_node(
            "Conv", ["p1", "w2"], ["c2"], name="conv2/Conv2D", strides=[2, 2], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="conv2/Relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], transB=1, name="dense/MatMul"),
        helper.make_node("Softmax", ["logits"], ["predictions"], axis=1),
    ]


def _model(nodes, weights, x, name: str) -> onnx.ModelProto:
    y = helper.make_tensor_value_info(
        "predictions", TensorProto.FLOAT, [x.type.tensor_type.shape.dim[0].dim_param or 1, CLASSES]
    )
    return finish_model(nodes, weights, [x], [y], name=name)


def keras_style(nhwc: bool, pad_mode: str = "constant") -> onnx.ModelProto:
    """tf2onnx / Keras: input_1 [N, H, W, 3] -> Transpose -> body -> Softmax."""
    weights = _weights()
    if not nhwc:
        x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 3, H, W])
        return _model(_body("input_1", weights, pad_mode), weights, x, "keras_twin")
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", H, W, 3])
    to_nchw = helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2])
    return _model([to_nchw, *_body("nchw", weights, pad_mode)], weights, x, "keras")


def caffe_style(bgr: bool) -> onnx.ModelProto:
    """A Caffe conversion: data [1, 3, H, W], BGR, mean subtracted in 0..255 (on the host).
    The twin takes RGB: its first conv reads the input channels in reverse."""
    weights = _weights()
    if not bgr:
        weights["w1"] = np.ascontiguousarray(weights["w1"][:, ::-1])
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, H, W])
    return _model(_body("data", weights), weights, x, "caffe" if bgr else "caffe_twin")


def uint8_style(uint8: bool) -> onnx.ModelProto:
    """Raw pixels: image uint8 [N, H, W, 3] -> Cast -> Sub mean -> Mul 1/std -> Transpose ->
    body. The twin takes float NCHW 0..255 pixels with the same Sub/Mul per channel."""
    weights = _weights()
    if uint8:
        x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", H, W, 3])
        shape = (1, 1, 1, 3)
        head = [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["pixels", "pixel_mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "pixel_gain"], ["scaled"]),
            helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        ]
    else:
        x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])
        shape = (1, 3, 1, 1)
        head = [
            helper.make_node("Sub", ["image", "pixel_mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "pixel_gain"], ["nchw"]),
        ]
    weights["pixel_mean"] = PIXEL_MEAN.reshape(shape)
    weights["pixel_gain"] = (1 / PIXEL_STD).reshape(shape)
    return _model([*head, *_body("nchw", weights)], weights, x, "raw" if uint8 else "raw_twin")


def tf2onnx_unoptimized() -> onnx.ModelProto:
    """tf2onnx without its optimizer: NHWC between the convs, a Transpose on each side of
    every Conv, BN's Mul/Add with [1, 1, 1, C] constants, Pad on NHWC, GAP as ReduceMean."""
    weights = _weights()
    weights["bn_mul"] = weights["bn_mul"].reshape(1, 1, 1, 8)
    weights["bn_add"] = weights["bn_add"].reshape(1, 1, 1, 8)
    weights["pads"] = np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64)
    weights["hw"] = np.array([1, 2], np.int64)

    def transpose(x: str, y: str, perm: list[int]) -> onnx.NodeProto:
        return helper.make_node("Transpose", [x], [y], perm=perm)

    nchw, nhwc = [0, 3, 1, 2], [0, 2, 3, 1]
    nodes = [
        transpose("input_1", "x_nchw", nchw),
        helper.make_node("Conv", ["x_nchw", "w1"], ["c1"], name="conv1/Conv2D", pads=[1] * 4,
                         kernel_shape=[3, 3]),
        transpose("c1", "c1_nhwc", nhwc),
        helper.make_node("Mul", ["c1_nhwc", "bn_mul"], ["bn1"]),
        helper.make_node("Add", ["bn1", "bn_add"], ["bn2"]),
        helper.make_node("Relu", ["bn2"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads"], ["p1"]),
        transpose("p1", "p1_nchw", nchw),
        helper.make_node("Conv", ["p1_nchw", "w2"], ["c2"], name="conv2/Conv2D", strides=[2, 2],
                         kernel_shape=[3, 3]),
        transpose("c2", "c2_nhwc", nhwc),
        helper.make_node("Relu", ["c2_nhwc"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "hw"], ["g"], keepdims=0),
        helper.make_node("Gemm", ["g", "fc", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["predictions"], axis=1),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", H, W, 3])
    y = helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__0", CLASSES])
    model = helper.make_model(
        helper.make_graph(nodes, "tf2onnx", [x], [y],
                          [numpy_helper.from_array(v, k) for k, v in weights.items()]),
        opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


STRETCH = {"resize": "stretch"}
# name -> (model, twin, model's preprocess, twin's preprocess)
PAIRS = {
    "keras": (
        lambda: keras_style(True),
        lambda: keras_style(False),
        {**STRETCH, "scale": 127.5, "mean": [1.0] * 3, "std": [1.0] * 3},
        {**STRETCH, "scale": 127.5, "mean": [1.0] * 3, "std": [1.0] * 3},
    ),
    "caffe": (
        lambda: caffe_style(True),
        lambda: caffe_style(False),
        {**STRETCH, "scale": 1.0, "mean": MEAN_BGR, "std": [1.0] * 3, "channel_order": "BGR"},
        {**STRETCH, "scale": 1.0, "mean": MEAN_BGR[::-1], "std": [1.0] * 3},
    ),
    "tf2onnx": (
        tf2onnx_unoptimized,
        lambda: keras_style(False),
        {**STRETCH, "scale": 127.5, "mean": [1.0] * 3, "std": [1.0] * 3},
        {**STRETCH, "scale": 127.5, "mean": [1.0] * 3, "std": [1.0] * 3},
    ),
    "raw": (
        lambda: uint8_style(True),
        lambda: uint8_style(False),
        dict(STRETCH),
        {**STRETCH, "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3},
    ),
}
ADAPTED = {
    "keras": ("NHWC", "RGB", "float32"),
    "caffe": ("NCHW", "BGR", "float32"),
    "raw": ("NHWC", "RGB", "uint8"),
    "tf2onnx": ("NHWC", "RGB", "float32"),
}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _photos(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    paths = []
    for i in range(n):
        picture = rng.integers(0, 256, (27, 22, 3), dtype=np.uint8)  # stretched to 20 x 16
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(picture).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every pair exported, and one shard of two photos staged."""
    root = tmp_path_factory.mktemp("converters")
    dirs = {}
    for name, (make, make_twin, pre, twin_pre) in PAIRS.items():
        for suffix, build, given in (("", make, pre), ("_twin", make_twin, twin_pre)):
            src = _save(build(), root / f"{name}{suffix}.onnx")
            dirs[name + suffix] = root / "models" / (name + suffix)
            export_model(name + suffix, f"onnx:{src}", dirs[name + suffix], preprocess=given)
    manifest = root / "images" / "shards" / "s000.json"
    stage_shard(_photos(root / "photos"), root / "images", manifest)
    return {"root": root, "dirs": dirs, "manifest": manifest}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_export_records_the_models_input_and_feeds_cnnviz_input(exported, name) -> None:
    card = modelcard.load_card(exported["dirs"][name])
    twin = modelcard.load_card(exported["dirs"][f"{name}_twin"])
    layout, order, dtype = ADAPTED[name]
    own = card["input"]["model_input"]
    assert (own["layout"], own["channel_order"], own["dtype"]) == (layout, order, dtype)
    assert card["input"]["shape"] == ["batch", 3, H, W] and card["input"]["dtype"] == "float32"
    assert card["input"]["adapter"] and not twin["input"]["adapter"]
    assert card["preprocess"]["size"] == [H, W] and card["preprocess"]["layout"] == layout
    # the adapted graph reproduces the model as given, fed its own input, on the photo
    verification = card["verification"]
    assert verification["reference"] == "the model's own input"
    assert verification["max_abs_diff"] <= verification["tolerance"]
    assert verification["top1"] == twin["verification"]["top1"]
    assert card["output"]["kind"] == "logits"  # the final Softmax is stripped
    assert [(row["name"], row["activation"]) for row in card["layers"]] == [
        (row["name"], row["activation"]) for row in twin["layers"]
    ]  # a Transpose between a conv and its activation moved away (export/transposes.py)
    graph = onnx.load(str(exported["dirs"][name] / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Transpose"]  # they all cancelled


def test_a_uint8_model_takes_raw_pixels(exported) -> None:
    card = modelcard.load_card(exported["dirs"]["raw"])
    assert {k: card["preprocess"][k] for k in ("scale", "mean", "std")} == {
        "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3
    }  # fmt: skip
    assert "Cast" in " ".join(card["input"]["adapter"])
    graph = onnx.load(str(exported["dirs"]["raw"] / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Cast"]  # cut off: the input is float


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_gradcheck_passes_on_the_adapted_model(exported, name) -> None:
    result = gradcheck(exported["dirs"][name], samples=200, op_samples=32, max_instances=2)
    assert result["passed"], json.dumps(result, indent=1)[:3000]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_method_gives_the_twins_maps_in_image_coordinates(exported, name) -> None:
    root = exported["root"]
    for method in SCORED:
        out = {}
        for model in (name, f"{name}_twin"):
            folder = root / "explain" / model / method
            summary = explain_shard(exported["dirs"][model], exported["manifest"], method, folder,
                                    dict(OPTIONS), device="cpu", batch_size=2)  # fmt: skip
            assert not summary["failed"], (model, method, summary["failed"])
            rows, maps = read_shard_maps(folder)
            assert maps.shape == (2, H, W), (model, method, maps.shape)
            index = read_index(folder)
            signed = read_array(folder, index, "signed") if "signed" in index["arrays"] else None
            out[model] = (rows, maps, signed)
        (rows, maps, signed), (twin_rows, twin_maps, twin_signed) = out.values()
        assert [r["target"] for r in rows] == [r["target"] for r in twin_rows], method
        scale = max(1e-6, float(np.abs(twin_maps).max()))
        np.testing.assert_allclose(maps, twin_maps, atol=2e-4 * scale, err_msg=method)
        assert (signed is None) == (method not in SIGNED)
        if signed is not None:  # RGB order: a swapped channel would differ from the twin's
            assert signed.shape == twin_signed.shape == (2, 3, H, W), method
            np.testing.assert_allclose(
                signed.astype(np.float32), twin_signed.astype(np.float32), atol=2e-3,
                err_msg=method,
            )  # fmt: skip


# --------------------------------------------------------------------------- input errors


def test_layout_is_detected_or_asked_for(tmp_path) -> None:
    from cnnviz.export.onnx_io import read_input

    def value(shape, elem=TensorProto.FLOAT):
        x = helper.make_tensor_value_info("x", elem, shape)
        y = helper.make_tensor_value_info("y", elem, shape)
        return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                                   "g", [x], [y]))  # fmt: skip

    assert read_input(value(["N", 3, "h", "w"]), "m").layout == "NCHW"
    assert read_input(value(["N", "h", "w", 3]), "m").layout == "NHWC"
    assert read_input(value([1, 1, 28, 28]), "m").channels == 1
    with pytest.raises(ModelError, match=r"both dim 1 and dim 3.*preprocess\.layout"):
        read_input(value([1, 3, 8, 3]), "m")
    with pytest.raises(ModelError, match=r"symbolic.*preprocess\.layout"):
        read_input(value(["N", "c", "h", "w"]), "m")
    spec = read_input(value(["N", "c", "h", "w"]), "m", layout="NHWC")
    assert (spec.layout, spec.channels, spec.dims[3]) == ("NHWC", 3, 3)
    with pytest.raises(ModelError, match="preprocess.layout NHWC puts the channels in dim 3"):
        read_input(value([1, 3, 8, 8]), "m", layout="NHWC")
    with pytest.raises(ModelError, match="uint8, read by Relu"):
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 8, 3])
        y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8, 8, 3])
        read_input(helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), "m")  # fmt: skip


def test_a_uint8_model_refuses_a_normalization(tmp_path) -> None:
    src = _save(uint8_style(True), tmp_path / "raw.onnx")
    with pytest.raises(ConfigError, match=r"uint8.*models\.raw\.preprocess sets mean"):
        export_model("raw", f"onnx:{src}", tmp_path / "out",
                     preprocess={"mean": [0.5] * 3})  # fmt: skip


def test_several_outputs_need_output(tmp_path) -> None:
    model = keras_style(True)
    model.graph.output.append(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__0", CLASSES])
    )
    src = _save(model, tmp_path / "two.onnx")
    with pytest.raises(
        ModelError, match=r"2 outputs \('predictions', 'logits'\).*models\.two\.output"
    ):
        export_model("two", f"onnx:{src}", tmp_path / "out")
    with pytest.raises(ModelError, match="'scores' is not one of"):
        export_model("two", f"onnx:{src}", tmp_path / "out", output="scores")
    card = export_model("two", f"onnx:{src}", tmp_path / "out", output="logits")
    assert card["output"]["name"] == "logits" and card["output"]["kind"] == "logits"
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    assert not [n for n in graph.node if n.op_type == "Softmax"]  # only 'predictions' needed it


def test_a_grey_model_sees_the_luma_of_the_image(tmp_path) -> None:
    weights = _weights()
    weights["w1"] = np.ascontiguousarray(weights["w1"][:, :1])
    x = helper.make_tensor_value_info("gray", TensorProto.FLOAT, ["N", 1, H, W])
    src = _save(_model(_body("gray", weights), weights, x, "grey"), tmp_path / "grey.onnx")
    pre = {**STRETCH, "scale": 255.0, "mean": [0.5], "std": [0.25]}
    card = export_model("grey", f"onnx:{src}", tmp_path / "out", preprocess=pre)
    assert card["input"]["model_input"]["channel_order"] == "grey"
    assert "0.299 R + 0.587 G + 0.114 B" in card["input"]["adapter"][0]
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    assert gradcheck(tmp_path / "out", samples=200, op_samples=32, max_instances=2)["passed"]


# --------------------------------------------------------------------------- the workflow


def _two_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Keras export that also names its logits: two graph outputs."""
    model.graph.output.append(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__0", CLASSES])
    )
    return model


@pytest.mark.slow
def test_the_workflow_runs_converter_models_end_to_end(tmp_path) -> None:
    """One Snakemake run: the three converter-style models and a float16 one as onnx: sources
    with their preprocess (and output) settings, beside the Keras model's twin; maps in image
    coordinates and the Keras model's maps equal to its twin's."""
    import yaml
    from cluster.workflow_runs import snakemake

    _save(_two_outputs(keras_style(True)), tmp_path / "keras.onnx")
    _save(keras_style(False), tmp_path / "keras_twin.onnx")
    _save(caffe_style(True), tmp_path / "caffe.onnx")
    _save(uint8_style(True), tmp_path / "raw.onnx")
    _save(half_style(TensorProto.FLOAT16), tmp_path / "half.onnx")
    _photos(tmp_path / "photos")
    models = {
        "keras": {"source": "onnx:keras.onnx", "preprocess": PAIRS["keras"][2],
                  "output": "predictions"},
        "keras_twin": {"source": "onnx:keras_twin.onnx", "preprocess": PAIRS["keras"][3]},
        "caffe": {"source": "onnx:caffe.onnx", "preprocess": PAIRS["caffe"][2]},
        "raw": {"source": "onnx:raw.onnx", "preprocess": {**PAIRS["raw"][2], "layout": "NHWC"}},
        "half": {"source": "onnx:half.onnx", "preprocess": PAIRS["keras"][3]},
    }  # fmt: skip
    config = {
        "output": "results",
        "threads": 1,
        "shard_size": 2,
        "batch_size": 2,
        "images": {"samples": [], "paths": ["photos"]},
        "models": models,
        "methods": {"enabled": ["gradcam", "saliency", "guided_backprop", "occlusion"],
                    "occlusion": {"window": 4, "stride": 4}},
        "activations": {"layers": "all"},
        "filters": {"enabled": False},
        "atlas": {"enabled": False},
        "metrics": {"enabled": False},
    }  # fmt: skip
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    done = snakemake(tmp_path, configfile)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "failed on bad input" not in done.stdout, done.stdout[-6000:]
    results = tmp_path / "results"
    for model in models:
        card = modelcard.load_card(results / "models" / model)
        assert card["input"]["shape"][1:] == [3, H, W]
        assert (results / "report" / f"{model}.html").is_file()
        for method in config["methods"]["enabled"]:
            maps = read_shard_maps(results / model / method / "s000")[1]
            assert maps.shape == (2, H, W), (model, method)
    page = (results / "report" / "raw.html").read_text(encoding="utf-8")
    assert "adapter: uint8 input: its Cast to float32 is cut off" in html.unescape(page)
    page = (results / "report" / "half.html").read_text(encoding="utf-8")
    assert "float16 model computed in float32" in html.unescape(page)
    keras = modelcard.load_card(results / "models" / "keras")  # output: predictions, its
    assert keras["output"]["name"] == "logits"  # Softmax stripped: the logits are the scores
    assert "Softmax removed" in keras["verification"]["note"]
    for method in config["methods"]["enabled"]:
        got = read_shard_maps(results / "keras" / method / "s000")[1]
        twin = read_shard_maps(results / "keras_twin" / method / "s000")[1]
        np.testing.assert_allclose(got, twin, atol=2e-4 * float(np.abs(twin).max()))


def test_a_final_sigmoid_is_stripped_and_predictions_apply_it(tmp_path) -> None:
    from cnnviz.methods.predictions import predict
    from cnnviz.runtime import make_session

    model = keras_style(True)
    final = next(n for n in model.graph.node if n.op_type == "Softmax")
    final.op_type = "Sigmoid"
    del final.attribute[:]
    src = _save(model, tmp_path / "multilabel.onnx")
    card = export_model("ml", f"onnx:{src}", tmp_path / "out", preprocess=PAIRS["keras"][2])
    assert card["output"] == {"name": "logits", "kind": "sigmoid_logits", "num_classes": CLASSES}
    assert "Sigmoid removed" in card["verification"]["note"]
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3, H, W)).astype(np.float32)
    probs = predict(make_session(tmp_path / "out" / "model.onnx", "cpu"), card, list(x))
    given = make_session(src, "cpu").run(None, {"input_1": x.transpose(0, 2, 3, 1).copy()})[0]
    np.testing.assert_allclose(probs, given, rtol=1e-5, atol=1e-6)


def test_a_float16_input_is_widened_not_cast(exported, tmp_path) -> None:
    """A Keras model taking float16 NHWC, Cast to float inside: export widens the input to
    float32 (export/precision.py), so the adapter has no Cast and the image is not rounded to
    float16: the maps are the float32 twin's."""
    model = keras_style(True)
    graph = model.graph
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    first = next(n for n in graph.node if n.op_type == "Transpose")
    first.input[0] = "input_f32"
    graph.node.insert(0, helper.make_node("Cast", ["input_1"], ["input_f32"], to=TensorProto.FLOAT))
    src = _save(model, tmp_path / "half.onnx")
    out = tmp_path / "half"
    card = export_model("half", f"onnx:{src}", out, preprocess=PAIRS["keras"][2])
    assert card["input"]["model_input"]["dtype"] == "float16"
    assert card["input"]["precision"] == "float16 model computed in float32"
    assert card["input"]["adapter"] == ["NCHW to NHWC (Transpose)"]
    verification = card["verification"]  # against the model fed its float16 input
    assert 0 < verification["max_abs_diff"] <= verification["tolerance"]
    summary = explain_shard(out, exported["manifest"], "saliency", tmp_path / "s", {}, device="cpu")
    assert not summary["failed"]
    twin_dir = exported["dirs"]["keras_twin"]
    explain_shard(twin_dir, exported["manifest"], "saliency", tmp_path / "t", {}, device="cpu")
    twin = read_shard_maps(tmp_path / "t")[1]
    maps = read_shard_maps(tmp_path / "s")[1]
    assert maps.shape == twin.shape == (2, H, W)
    np.testing.assert_allclose(maps, twin, atol=1e-5 * float(twin.max()))


def half_style(elem: int, cast_inside: bool = False) -> onnx.ModelProto:
    """keras_style's NCHW model computed in float16 (`elem` FLOAT16), or its twin (FLOAT) with
    the same weights rounded to float16 and held in float32. `cast_inside`: the input and output
    stay float32 and Casts to and from `elem` bracket the body (onnxconverter-common's
    keep_io_types: the last Cast after the Softmax), BN's shift is a Constant node and a
    ConstantOfShape adds 0.25 after it."""
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    weights = {
        k: v.astype(np.float16).astype(dtype) if v.dtype == np.float32 else v
        for k, v in _weights().items()
    }
    x_name = "x16" if cast_inside else "input_1"
    nodes = _body(x_name, weights)
    io_type = TensorProto.FLOAT if cast_inside else elem
    if cast_inside:
        nodes.insert(0, helper.make_node("Cast", ["input_1"], ["x16"], to=elem))
        nodes[-1].output[0] = "p16"
        nodes.append(helper.make_node("Cast", ["p16"], ["predictions"], to=TensorProto.FLOAT))
        shift = weights.pop("bn_add")
        relu = next(n for n in nodes if n.op_type == "Relu")
        relu.input[0] = "bn3"
        nodes[:0] = [
            helper.make_node("Constant", [], ["bn_add"],
                             value=numpy_helper.from_array(shift, "bn_add")),
            helper.make_node("ConstantOfShape", ["bias_shape"], ["bias"],
                             value=numpy_helper.from_array(np.array([0.25], dtype), "v")),
        ]  # fmt: skip
        nodes.insert(nodes.index(relu), helper.make_node("Add", ["bn2", "bias"], ["bn3"]))
        weights["bias_shape"] = np.array([1, 8, 1, 1], np.int64)
    x = helper.make_tensor_value_info("input_1", io_type, ["N", 3, H, W])
    y = helper.make_tensor_value_info("predictions", io_type, ["N", CLASSES])
    return finish_model(nodes, weights, [x], [y], name="half" if dtype == np.float16 else "twin")


def _float16_left(model: onnx.ModelProto) -> list[str]:
    """Every float16 tensor, type or Cast to float16 left in the graph (types inferred)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    f16 = TensorProto.FLOAT16
    left = [t.name for t in graph.initializer if t.data_type == f16]
    left += [v.name for v in [*graph.input, *graph.output, *graph.value_info]
             if v.type.tensor_type.elem_type == f16]  # fmt: skip
    for node in graph.node:
        for attr in node.attribute:
            if (attr.name == "to" and attr.i == f16) or (attr.t.data_type == f16):
                left.append(f"{node.op_type} {node.output[0]}")
    return left


@pytest.mark.parametrize("cast_inside", [False, True], ids=["float16_io", "cast_inside"])
def test_a_float16_model_is_computed_in_float32(exported, tmp_path, cast_inside) -> None:
    """No float16 left in model.onnx; its scores are the float16 model's up to float16
    rounding; gradient maps equal to the float32 twin's (same float16-rounded weights)."""
    from cnnviz.methods.predictions import predict
    from cnnviz.report.provenance import model_rows
    from cnnviz.runtime import make_session

    pre = PAIRS["keras"][3]
    dirs = {}
    for name, elem in (("half", TensorProto.FLOAT16), ("twin", TensorProto.FLOAT)):
        src = _save(half_style(elem, cast_inside), tmp_path / f"{name}.onnx")
        dirs[name] = tmp_path / name
        export_model(name, f"onnx:{src}", dirs[name], preprocess=pre)
    assert _float16_left(half_style(TensorProto.FLOAT16, cast_inside))  # the test sees them
    assert not _float16_left(onnx.load(str(dirs["half"] / "model.onnx")))
    card = modelcard.load_card(dirs["half"])
    assert card["input"]["precision"] == "float16 model computed in float32"
    assert card["input"]["dtype"] == "float32" and card["input"]["adapter"] == []
    # Softmax -> Cast to float32 (keep_io_types) is Cast -> Softmax, stripped: the logits
    assert card["output"]["kind"] == "logits" and "Softmax removed" in card["verification"]["note"]
    own = "float32" if cast_inside else "float16"
    assert card["input"]["model_input"]["dtype"] == own
    rows = dict(model_rows(tmp_path, "half", card))  # the report's model page says it too
    assert rows["model's own input"].endswith(f"dtype {own} layout NCHW channel_order RGB; "
                                              "float16 model computed in float32")  # fmt: skip
    verification = card["verification"]  # checked against the float16 model on the photo
    assert verification["reference"] == "the model's own input"
    assert 0 < verification["max_abs_diff"] <= verification["tolerance"]
    # the float16 original, run by ONNX Runtime, against the exported model's probabilities
    x = np.random.default_rng(3).uniform(-1.5, 1.5, (6, 3, H, W)).astype(np.float32)
    got = predict(make_session(dirs["half"] / "model.onnx", "cpu"), card, list(x))
    src = tmp_path / "half.onnx"
    want = make_session(src, "cpu").run(None, {"input_1": x.astype(own)})[0].astype(np.float64)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)
    # the gradient: the widened model is the twin, to float32 rounding
    maps = {}
    for name in dirs:
        folder = tmp_path / f"saliency_{name}"
        summary = explain_shard(dirs[name], exported["manifest"], "saliency", folder, {},
                                device="cpu")  # fmt: skip
        assert not summary["failed"], summary["failed"]
        maps[name] = read_shard_maps(folder)[1]
    assert maps["half"].shape == (2, H, W)
    np.testing.assert_allclose(maps["half"], maps["twin"], atol=1e-6 * float(maps["twin"].max()))


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["float16_io", "float32_io"])
def test_ort_float16_converters_model_gives_the_twins_maps(exported, tmp_path, keep_io_types):
    """The Keras model through ONNX Runtime's own float16 converter (keep_io_types: float32
    input and output, its Casts appended after every other node): widened, its float32 <-> float32
    Casts dropped so the adapter's Transpose cancels the model's, nodes sorted; the saliency
    maps are the float32 twin's up to the weights' rounding to float16."""
    float16 = pytest.importorskip("onnxruntime.transformers.float16")
    model = float16.convert_float_to_float16(keras_style(True), keep_io_types=keep_io_types)
    assert _float16_left(model)
    src = _save(model, tmp_path / "ort16.onnx")
    out = tmp_path / "ort16"
    card = export_model("ort16", f"onnx:{src}", out, preprocess=PAIRS["keras"][2])
    assert card["input"]["precision"] == "float16 model computed in float32"
    assert card["output"]["kind"] == "logits"
    verification = card["verification"]
    assert 0 < verification["max_abs_diff"] <= verification["tolerance"]
    exported_model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(exported_model)  # topologically sorted again
    assert not _float16_left(exported_model)
    ops = [n.op_type for n in exported_model.graph.node]
    assert "Transpose" not in ops and ops.count("Cast") <= 1, ops  # the output's Cast stays
    summary = explain_shard(out, exported["manifest"], "saliency", tmp_path / "s", {}, device="cpu")
    assert not summary["failed"], summary["failed"]
    twin_dir = exported["dirs"]["keras_twin"]
    explain_shard(twin_dir, exported["manifest"], "saliency", tmp_path / "t", {}, device="cpu")
    twin = read_shard_maps(tmp_path / "t")[1]
    maps = read_shard_maps(tmp_path / "s")[1]
    assert maps.shape == twin.shape == (2, H, W)
    np.testing.assert_allclose(maps, twin, atol=2e-3 * float(twin.max()))  # measured 2.6e-4


def test_a_model_that_needs_float16_rounding_is_refused(tmp_path) -> None:
    """x + 2048, Cast to float16 (even numbers only there), back, - 2048: the graph rounds x to
    even numbers, the widened one does not; export refuses it and says why."""
    c = np.array(2048, np.float32)
    nodes = [
        helper.make_node("Add", ["x", "c"], ["up"]),
        helper.make_node("Cast", ["up"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["half"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["back", "c"], ["rounded"]),
        helper.make_node("ReduceMean", ["rounded"], ["scores"], axes=[2, 3], keepdims=0),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, W])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])
    src = _save(finish_model(nodes, {"c": c}, [x], [y]), tmp_path / "rounds.onnx")
    with pytest.raises(ModelError, match="widened from float16 to float32 differs.*rounding"):
        export_model("rounds", f"onnx:{src}", tmp_path / "out", preprocess=PAIRS["keras"][3])


def test_a_float16_model_passes_gradcheck(tmp_path) -> None:
    """Finite differences in float32 on the widened model (in float16 they measure rounding):
    the export, and the file itself (`cnnviz gradcheck half.onnx` widens it as export does)."""
    src = _save(half_style(TensorProto.FLOAT16, cast_inside=True), tmp_path / "half.onnx")
    export_model("half", f"onnx:{src}", tmp_path / "half", preprocess=PAIRS["keras"][3])
    for model in (tmp_path / "half", src):
        result = gradcheck(model, samples=200, op_samples=32, max_instances=2)
        assert result["passed"], json.dumps(result, indent=1)[:3000]


def test_filter_pictures_of_a_bgr_model_are_the_twins(exported) -> None:
    """Activation maximization runs in RGB pixel space through the adapter: the BGR model and
    its RGB twin (mean/std given in each one's own order) reach the same picture."""
    from cnnviz.methods.filters import optimize_filters

    pictures = []
    for name in ("caffe", "caffe_twin"):
        card = modelcard.load_card(exported["dirs"][name])
        model = onnx.load(str(exported["dirs"][name] / "model.onnx"))
        result = optimize_filters(model, card["layers"][-1]["tensor"], [0, 3], mode="seed",
                                  steps=6, preprocess=card["preprocess"], device="cpu",
                                  threads=1)  # fmt: skip
        pictures.append(result.raw)
    assert pictures[0].shape == (2, H, W, 3)
    np.testing.assert_allclose(pictures[0], pictures[1], atol=1e-4)


def test_a_batch_pinned_by_a_reshape_is_made_dynamic(exported, tmp_path) -> None:
    """tf2onnx with a fixed batch of 1: the input says 1 and a Reshape to [1, 8] says it again."""
    model = keras_style(True)
    graph = model.graph
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    flatten.input.append("flat_shape")
    graph.initializer.append(helper.make_tensor("flat_shape", TensorProto.INT64, [2], [1, 8]))
    out = tmp_path / "pinned"
    card = export_model("p", f"onnx:{_save(model, tmp_path / 'p.onnx')}", out,
                        preprocess=PAIRS["keras"][2])  # fmt: skip
    assert card["input"]["shape"][0] == "batch"
    summary = explain_shard(out, exported["manifest"], "saliency", tmp_path / "s", {},
                            device="cpu", batch_size=2)  # fmt: skip
    assert not summary["failed"]
    twin_dir = exported["dirs"]["keras_twin"]
    explain_shard(twin_dir, exported["manifest"], "saliency", tmp_path / "t", {}, device="cpu")
    twin = read_shard_maps(tmp_path / "t")[1]
    np.testing.assert_allclose(read_shard_maps(tmp_path / "s")[1], twin, atol=1e-4 * twin.max())


def test_a_batch_the_graph_fixes_runs_one_image_per_call(exported, tmp_path) -> None:
    """A batch of 1 that no Reshape rewrite frees (a Reshape to [8] and an Unsqueeze): the card
    says so, predictions and the gradient methods feed one image per call, occlusion fails by
    name."""
    from cnnviz.methods.predictions import predict_shard

    model = keras_style(True)
    graph = model.graph
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    flatten.input.append("flat_shape")
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    gemm.input[0] = "f1"
    graph.node.insert(list(graph.node).index(gemm),
                      helper.make_node("Unsqueeze", ["f", "axis0"], ["f1"]))  # fmt: skip
    graph.initializer.extend([
        helper.make_tensor("flat_shape", TensorProto.INT64, [1], [8]),
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
    ])  # fmt: skip
    out = tmp_path / "fixed"
    card = export_model("f", f"onnx:{_save(model, tmp_path / 'f.onnx')}", out,
                        preprocess=PAIRS["keras"][2])  # fmt: skip
    assert card["input"]["shape"][0] == 1 and "fixes its batch at 1" in card["verification"]["note"]
    predict_shard(out, exported["manifest"], tmp_path / "p.json", device="cpu", batch_size=2)
    assert len(json.loads((tmp_path / "p.json").read_text())["images"]) == 2
    for method in ("saliency", "smoothgrad", "scorecam"):
        summary = explain_shard(out, exported["manifest"], method, tmp_path / method,
                                dict(OPTIONS), device="cpu", batch_size=2)  # fmt: skip
        assert len(summary["maps"]) == 2 and not summary["failed"], method
    summary = explain_shard(out, exported["manifest"], "occlusion", tmp_path / "o", dict(OPTIONS),
                            device="cpu", batch_size=2)  # fmt: skip
    assert "fixed batch size 1" in summary["failed"][0]["error"]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_deconvnet_projections_are_the_twins_in_rgb(exported, tmp_path, name) -> None:
    """The atlas' projections (deconvnet from a layer's top units back to the image)."""
    got = []
    for model in (name, f"{name}_twin"):
        folder = tmp_path / model
        summary = explain_shard(exported["dirs"][model], exported["manifest"], "projections",
                                folder, {"layers": "auto", "top_k": 2}, device="cpu")  # fmt: skip
        assert not summary["failed"], summary["failed"]
        got.append(np.asarray(read_array(folder, read_index(folder), "projections"), np.float32))
    assert got[0].shape[0] == 2 and got[0].shape[-3:] == (3, H, W)
    np.testing.assert_allclose(got[0], got[1], atol=2e-3)


def test_a_dynamic_nhwc_size_is_pinned_to_preprocess_size(exported, tmp_path) -> None:
    model = keras_style(True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, symbol in ((1, "height"), (2, "width")):
        dims[axis].Clear()
        dims[axis].dim_param = symbol
    pre = {**PAIRS["keras"][2], "size": [H, W]}
    card = export_model("d", f"onnx:{_save(model, tmp_path / 'd.onnx')}", tmp_path / "d",
                        preprocess=pre)  # fmt: skip
    assert card["input"]["shape"] == ["batch", 3, H, W]
    assert card["input"]["model_input"]["shape"] == ["unk__0", H, W, 3]
    summary = explain_shard(tmp_path / "d", exported["manifest"], "gradcam", tmp_path / "g", {},
                            device="cpu")  # fmt: skip
    assert not summary["failed"] and read_shard_maps(tmp_path / "g")[1].shape == (2, H, W)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_receptive_fields_go_through_the_adapter(exported, name) -> None:
    """The graph walk (atlas boxes) passes the adapter's Split/Concat and Transposes and the
    model's own Transpose back: each layer's field is its twin's."""
    from cnnviz.receptive import receptive_field

    models = [onnx.load(str(exported["dirs"][m] / "model.onnx")) for m in (name, f"{name}_twin")]
    layers = modelcard.load_card(exported["dirs"][name])["layers"]
    for layer in layers:
        fields = [receptive_field(m, layer["tensor"]) for m in models]
        assert fields[0] == fields[1], layer["name"]
    assert receptive_field(models[0], layers[-1]["tensor"])[0].size == 5  # two 3x3 convs


def test_caffe_scores_shaped_n_c_1_1_are_flattened(exported, tmp_path) -> None:
    """A Caffe SqueezeNet-style head: 1x1 conv classifier, global pool, Softmax -> [1, C, 1, 1]."""
    weights = _weights()
    weights["w3"] = np.random.default_rng(4).standard_normal((CLASSES, 8, 1, 1)).astype("f4")
    nodes = _body("data", weights)[:7] + [
        helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[1, 1], name="conv10"),
        helper.make_node("GlobalAveragePool", ["c3"], ["pool10"]),
        helper.make_node("Softmax", ["pool10"], ["prob"], axis=1),
    ]
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, H, W])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, CLASSES, 1, 1])
    src = _save(finish_model(nodes, weights, [x], [y]), tmp_path / "squeeze.onnx")
    card = export_model("sq", f"onnx:{src}", tmp_path / "sq", preprocess=PAIRS["caffe"][2])
    assert card["output"]["num_classes"] == CLASSES and card["output"]["kind"] == "logits"
    assert "flattened to [batch, classes]" in card["verification"]["note"]
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    assert gradcheck(tmp_path / "sq", samples=200, op_samples=32, max_instances=2)["passed"]
    for method in ("gradcam", "saliency"):
        summary = explain_shard(tmp_path / "sq", exported["manifest"], method, tmp_path / method,
                                {}, device="cpu")  # fmt: skip
        assert not summary["failed"] and read_shard_maps(tmp_path / method)[1].shape == (2, H, W)


def test_gradcheck_of_a_converters_file_goes_through_the_adapter(tmp_path) -> None:
    """`cnnviz gradcheck raw.onnx` on the uint8 file itself (no export): fed float pixels."""
    from cnnviz.cli import main

    src = _save(uint8_style(True), tmp_path / "raw.onnx")
    out = tmp_path / "check.json"
    assert main(["gradcheck", "--model", str(src), "--samples", "200", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["passed"]


def test_sinking_transposes_keeps_the_values() -> None:
    """export/transposes.py on the cases it rewrites: a constant on the left of a Sub, a Clip,
    a Reduce with keepdims (the Transpose stays after it), a Transpose left that meets none."""
    from cnnviz.export.transposes import sink_transposes
    from cnnviz.runtime import make_session

    rng = np.random.default_rng(9)
    weights = {
        "c": rng.standard_normal((1, 5, 1, 3)).astype(np.float32),  # [N, H, W, C] broadcast
        "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32),
        "axes": np.array([2], np.int64), "pads": np.array([0, 1, 0, 0, 0, 0, 2, 0], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Sub", ["c", "t"], ["s"]),
        helper.make_node("Clip", ["s", "lo", "hi"], ["k"]),
        helper.make_node("Pad", ["k", "pads"], ["p"]),
        helper.make_node("ReduceSum", ["p", "axes"], ["y"], keepdims=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 1, 3])
    model = finish_model(nodes, weights, [x], [y])
    sunk = sink_transposes(model)
    ops = [n.op_type for n in sunk.graph.node]
    assert ops == ["Sub", "Clip", "Pad", "ReduceSum", "Transpose"], ops
    feed = {"x": rng.standard_normal((2, 3, 5, 4)).astype(np.float32)}
    want = make_session(model, "cpu").run(None, feed)[0]
    got = make_session(sunk, "cpu").run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
