"""The model zoo in CI (benchmarks/zoo.py): the smallest torchvision CNN of each family, random
weights, exported by cnnviz's export step at 32 px, through gradcheck under the three policies
and every per-image step on one photo (each explain method's maps finite and of the image's
size, predictions, activations, filters): every op has a backward rule and every check and
step passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch]
pytest.importorskip("torch")
pytest.importorskip("torchvision")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402

SIZE = 32
# The TorchScript exporter cannot write adaptive average pooling to 7x7 (vgg) or 6x6 (alexnet)
# from a smaller feature map ("output size that are not factor of input size") below 224 px;
# dynamo can (as a GatherND). TorchScript for the others: a third of dynamo's export time.
EXPORTER = {"alexnet": "dynamo", "vgg11": "dynamo", "vgg11_bn": "dynamo"}
# gradcheck's per-op check of the 25088x4096 (vgg) / 9216x4096 (alexnet) classifier Gemm takes
# 10 s per policy: their convs, pools and ReLUs are checked per op in the other families.
NO_PER_OP = {"alexnet", "vgg11", "vgg11_bn"}
GRADIENT_FREE = {"predictions", "activations", "scorecam", "occlusion"}
# Families whose smallest member's export has the op types of another CI member (BatchNorm is
# folded into the convs at export; a wide bottleneck is resnext's bottleneck with one group):
# left to the full sweep (ZOO.md), where both pass, to keep the suite within its 30 minutes
# (vgg11 170 s, wide_resnet50_2 92 s on 2 cores: each method pays a 0.5 GB session build).
SAME_OPS_AS = {"vgg11": "vgg11_bn", "wide_resnet50_2": "resnext50_32x4d"}
CI_MODELS = [m for m in zoo.resolve_models(None, smallest=True) if m not in SAME_OPS_AS]


@pytest.mark.parametrize("name", CI_MODELS)
def test_smallest_of_each_family(name: str, tmp_path: Path) -> None:
    exporter = EXPORTER.get(name, "torchscript")
    size = zoo.size_for(name, SIZE)
    row = zoo.check_model(
        name,
        exporter,
        size,
        tmp_path,
        threads=2,
        samples=300,
        per_op=name not in NO_PER_OP,
        families=True,
    )
    assert row["export"]["status"] == "ok", row["export"]
    steps = row["steps"]
    assert set(steps) == {*zoo.STEPS, *zoo.per_image_methods(), "filters"}
    assert all(steps[s]["status"] == "ok" for s in GRADIENT_FREE), zoo.verdict(row)
    assert len(row["gradcheck"]) == 3
    # Every op has a backward rule, and every check and step passes.
    assert row["missing"] == []
    results = {**{f"gradcheck {p}": r for p, r in row["gradcheck"].items()}, **steps}
    bad = {k: r.get("reason", "") for k, r in results.items() if r["status"] != "ok"}
    assert not bad, zoo.verdict(row)
