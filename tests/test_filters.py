"""Filter visualization by activation maximization (cnnviz.methods.filters)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnnviz.errors import ConfigError
from cnnviz.methods import filters as fv
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 255.0}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 255.0}


def make_model(nodes, inits, size: int, outputs: list[str]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(
        nodes, "tiny", [x], outs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def linear_filter_model(w: np.ndarray) -> onnx.ModelProto:
    """One Conv filter covering the whole input, no bias: the output is <w, x>."""
    node = helper.make_node("Conv", ["input", "w"], ["y"], name="conv")
    return make_model([node], {"w": w[None].astype(np.float32)}, w.shape[-1], ["y"])


def small_net(size: int = 32) -> onnx.ModelProto:
    """conv(3->8, s2) relu -> conv(8->6) relu -> global pool -> matmul: a tiny classifier."""
    rng = np.random.default_rng(7)
    inits = {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((6, 8, 3, 3)) * 0.3).astype(np.float32),
        "b2": (rng.standard_normal(6) * 0.1 + 0.05).astype(np.float32),
        "w3": (rng.standard_normal((6, 4)) * 0.3).astype(np.float32),
        "shape": np.array([0, -1], dtype=np.int64),
    }
    nodes = [
        helper.make_node(
            "Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w3"], ["logits"], name="fc"),
    ]
    return make_model(nodes, inits, size, ["logits"])


def write_model_dir(path: Path, model: onnx.ModelProto, pre: dict) -> Path:
    from cnnviz.graph import conv_layers

    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    card = {
        "name": "tiny", "source": "onnx:tiny", "weights": "file", "onnx": "model.onnx",
        "sha256": "0", "opset": 17,
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits", "num_classes": 4},
        "preprocess": {"size": [size, size], "resize": "stretch", **pre, "channel_order": "RGB"},
        "labels": ["a", "b", "c", "d"],
        "layers": conv_layers(model),
    }  # fmt: skip
    (path / "model.json").write_text(json.dumps(card))
    return path


def test_seed_mode_reaches_the_closed_form_optimum() -> None:
    """max <w, x> over |x| <= r is r w/|w|: normalized ascent + projection must find it."""
    w = np.random.default_rng(3).standard_normal((3, 8, 8))
    result = fv.optimize_filters(
        linear_filter_model(w),
        "y",
        [0],
        mode="seed",
        steps=40,
        lr=0.2,
        preprocess=IDENTITY,
        norm_bound=1.0,
        device="cpu",
        threads=1,
    )
    x = result.raw[0].transpose(2, 0, 1).ravel()
    cosine = x @ w.ravel() / (np.linalg.norm(x) * np.linalg.norm(w))
    assert cosine > 0.99
    assert np.linalg.norm(x) == pytest.approx(1.0, rel=1e-3)
    assert result.final[0] == pytest.approx(np.linalg.norm(w), rel=0.02)  # <w, w/|w|>
    assert result.curves[0, -1] > result.curves[0, 0]
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_objective_tensor_skips_a_bounded_activation() -> None:
    six = numpy_helper.from_array(np.array(6.0, dtype=np.float32), "six")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "zero", "six"], ["r6"], name="relu6"),
        helper.make_node("Relu", ["r6"], ["r"], name="relu"),
    ]
    model = make_model(nodes, {"w": np.ones((2, 3, 1, 1), np.float32)}, 4, ["r"])
    model.graph.initializer.extend([six, zero])
    assert fv.objective_tensor(model, "r6") == "c"  # ReLU6: the filter's own response
    assert fv.objective_tensor(model, "r6", "activation") == "r6"
    assert fv.objective_tensor(model, "r") == "r"  # unbounded: the layer's tensor
    assert fv.objective_tensor(model, "r", "filter") == "r6"
    assert fv.objective_tensor(model, "c") == "c"
    with pytest.raises(ConfigError, match="objective"):
        fv.objective_tensor(model, "r", "max")


def test_gradient_graph_stops_at_the_layer() -> None:
    objective = fv.LayerObjective(small_net(), "r1", batch=2, device="cpu", threads=1)
    names = {n.name for n in objective.graph.graph.node}
    inits = {i.name for i in objective.graph.graph.initializer}
    assert "conv2" not in names and "fc" not in names
    assert "w2" not in inits and "w3" not in inits
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    values, grad = objective(x, [1, 5])
    assert grad.shape == (2, 3, 32, 32) and values.shape == (2,)


def test_batched_equals_one_at_a_time_and_is_deterministic() -> None:
    model = small_net()
    kwargs = dict(mode="lucent", steps=6, seed=5, preprocess=IMAGENET, param_size=16,
                  device="cpu", threads=1)  # fmt: skip
    channels = [0, 2, 3, 5]
    batched = fv.optimize_filters(model, "r2", channels, batch_size=4, **kwargs)
    single = fv.optimize_filters(model, "r2", channels, batch_size=1, **kwargs)
    mixed = fv.optimize_filters(model, "r2", channels[::-1], batch_size=3, **kwargs)
    np.testing.assert_allclose(batched.images, single.images, atol=1e-5)
    np.testing.assert_allclose(batched.curves, single.curves, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(batched.images, mixed.images[::-1], atol=1e-5)
    again = fv.optimize_filters(model, "r2", channels, batch_size=4, **kwargs)
    assert np.array_equal(batched.images, again.images)
    assert batched.images.shape == (4, 16, 16, 3)
    assert not np.allclose(batched.images[0], batched.images[1])  # own streams per filter


def test_lucent_mode_raises_the_activation() -> None:
    result = fv.optimize_filters(
        small_net(),
        "r2",
        list(range(6)),
        mode="lucent",
        steps=30,
        lr=0.1,
        preprocess=IMAGENET,
        param_size=16,
        device="cpu",
        threads=1,
    )
    assert np.all(result.final > result.start_image), (result.start_image, result.final)
    assert (result.final > result.start_image + 0.5).sum() >= 3, (result.start_image, result.final)
    assert np.all(result.images >= 0) and np.all(result.images <= 1)


def test_visualize_layer_writes_its_artifacts(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny", small_net(), IMAGENET)
    out = tmp_path / "filters"
    for mode in ("lucent", "seed"):
        summary = fv.visualize_layer(
            model_dir,
            "w2",
            out,
            mode=mode,
            filters=[1, 4, 0],
            steps=3,
            batch_size=2,
            device="cpu",
            threads=1,
        )
        stem = out / f"w2.{mode}"
        images = np.load(f"{stem}.npy")
        assert images.dtype == np.float32 and images.shape[0] == 3 and images.shape[-1] == 3
        assert images.min() >= 0 and images.max() <= 1
        info = json.loads(Path(f"{stem}.json").read_text())
        assert info["filters"] == [1, 4, 0] and len(info["curves"]) == 3
        assert len(info["curves"][0]) == 3
        assert {"start_image", "start", "final", "files"} <= set(info)
        assert summary["files"]["png"] == f"{stem}.png"
        with Image.open(f"{stem}.png") as grid, Image.open(f"{stem}.curve.png") as curve:
            assert grid.mode == "RGB" and grid.width >= images.shape[2]
            assert curve.width > 100
    seed_images = np.load(out / "w2.seed.npy")
    assert seed_images.shape[1:3] == (32, 32)  # the model's input size


def test_bad_requests_are_named(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny", small_net(), IMAGENET)
    with pytest.raises(ConfigError, match="0..5"):
        fv.visualize_layer(model_dir, "w2", tmp_path, filters=[9], steps=1)
    with pytest.raises(ConfigError, match="mode"):
        fv.visualize_layer(model_dir, "w2", tmp_path, mode="dream", filters=1, steps=1)
    with pytest.raises(ConfigError, match="no layer"):
        fv.visualize_layer(model_dir, "conv9", tmp_path, filters=1, steps=1)
    assert fv.resolve_filters(64, 6, "x") == list(range(6))


def test_default_layers_spread_over_stages() -> None:
    def row(i, name, c, hw, groups=1):
        return {"name": name, "shape": [c, hw, hw], "groups": groups, "depth": i}

    layers = [
        row(0, "stem", 32, 112), row(1, "dw0", 32, 112, 32), row(2, "b1", 96, 112),
        row(3, "dw1", 96, 56, 96), row(4, "b2", 144, 56), row(5, "b3", 240, 28),
        row(6, "dw3", 240, 14, 240), row(7, "b4", 672, 14), row(8, "head", 1280, 7),
    ]  # fmt: skip
    picked = fv.default_layers({"layers": layers}, 4)
    assert picked == ["b1", "b2", "b4", "head"]
    assert fv.default_layers({"layers": layers[:2]}, 4) == ["stem", "dw0"]


def test_chunks_are_even() -> None:
    assert [len(c) for c in fv.chunks(list(range(20)), 16)] == [10, 10]
    assert [len(c) for c in fv.chunks(list(range(64)), 16)] == [16] * 4
    assert fv.chunks([3], 16) == [[3]]


@pytest.mark.slow
def test_real_model_filters_rise_above_photos(effnet_dir: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0, 4 filters x 30 steps of an early layer (the third stage, 28 x 28):
    each optimized filter fires far above its value on the start image and above its value
    on real photos. Its activation is ReLU6, so the objective is the pre-activation. (Measured:
    start 0.86/-0.50/0.26/1.86, photos at most 2.03/0.41/0.55/0.73, optimized 3.6/5.5/4.2/3.8.)
    """
    from cnnviz.graph import expose
    from cnnviz.images import preprocess
    from cnnviz.modelcard import find_layer, load_card, model_path
    from cnnviz.runtime import make_session
    from skimage import data

    card = load_card(effnet_dir)
    layer = find_layer(card, "blocks.5.expand_conv")
    summary = fv.visualize_layer(
        effnet_dir,
        layer["name"],
        tmp_path,
        filters=4,
        steps=30,
        batch_size=4,
        device="cpu",
        threads=2,
    )
    target = summary["objective_tensor"]
    assert target != layer["tensor"]  # ReLU6 layer: its pre-activation is maximized
    model = onnx.load(str(model_path(effnet_dir, card)))
    session = make_session(expose(model, [target]), "cpu", 2)
    photos = np.stack([preprocess(Image.fromarray(p()), card["preprocess"])
                       for p in (data.chelsea, data.coffee)])  # fmt: skip
    act = session.run([target], {"input": photos})[0]
    on_photos = act[:, :4].mean(axis=(2, 3)).max(axis=0)
    final = np.array(summary["final"])
    start = np.array(summary["start_image"])
    assert np.all(final > start + 1.5), (start, final)
    assert np.all(final > on_photos + 1.0), (on_photos, final)
    curves = np.array(summary["curves"])
    assert np.all(curves[:, -5:].mean(axis=1) > curves[:, :5].mean(axis=1) + 1.0)
    assert np.load(tmp_path / f"{layer['name']}.lucent.npy").shape == (4, 128, 128, 3)
