"""Past rules.FLIP_BUDGET_BYTES of flipped kernels, a convolution's backward is a ConvTranspose
on the weight itself instead of a Conv on a flipped copy: a model of a few GB (regnet_y_128gf)
cannot afford a second copy of its weights. Both give the same input gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cluster.workflow_runs import tiny_classifier
from cnnviz.autodiff import rules, vjp
from cnnviz.graph import find_logits, input_name
from cnnviz.runtime import make_session


def _input_gradient(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, onnx.ModelProto]:
    name, logits = input_name(model), find_logits(model)
    graph = vjp(model, [name], [logits], "gradient", batch=len(x))
    seed = np.zeros((len(x), 10), np.float32)
    seed[:, 3] = 1.0
    got = make_session(graph, "cpu", 1).run([f"grad:{name}"], {name: x, f"seed:{logits}": seed})
    return got[0], graph


def test_past_the_budget_the_backward_reads_the_weight_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = onnx.load(str(tiny_classifier(tmp_path / "tiny.onnx", seed=2)))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    flipped, within = _input_gradient(model, x)
    monkeypatch.setattr(rules, "FLIP_BUDGET_BYTES", 0)
    transposed, past = _input_gradient(model, x)

    def flips(graph: onnx.ModelProto) -> tuple[int, int]:
        transposes = sum(n.op_type == "ConvTranspose" for n in graph.graph.node)
        return transposes, sum("wflip" in t.name for t in graph.graph.initializer)

    assert flips(within)[0] == 0 < flips(within)[1]
    assert flips(past)[0] > 0 == flips(past)[1]
    assert np.abs(flipped).max() > 0
    np.testing.assert_allclose(transposed, flipped, rtol=1e-5, atol=1e-6)
