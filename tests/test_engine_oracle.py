"""The gradient engine against torch autograd on real CNN exports (slow; needs torch).

For each architecture (random weights, seeded, BatchNorm statistics from one random batch;
EfficientNet-Lite0 pretrained, exported raw by both torch exporters and by `cnnviz export`) and
each check (input gradient, gradient at the last conv activation, deconvnet,
guided backprop) the engine's map for a batch of two images, each with its own target class,
is compared with torch's, per sample:

- exact: max|ORT - torch| / max|torch| < 1e-4 against torch float32 or float64;
- kink flip: otherwise, a float32 forward put a ReLU/Clip input or a MaxPool runner-up within
  rounding of its kink somewhere among millions of activations, ORT and torch routed part of
  the gradient differently, and the map differs locally (measured up to 4e-2 relative) while
  staying globally the same map. Accepted when the flipped units are found (`kink_flips`:
  ORT's float32 and torch's float64 forward put a ReLU/Clip/HardSwish input on different
  sides of a kink) and the cosine with torch float64 is above 0.995; when none is found (a
  MaxPool switch, or activations that cannot be matched), only above 0.999 (0.995 for
  deconvnet / guided: sparser, sign-gated maps, where one flipped gate moves a larger share).
A rule error changes the map wherever its op acts: ResNet-50 with the skip connection's gradient
dropped (Add's second input) scores cosine 0.03 and 0.01.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see torch_oracle
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
oracle = pytest.importorskip("torch_oracle")

from cnnviz.autodiff import vjp  # noqa: E402
from cnnviz.runtime import make_session  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

# (architecture, exporter): "ts" / "dynamo" are raw torch.onnx exports; "cnnviz" is the
# pipeline's own export (cnnviz.export: folded constants, Pads fused into asymmetric Conv pads).
CASES = [
    ("efficientnet_lite0", "ts"),
    ("efficientnet_lite0", "dynamo"),
    ("efficientnet_lite0", "cnnviz"),
    ("vgg16", "ts"),
    ("resnet50", "ts"),
    ("mobilenet_v2", "ts"),
    ("mobilenet_v3_small", "ts"),
    ("densenet121", "ts"),
    ("googlenet", "ts"),
    ("squeezenet1_0", "ts"),
    ("alexnet", "ts"),
]
CHECKS = ["gradient", "intermediate", "deconvnet", "guided"]
EXACT = 1e-4
KINK_COSINE = {"gradient": 0.999, "intermediate": 0.999, "deconvnet": 0.995, "guided": 0.995}
VERIFIED_KINK_COSINE = 0.995  # when the flipped units are found (kink_flips), any check
THREADS = 2


class Case:
    """One exported architecture: torch model, ONNX model, a batch of 2, the targets."""

    def __init__(self, arch: str, exporter: str):
        torch.set_num_threads(THREADS)
        self.arch, self.exporter = arch, exporter
        self.spec = oracle.ARCHS[arch]
        self.model = oracle.build(arch)
        if exporter == "cnnviz":
            path = pipeline_export(arch)
        else:
            path = oracle.export(arch, exporter == "dynamo", model=self.model)
        self.onnx = onnx.load(str(path))
        rng = np.random.default_rng(1)
        size = self.spec.size
        self.x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(self.x)).numpy()
        first = int(logits[0].argmax())
        second = [int(c) for c in np.argsort(logits[1])[::-1] if c != first][0]
        self.targets = [first, second]  # a different class per sample
        self.seed = np.zeros_like(logits)
        self.seed[[0, 1], self.targets] = 1.0
        self._refs: dict[tuple, dict] = {}
        self._feature: str | None = None

    def reference(self, policy: str, dtype=None) -> dict[str, np.ndarray]:
        """torch's maps (cached); the float64 run also records the activations' kink sides."""
        dtype = dtype or torch.float32
        key = (policy, dtype)
        if key not in self._refs:
            feature = self.spec.feature if policy == "gradient" else None
            record = [] if dtype == torch.float64 else None
            self._refs[key] = oracle.reference(
                self.model, self.x, self.targets, policy, feature, self.spec.feature_call,
                dtype, record,
            )  # fmt: skip
            self._refs[key]["record"] = record
        return self._refs[key]

    @property
    def feature(self) -> str:
        """The ONNX name of the torch feature module's output, found by value."""
        if self._feature is None:
            value = self.reference("gradient")["feature"]
            self._feature = oracle.onnx_tensor_matching(self.onnx, self.x, value)
        return self._feature

    def engine(self, check: str) -> tuple[np.ndarray, np.ndarray]:
        """(engine gradient, engine logits) for a check."""
        policy = "gradient" if check == "intermediate" else check
        wrt = self.feature if check == "intermediate" else "input"
        g = vjp(self.onnx, [wrt], policy=policy, batch=2)
        session = make_session(g, device="cpu", threads=THREADS)
        grad, logits = session.run(
            [f"grad:{wrt}", "logits"], {"input": self.x, "seed:logits": self.seed}
        )
        return grad, logits


def pipeline_export(arch: str):
    """The pipeline's export (`cnnviz export`) of a pretrained model, cached like the others."""
    from cnnviz.export import export_model

    assert arch == "efficientnet_lite0", "only the shipped pretrained model is exported this way"
    folder = oracle.cache_dir() / f"cnnviz-{arch}-torch{torch.__version__}"
    if not (folder / "model.json").is_file():
        export_model("efficientnet-lite0", "efficientnet-lite0", folder)
    return folder / "model.onnx"


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{e}" for a, e in CASES])
def case(request) -> Case:
    return Case(*request.param)


def judge(check: str, got: np.ndarray, case: Case) -> list[dict]:
    """Per-sample verdicts: exact vs float32 / float64 torch, or an identified kink flip."""
    policy = "gradient" if check == "intermediate" else check
    key = "grad_feature" if check == "intermediate" else "input"
    ref32 = case.reference(policy)[key]
    rows = []
    for i in range(len(got)):
        row = {"sample": i, "rel32": oracle.rel_err(got[i], ref32[i])}
        rows.append(row)
        if row["rel32"] < EXACT:
            row["verdict"] = "exact"
            continue
        ref = case.reference(policy, torch.float64)
        row["rel64"] = oracle.rel_err(got[i], ref[key][i])
        row["cos64"] = oracle.cosine(got[i], ref[key][i])
        if row["rel64"] < EXACT:
            row["verdict"] = "exact (f64; torch f32 flipped)"
            continue
        if row["cos64"] <= VERIFIED_KINK_COSINE:
            row["verdict"] = "FAIL"
            continue
        flips = oracle.kink_flips(case.onnx, case.x, ref["record"], i)
        has_maxpool = any(n.op_type == "MaxPool" for n in case.onnx.graph.node)
        if flips:
            where = ", ".join(f"{k} x{v}" for k, v in list(flips.items())[:3])
            row["verdict"] = f"kink flip ({sum(flips.values())} units: {where})"
        elif row["cos64"] <= KINK_COSINE[check]:
            row["verdict"] = "FAIL (no flipped ReLU-like unit found, cosine too low)"
        elif flips is None:
            row["verdict"] = "kink flip? (activation order differs from torch's: not counted)"
        elif has_maxpool:
            row["verdict"] = "kink flip? (no ReLU-like unit flipped: a MaxPool switch)"
        else:
            row["verdict"] = "FAIL (no kink flipped: a rule error?)"
    return rows


@pytest.mark.parametrize("check", CHECKS)
def test_engine_matches_torch(case: Case, check: str):
    start = time.perf_counter()
    got, logits = case.engine(check)
    assert oracle.rel_err(logits, case.reference("gradient")["logits"]) < 1e-4, "forward differs"
    rows = judge(check, got, case)
    line = "; ".join(
        f"s{r['sample']}: {r['verdict']} rel32 {r['rel32']:.1e}"
        + (f" rel64 {r['rel64']:.1e} cos64 {r['cos64']:.6f}" if "rel64" in r else "")
        for r in rows
    )
    print(f"\n{case.arch}-{case.exporter} {check}: {line} "
          f"[{time.perf_counter() - start:.1f}s]")  # fmt: skip
    assert not any(r["verdict"].startswith("FAIL") for r in rows), line


def test_gradcheck_on_small_export():
    """`gradcheck` on a real export: every op type and the end-to-end cosine pass."""
    from cnnviz.autodiff.gradcheck import format_report, gradcheck

    path = oracle.export("squeezenet1_0")
    result = gradcheck(
        path, samples=300, op_samples=128, layer="/features/features.12/Concat_output_0"
    )
    print("\n" + format_report(result))
    assert result["end_to_end"]["cosine"] > 0.99
    assert result["layer"]["status"] == "ok"
    assert {r["op_type"] for r in result["ops"]} >= {"Conv", "Relu", "MaxPool", "Concat"}
    assert result["passed"], result["failed"] + result["unsupported"]


def test_gradcheck_grad_cam_layer_of_the_pipeline_export():
    """The Grad-CAM cut of the exported EfficientNet-Lite0 (post-ReLU6 head, linear tail)."""
    import json

    from cnnviz.autodiff.gradcheck import gradcheck

    folder = pipeline_export("efficientnet_lite0").parent
    last = json.loads((folder / "model.json").read_text())["layers"][-1]["name"]
    result = gradcheck(folder, per_op=False, samples=100, layer=last, threads=THREADS)
    assert result["layer"]["alpha_max_rel_err"] < 5e-3  # GAP + Gemm: FD nearly exact
    assert result["end_to_end"]["cosine"] > 0.99
    assert result["passed"]
