"""The export step: model.json, graph tidying, onnx:<path> sources, and (slow) real exports."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz import modelcard
from cnnviz.errors import ConfigError, ModelError
from cnnviz.export import export_model
from cnnviz.export.simplify import simplify
from cnnviz.runtime import make_session
from onnx import TensorProto, helper, numpy_helper
from onnx_build import finish_model

RNG = np.random.default_rng(1)


def classifier(batch: int | str = "batch", softmax: bool = True, classes: int = 4):
    """[batch, 3, 16, 16] -> Conv -> Relu -> GAP -> Flatten -> Gemm (-> Softmax)."""
    inits = [
        numpy_helper.from_array(RNG.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(RNG.standard_normal((classes, 6)).astype(np.float32), "fc_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="/stem/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w"], ["scores"], transB=1),
    ]
    out = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        out = "probs"
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])
    return finish_model(nodes, inits, [x], [y])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- onnx:<path>


def test_onnx_source_writes_a_card(tmp_path):
    src = _save(classifier(), tmp_path / "mine.onnx")
    out = tmp_path / "out"
    card = export_model("mine", f"onnx:{src}", out, preprocess={"resize": "stretch"})

    assert card == modelcard.load_card(out)
    assert card["source"] == f"onnx:{src.resolve()}" and card["weights"] == "file"
    assert card["sha256"] == _sha256(out / "model.onnx")
    assert card["input"] == {
        "name": "image", "shape": ["batch", 3, 16, 16], "dtype": "float32", "layout": "NCHW",
        "channel_order": "RGB", "adapter": [],
        "model_input": {"name": "image", "shape": ["batch", 3, 16, 16], "dtype": "float32",
                        "layout": "NCHW", "channel_order": "RGB"},
    }  # fmt: skip
    # the final Softmax is stripped: the output is the logits
    assert card["output"] == {"name": "scores", "kind": "logits", "num_classes": 4}
    assert card["labels"] == ["class 0", "class 1", "class 2", "class 3"]
    assert card["preprocess"]["size"] == [16, 16] and card["preprocess"]["resize"] == "stretch"
    assert "resize_to" not in card["preprocess"]
    assert [(r["name"], r["tensor"], r["shape"]) for r in card["layers"]] == [
        ("stem", "r", [6, 16, 16])
    ]
    session = make_session(out / "model.onnx", device="cpu")
    x = RNG.standard_normal((3, 3, 16, 16)).astype(np.float32)
    scores = session.run(None, {"image": x})[0]
    probs = make_session(src, device="cpu").run(None, {"image": x})[0]
    e = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs, rtol=1e-5, atol=1e-6)


def test_onnx_source_labels_and_fixed_batch(tmp_path):
    src = _save(classifier(batch=1, softmax=False), tmp_path / "fixed.onnx")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\nbird\nfish\n")
    card = export_model("fixed", f"onnx:{src}", tmp_path / "out", labels=str(names))
    assert card["labels"] == ["cat", "dog", "bird", "fish"]
    assert card["input"]["shape"] == ["batch", 3, 16, 16]  # a batch of 1 made symbolic
    assert card["preprocess"]["resize"] == "center_crop"
    assert card["preprocess"]["resize_to"] == 18  # 16 * 256 / 224
    out = make_session(tmp_path / "out" / "model.onnx", device="cpu").run(
        None, {"image": np.zeros((2, 3, 16, 16), np.float32)}
    )[0]
    assert out.shape == (2, 4)

    with pytest.raises(ConfigError, match="3 labels for a model with 4"):
        export_model("fixed", f"onnx:{src}", tmp_path / "bad", labels=["a", "b", "c"])


def test_onnx_source_without_image_input_is_a_model_error(tmp_path):
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])
    vector = finish_model([helper.make_node("Relu", ["features"], ["y"])], [], [x], [y])
    src = _save(vector, tmp_path / "vector.onnx")
    with pytest.raises(ModelError, match=r"vector\.onnx.*'features'.*\['batch', 10\]"):
        export_model("v", f"onnx:{src}", tmp_path / "out")

    x = helper.make_tensor_value_info("nhwc", TensorProto.FLOAT, [1, 16, 16, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 3])
    nhwc = finish_model([helper.make_node("Relu", ["nhwc"], ["y"])], [], [x], [y])
    with pytest.raises(ModelError, match=r"output 'y' has shape \[2, 16, 16, 3\]"):  # NHWC: fine
        export_model("n", f"onnx:{_save(nhwc, tmp_path / 'nhwc.onnx')}", tmp_path / "out")

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx"):
        export_model("j", f"onnx:{junk}", tmp_path / "out")
    with pytest.raises(ModelError, match="missing.onnx does not exist"):
        export_model("m", f"onnx:{tmp_path / 'missing.onnx'}", tmp_path / "out")
    assert not (tmp_path / "out" / "model.json").exists()


def test_unknown_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="keras:thing"):
        export_model("k", "keras:thing", tmp_path)


# --------------------------------------------------------------------------- simplify


def test_simplify_folds_constant_pads_into_the_conv():
    """The TorchScript pattern: Constant -> Cast -> Pad -> Conv becomes one Conv with pads."""
    w = numpy_helper.from_array(RNG.standard_normal((2, 3, 3, 3)).astype(np.float32), "w")
    pads = helper.make_tensor("pads_value", TensorProto.INT32, [8], [0, 0, 0, 0, 0, 0, 1, 1])
    nodes = [
        helper.make_node("Constant", [], ["pads32"], value=pads),
        helper.make_node("Cast", ["pads32"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="/conv/static_padding/Pad"),
        helper.make_node("Conv", ["padded", "w"], ["y"], name="/conv/Conv", strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 4])
    model = finish_model(nodes, [w], [x], [y])

    simple = simplify(model)
    assert [n.op_type for n in simple.graph.node] == ["Conv"]
    conv = simple.graph.node[0]
    assert conv.name == "/conv/Conv" and list(conv.input) == ["x", "w"]
    assert list(helper.get_attribute_value(a) for a in conv.attribute if a.name == "pads")[0] == [
        0,
        0,
        1,
        1,
    ]
    assert [t.name for t in simple.graph.initializer] == ["w"]
    data = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = make_session(model, device="cpu").run(None, {"x": data})[0]
    got = make_session(simple, device="cpu").run(None, {"x": data})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_simplify_keeps_pads_it_cannot_merge():
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6, 6])
    simple = simplify(finish_model(nodes, [w, pads], [x], [y]))
    assert [n.op_type for n in simple.graph.node] == ["Pad", "Conv"]


# --------------------------------------------------------------------------- model.json


def _card() -> dict:
    layers = [
        {"name": "stem", "tensor": "r0", "conv_node": "/stem/Conv", "conv_output": "c0",
         "activation": "Relu", "shape": [4, 8, 8], "kernel": [3, 3], "stride": [1, 1],
         "groups": 1, "depth": 0},
        {"name": "blocks.0.project_conv", "tensor": "c1", "conv_node": "/b/Conv",
         "conv_output": "c1", "activation": None, "shape": [2, 8, 8], "kernel": [1, 1],
         "stride": [1, 1], "groups": 1, "depth": 1},
    ]  # fmt: skip
    return {
        "name": "m", "source": "onnx:/x.onnx", "weights": "file", "onnx": "model.onnx",
        "sha256": "0" * 64, "opset": 17,
        "input": {"name": "input", "shape": ["batch", 3, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits", "num_classes": 3},
        "preprocess": {"size": [8, 8], "resize": "stretch"},
        "labels": ["Egyptian cat", "tabby, tabby cat", "tiger"],
        "layers": layers,
    }  # fmt: skip


def test_card_round_trip_and_missing_keys(tmp_path):
    path = modelcard.save_card(tmp_path, _card())
    assert path == tmp_path / "model.json"
    assert modelcard.load_card(tmp_path) == _card()
    assert modelcard.load_card(path) == _card()

    broken = _card()
    del broken["labels"], broken["sha256"]
    modelcard.save_card(tmp_path, broken)
    with pytest.raises(ModelError, match=r"model\.json lacks sha256, labels"):
        modelcard.load_card(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        modelcard.load_card(tmp_path / "nowhere")

    modelcard.save_card(tmp_path, _card())
    with pytest.raises(ModelError, match="model.onnx"):
        modelcard.model_path(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert modelcard.model_path(tmp_path) == tmp_path / "model.onnx"


def test_find_layer_by_name_or_tensor():
    card = _card()
    assert modelcard.find_layer(card, "stem")["depth"] == 0
    assert modelcard.find_layer(card, "r0")["name"] == "stem"
    assert modelcard.find_layer(card, "c0")["name"] == "stem"
    with pytest.raises(ConfigError, match=r"'blocks\.0\.project'.*Did you mean blocks\.0\.proj"):
        modelcard.find_layer(card, "blocks.0.project")
    with pytest.raises(ConfigError, match=r"Its layers: stem, blocks\.0\.project_conv"):
        modelcard.find_layer(card, "nothing")


def test_resolve_class():
    card = _card()
    assert modelcard.resolve_class(card, 2) == 2
    assert modelcard.resolve_class(card, "1") == 1
    assert modelcard.resolve_class(card, "egyptian CAT") == 0
    with pytest.raises(ConfigError, match="out of range"):
        modelcard.resolve_class(card, 3)
    with pytest.raises(ConfigError, match=r"no class 'tabby'.*'tabby, tabby cat'"):
        modelcard.resolve_class(card, "tabby")
    with pytest.raises(ConfigError, match="no class 'dog'"):
        modelcard.resolve_class(card, "dog")


# --------------------------------------------------------------------------- real exports (torch)


@pytest.mark.slow
def test_efficientnet_card(effnet_dir):
    card = modelcard.load_card(effnet_dir)
    model = onnx.load(str(effnet_dir / "model.onnx"))
    assert card["sha256"] == _sha256(effnet_dir / "model.onnx")
    assert card["source"] == "efficientnet-lite0" and card["weights"] == "pretrained"
    assert card["input"] == {
        "name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32",
        "layout": "NCHW", "channel_order": "RGB",
    }  # fmt: skip
    assert card["output"] == {"name": "logits", "kind": "logits", "num_classes": 1000}
    assert len(card["labels"]) == 1000 and card["labels"][285] == "Egyptian cat"
    assert card["preprocess"]["resize"] == "stretch"
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [r["conv_node"] for r in card["layers"]] == convs and len(convs) == 49
    first, last = card["layers"][0], card["layers"][-1]
    assert (first["name"], first["shape"], first["activation"]) == (
        "conv_stem",
        [32, 112, 112],
        "Clip",
    )
    assert (last["name"], last["shape"]) == ("conv_head", [1280, 7, 7])
    assert modelcard.find_layer(card, "blocks.3.depthwise_conv")["groups"] == 144
    check = card["verification"]
    assert check["reference"] == "torch" and check["max_abs_diff"] <= min(check["tolerance"], 1e-3)
    assert card["exporter"]["dynamo"] is False and card["opset"] == 17


@pytest.mark.slow
def test_efficientnet_sees_the_cat(effnet_dir):
    import skimage.data
    from cnnviz.images import preprocess
    from PIL import Image

    card = modelcard.load_card(effnet_dir)
    x = preprocess(Image.fromarray(skimage.data.chelsea()), card["preprocess"])[None]
    logits = make_session(modelcard.model_path(effnet_dir), device="cpu").run(None, {"input": x})[0]
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    top = int(np.argmax(probs))
    assert top == 285 and "cat" in card["labels"][top]
    assert 0.7 < probs[top] < 0.9


@pytest.mark.slow
def test_torchvision_random_weights(tmp_path):
    card = export_model("r50", "torchvision:resnet50", tmp_path, weights="random")
    assert card["weights"] == "random" and len(card["layers"]) == 53
    assert card["layers"][0]["name"] == "conv1" and card["layers"][-1]["shape"] == [2048, 7, 7]
    assert card["preprocess"]["resize_to"] in (232, 256) and card["preprocess"]["size"] == [
        224,
        224,
    ]
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    assert card["sha256"] == _sha256(tmp_path / "model.onnx")


@pytest.mark.slow
def test_torchvision_pretrained_weights_from_the_cache_folder(tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(ModelError, match=rf"squeezenet1_0-b66bff10\.pth into {folder}"):
        export_model("sq", "torchvision:squeezenet1_0", tmp_path / "out")
    with pytest.raises(ConfigError, match="did you mean squeezenet1_1, squeezenet1_0"):
        export_model("sq", "torchvision:squeezenet1_O", tmp_path / "out")

    # a file put where the message says is used (here: seeded random weights standing in)
    import torch
    import torchvision

    torch.manual_seed(3)
    folder.mkdir(parents=True, exist_ok=True)  # torch made it before its download failed
    state = torchvision.models.squeezenet1_0().state_dict()
    torch.save(state, folder / "squeezenet1_0-b66bff10.pth")
    card = export_model("sq", "torchvision:squeezenet1_0", tmp_path / "out")
    assert card["weights"] == "pretrained" and len(card["layers"]) == 26
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exporters_on_a_small_module(exporter):
    """Asymmetric 'same' padding, BN, ReLU6: values, symbolic batch, one file, IR <= 10."""
    import torch
    from cnnviz.export.torch_export import export_onnx, torch_logits
    from cnnviz.graph import conv_layers

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.ZeroPad2d((0, 1, 0, 1)),
        torch.nn.Conv2d(3, 8, 3, stride=2, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    model = export_onnx(module, (16, 16), exporter, "test")
    assert model.ir_version <= 10
    assert model.opset_import[0].version == (18 if exporter == "dynamo" else 17)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not any(n.op_type in ("Pad", "BatchNormalization") for n in model.graph.node)
    rows = conv_layers(model)
    assert [(r["activation"], r["shape"]) for r in rows] == [("Clip", [8, 8, 8])]
    x = torch.randn(3, 3, 16, 16).numpy()
    got = make_session(model, device="cpu").run(None, {"input": x})[0]
    np.testing.assert_allclose(got, torch_logits(module, x), rtol=1e-4, atol=1e-5)
