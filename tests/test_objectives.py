"""Objectives as values (issue 18 item 2): the algebra, the config syntax, the graph's values
against their definitions on the model's own activations, the graph's gradient against central
finite differences of the objective in the image parameters, and filters as one case of it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnnviz.autodiff import vjp
from cnnviz.errors import ConfigError
from cnnviz.graph import cut_at
from cnnviz.methods import filters as fv
from cnnviz.methods import objective_job as oj
from cnnviz.methods import objectives as ob
from cnnviz.methods import optvis as ov
from cnnviz.methods import optvis_graph as og
from cnnviz.runtime import make_session
from test_filters import IMAGENET, small_net

NORM = ov.Normalization.from_preprocess(IMAGENET)
SHAPES = {"r1": (8, 16, 16), "r2": (6, 16, 16), "logits": (4,)}


# ---- the algebra and the syntax -----------------------------------------------------------------
def test_algebra_merges_scales_and_negates():
    a, d = ob.channel("l", 3), ob.diversity("l")
    o = a - 0.1 * d + 2 * a
    assert o.terms == ((3.0, ob.Term("channel", "l", channel=3)), (-0.1, ob.Term("diversity", "l")))
    assert (-o).terms == tuple((-w, t) for w, t in o.terms)
    assert (o / 2).terms[0][0] == 1.5
    assert sum([a, a, d]).terms == ((2.0, a.terms[0][1]), (1.0, d.terms[0][1]))
    assert (a - a).terms == ()


def test_config_syntax_parses_without_eval_and_round_trips():
    text = ("channel(features.10, 3) - 0.1 * diversity('features.10') + 2*neuron(a, 1, 0, 2) "
            "- (direction(b, [1, -2.5e-1]) / 4) + class_logit(386) - 1e-4 * total_variation()")
    o = ob.parse(text)
    assert o == (ob.channel("features.10", 3) - 0.1 * ob.diversity("features.10")
                 + 2 * ob.neuron("a", 1, 0, 2) - 0.25 * ob.direction("b", [1, -0.25])
                 + ob.class_logit(386) - 1e-4 * ob.total_variation())
    assert ob.parse(o.text()) == o
    fine = 0.123456789 * ob.channel("l", 1) - 1e-5 * ob.direction("m", [0.1, -3.25])
    assert ob.parse(fine.text()) == fine  # numbers written back exactly
    assert ob.parse("-neuron(x, 2)") == -ob.neuron("x", 2)
    for bad in ("__import__('os').system('true')", "channel(l, 3) * channel(l, 2)",
                "channel(l, 1.5)", "3", "channel(l, 3) + 1", "neuron(l, 1, 2)", "channel(l, 3"):
        with pytest.raises(ConfigError, match="objective|neuron"):
            ob.parse(bad)


# ---- values: the graph against the definitions --------------------------------------------------
def _activations(model, x):
    """The model's c2, r1, r2 and logits on x ([0, 1] pictures) by plain ONNX Runtime."""
    names = ["c2", "r1", "r2", "logits"]
    out = make_session(cut_at(model, names), "cpu", 1).run(names, {"input": NORM(x)})
    return dict(zip(names, out, strict=True))


def _evaluate(objectives, x):
    """fv:values, fv:terms of the seed-mode evaluation graph on pictures x."""
    job = oj.ObjectiveJob(small_net(), objectives, len(x), mode="seed", steps=1, lr=0.01,
                          norm=NORM, device="cpu", threads=1)
    out = job.evaluate_state(x, job.constants(objectives))
    return out["fv:values"], out["fv:terms"]


def test_values_are_the_definitions():
    x = np.random.default_rng(1).random((3, 3, 32, 32)).astype(np.float32)
    acts = _activations(small_net(), x)
    objs = [ob.channel("r2", c) + 2 * ob.neuron("r1", c + 1, 1, 6)
            - 0.5 * ob.direction("r2", np.arange(6) - 2.0 + c) + 0.3 * ob.class_logit(c)
            + 0.7 * ob.diversity("r2") - 1e-3 * ob.total_variation() for c in range(3)]
    values, terms = _evaluate(objs, x)
    ref_values, ref_terms = ob.evaluate(objs, acts, x)
    np.testing.assert_allclose(terms, ref_terms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5)
    # known values, by hand
    np.testing.assert_allclose(terms[:, 0], [acts["r2"][i, i].mean() for i in range(3)], rtol=1e-5)
    np.testing.assert_allclose(terms[:, 1], [acts["r1"][i, i + 1, 1, 6] for i in range(3)],
                               rtol=1e-5)
    np.testing.assert_allclose(terms[:, 3], [acts["logits"][i, i] for i in range(3)], rtol=1e-5)


def test_known_values_centre_neuron_identical_diversity():
    x = np.repeat(np.random.default_rng(2).random((1, 3, 32, 32)).astype(np.float32), 3, axis=0)
    acts = _activations(small_net(), x)
    objs = [ob.neuron("c2", 4) + ob.diversity("r2")] * 3
    _, terms = _evaluate(objs, x)
    assert np.all(terms[:, 0] != 0)
    np.testing.assert_allclose(terms[:, 0], acts["c2"][:, 4, 8, 8], rtol=1e-6)  # 16x16: (8, 8)
    np.testing.assert_allclose(terms[:, 1], -1.0, atol=1e-6)  # identical pictures
    flat = np.full((1, 3, 32, 32), 0.25, np.float32)
    _, terms = _evaluate([ob.channel("r1", 0) - ob.total_variation()], flat)
    assert terms[0, 1] == 0.0  # a flat picture has no variation


# ---- gradients: the engine against finite differences -----------------------------------------
def _forward_and_gradient(mode, objectives, redirect):
    batch, size = len(objectives), 16
    model = small_net()
    tensors = {"r1": "r1", "r2": "r2", "logits": "logits"}
    cut = cut_at(model, ["r1", "r2", "logits"])
    fwd, tables = og.objective_forward(cut, objectives, mode, batch, 1, size, (32, 32), NORM,
                                       tensors, SHAPES, redirect)
    param = "fv:spectrum" if mode == "lucent" else "fv:x"
    grad = vjp(fwd, wrt=[param], seed_outputs=["fv:loss"], batch=batch)
    rng = np.random.default_rng(3)
    feeds = {f"fv:{k}": v for k, v in ob.tables(objectives, batch, SHAPES).items()}
    assert set(feeds) == set(tables)
    feeds["fv:live"] = np.ones(batch, np.float32)
    feeds["fv:step"] = np.array(0, np.int64)
    if redirect:
        feeds["fv:prev"] = np.zeros((batch, len(objectives[0].terms)), np.float32)
    if mode == "lucent":
        rngs = [fv.filter_rng(4, i) for i in range(batch)]
        feeds[param] = np.stack([ov.FourierImage(size, size).init(r) * 20 for r in rngs])
        feeds["fv:draws"] = np.stack([fv.transform_table(r, 1) for r in rngs])
    else:
        feeds[param] = rng.random((batch, 3, 32, 32)).astype(np.float32)
    return make_session(fwd, "cpu", 1), make_session(grad, "cpu", 1), feeds, param


@pytest.mark.parametrize("mode", ["lucent", "seed"])
@pytest.mark.parametrize("redirect", [False, True])
def test_gradient_equals_finite_differences(mode, redirect):
    """<grad, d> = (f(p + e d) - f(p - e d)) / 2e for the summed loss over the batch, in random
    directions d: every term kind at once, through transforms and parameterization."""
    objs = [ob.channel("r2", c) + 2 * ob.neuron("r1", c + 1, 2, 5)
            - 0.5 * ob.direction("r2", np.arange(6) - 2.0 + c) + 0.3 * ob.class_logit(c)
            + 0.7 * ob.diversity("r2") - 1e-3 * ob.total_variation() for c in range(3)]
    fwd, bwd, feeds, param = _forward_and_gradient(
        mode, objs, {"r1": "c1", "r2": "c2"} if redirect else None)
    seeded = {**feeds, "seed:fv:loss": np.ones(len(objs), np.float32)}
    names = {i.name for i in bwd.get_inputs()}
    g = bwd.run([f"grad:{param}"], {k: v for k, v in seeded.items() if k in names})[0]
    fnames = {i.name for i in fwd.get_inputs()}
    rng = np.random.default_rng(5)
    p = feeds[param].astype(np.float64)
    gn = np.linalg.norm(g)
    unit = g.astype(np.float64) / gn
    for k in range(4):  # along the gradient, then halfway to random directions (a wrong part
        # of g orthogonal to itself shows there; a purely random d gives a derivative of
        # |g| / sqrt(size), below float32's noise)
        r = rng.standard_normal(p.shape)
        d = unit if k == 0 else unit + r / np.linalg.norm(r)
        d /= np.linalg.norm(d)
        eps = 1e-3  # smaller: float32 noise; larger: curvature (sigmoid, kinks)
        vals = []
        for s in (1, -1):
            f = {k: v for k, v in feeds.items() if k in fnames}
            f[param] = (p + s * eps * d).astype(np.float32)
            vals.append(float(fwd.run(["fv:loss"], f)[0].astype(np.float64).sum()))
        fd = (vals[0] - vals[1]) / (2 * eps)
        got = float(np.sum(g.astype(np.float64) * d))
        assert abs(got - fd) <= 1e-2 * abs(fd) + 1e-3 * gn, (k, got, fd, gn)


# ---- the optimizer ------------------------------------------------------------------------------
def test_class_logit_rises_and_padding_changes_nothing():
    """Three pictures of one class with diversity: the logit rises; run in a batch of 4 (one
    padded item, not compared by diversity) they are the same pictures."""
    objs = [ob.class_logit(2) + 0.5 * ob.diversity("r2")] * 3
    kw = dict(mode="lucent", steps=1, lr=0.05, norm=NORM, param_size=16, device="cpu",
              threads=1)
    rngs = lambda: [fv.filter_rng(0, i) for i in range(3)]  # noqa: E731
    exact = oj.ObjectiveJob(small_net(), objs, 3, **kw).run_objectives(objs, rngs(), 1)
    padded = oj.ObjectiveJob(small_net(), objs, 4, **kw).run_objectives(objs, rngs(), 1)
    for a, b in zip(exact, padded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    res = oj.optimize(small_net(), objs, steps=24, preprocess=IMAGENET, param_size=16,
                      device="cpu", threads=1)
    logit = res.term_curves[:, 0]
    assert np.all(logit[:, -4:].mean(1) > logit[:, :4].mean(1)), logit
    assert res.final_terms[:, 1].max() < 0  # the diversity term: minus a mean cosine


@pytest.mark.parametrize("mode", ["lucent", "seed"])
def test_every_term_has_cuda_kernels(mode):
    """The step and evaluation graphs of an objective with every kind of term use only ops
    the CUDA provider has kernels for (no Shape op: shapes are initializers)."""
    from test_filters_graph import CUDA_OPS

    objs = [ob.channel("r2", c) + 2 * ob.neuron("r1", c) - 0.5 * ob.direction("r2", np.ones(6))
            + ob.class_logit(c) + ob.diversity("r2") - 1e-3 * ob.total_variation()
            for c in range(2)]
    job = oj.ObjectiveJob(small_net(), objs, 2, mode=mode, steps=3, lr=0.05, norm=NORM,
                          param_size=16, device="cpu", threads=1)
    ops = set(og.op_types(job.spec.model)) | set(og.op_types(job.eval_graph))
    assert ops <= CUDA_OPS and "Shape" not in ops, ops - CUDA_OPS


def test_class_logit_of_a_conv_head():
    """Logits shaped [B, K, 1, 1] (a 1x1-conv head, SqueezeNet-like) are read as [B, K]."""
    model = small_net()
    shape = onnx.numpy_helper.from_array(np.array([0, 4, 1, 1], np.int64), "shape4")
    model.graph.initializer.append(shape)
    model.graph.node.append(onnx.helper.make_node("Reshape", ["logits", "shape4"], ["head"]))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("head", 1, None))
    x = np.random.default_rng(4).random((2, 3, 32, 32)).astype(np.float32)
    objs = [ob.class_logit(2), ob.class_logit(3)]
    job = oj.ObjectiveJob(model, objs, 2, mode="seed", steps=1, lr=0.01, norm=NORM,
                          device="cpu", threads=1)
    values = job.evaluate_state(x, job.constants(objs))["fv:values"]
    logits = _activations(small_net(), x)["logits"]
    np.testing.assert_allclose(values, [logits[0, 2], logits[1, 3]], rtol=1e-5)


def test_bad_objectives_are_named():
    with pytest.raises(ConfigError, match="channels 0..5"):
        oj.optimize(small_net(), [ob.channel("r2", 6)], steps=1, device="cpu", threads=1)
    old = small_net()
    old.opset_import[0].version = 15
    with pytest.raises(ConfigError, match="opset >= 16.*use mode seed"):
        oj.optimize(old, [ob.class_logit(1)], steps=1, device="cpu", threads=1)
    with pytest.raises(ConfigError, match="differ in structure"):
        ob.check_batch([ob.channel("r2", 1), ob.neuron("r2", 1)])
    model = small_net()
    assert oj.logits_tensor(model) == "logits"
    soft = onnx.helper.make_node("Softmax", ["logits"], ["prob"], axis=1)
    model.graph.node.append(soft)
    model.graph.output[0].name = "prob"
    assert oj.logits_tensor(model) == "logits"


def test_filters_objective_from_the_config(tmp_path):
    """filters.objective per filter c of the job's layer: the JSON's final values are the
    objective on the final pictures (lucent: the picture at the input size), by definition."""
    import json

    from test_filters import write_model_dir

    model_dir = write_model_dir(tmp_path / "tiny", small_net(), IMAGENET)
    text = "neuron(layer, c) - 1e-3 * total_variation() + 0.5 * class_logit(c)"
    info = fv.visualize_layer(model_dir, "w2", tmp_path / "out", mode="lucent", filters=[1, 3],
                              steps=4, batch_size=2, device="cpu", threads=1, expression=text)
    assert info["expression"] == text and info["objective_tensor"] == "r2"
    images = np.load(tmp_path / "out" / "w2.lucent.npy").transpose(0, 3, 1, 2)
    objs = [ob.parse(text, {"layer": "r2", "c": c}).with_layers(
        lambda n: "logits" if n == ob.LOGITS else n) for c in (1, 3)]
    values, _ = ob.evaluate(objs, _activations(small_net(), images), images)
    np.testing.assert_allclose(info["final"], values, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "out" / "w2.lucent.json").read_text())["curves"]
    with pytest.raises(ConfigError, match="objective"):
        fv.visualize_layer(model_dir, "w2", tmp_path / "out", filters=[1], steps=1,
                           device="cpu", threads=1, expression="channel(layer, c) +")


def test_neuron_pictures_excite_the_centre_unit_and_filter_pictures_the_channel(tmp_path):
    """`cnnviz filters --neurons` (the workflow's neuron jobs, filters.neurons): each picture
    maximizes neuron(layer, c), the unit at the centre of filter c's map. Against the filter
    pictures of the same filters, seed and steps: the neuron pictures drive the centre unit
    higher, the filter pictures the channel's mean."""
    import json

    from cnnviz.cli import main
    from test_filters import write_model_dir

    model_dir = write_model_dir(tmp_path / "tiny", small_net(), IMAGENET)
    options = json.dumps({"count": 4, "steps": 48, "batch_size": 4, "seed": 0})
    common = ["filters", "--card", str(model_dir / "model.json"), "--layer", "w2", "--mode",
              "seed", "--options", options, "--device", "cpu", "--threads", "1"]
    assert main([*common, "--out-dir", str(tmp_path / "filters")]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "neurons"), "--neurons"]) == 0
    info = json.loads((tmp_path / "neurons" / "w2.seed.json").read_text())
    assert info["expression"] == ob.NEURON_OBJECTIVE
    pictures = {kind: np.load(tmp_path / kind / "w2.seed.npy").transpose(0, 3, 1, 2)
                for kind in ("filters", "neurons")}  # fmt: skip
    r2 = {kind: _activations(small_net(), x)["r2"] for kind, x in pictures.items()}
    side = r2["filters"].shape[-1]
    rows = np.arange(4)
    centre = {kind: a[rows, rows, side // 2, side // 2] for kind, a in r2.items()}
    mean = {kind: a[rows, rows].mean((1, 2)) for kind, a in r2.items()}
    assert np.all(centre["neurons"] > centre["filters"]), centre
    assert np.all(mean["filters"] > mean["neurons"]), mean
