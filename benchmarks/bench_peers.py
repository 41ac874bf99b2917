"""cnnviz against its torch peers, every model and batch in one process and one interleaved run.

For each model the pipeline exports (`cnnviz.export.export_model`, cached under --model-dir:
EfficientNet-Lite0 pretrained; torchvision vgg16 and resnet50 with random weights; 224x224) and
batch 1 and 16, one interleaved run (each repeat runs every contender once, in a rotating order)
times:

- ONNX Runtime's forward against torch's (no_grad);
- Grad-CAM / Grad-CAM++ / Score-CAM against pytorch-grad-cam's GradCAM / GradCAMPlusPlus /
  ScoreCAM (batch_size 64), on the torch module whose output is the card's Grad-CAM tensor;
- saliency / guided backprop / deconvnet / integrated gradients (gausslegendre, zero baseline) /
  occlusion (zero baseline, softmax) against captum's Saliency / GuidedBackprop / Deconvolution /
  IntegratedGradients / Occlusion; captum's guided and deconvolution rules see EfficientNet's
  ReLU6 as an nn.ReLU subclass (tests/torch_oracle.py), else they would return the gradient;
- activation maximization (lucent recipe; bench_filters.py) as filter-steps/s against the same
  recipe as a torch autograd loop over the same filters, both at the cell's batch;
- the methods of issue 17: HiResCAM / XGrad-CAM / Eigen-CAM / Ablation-CAM (batch 64) / FullGrad /
  fused LayerCAM (4 layers, mean) against pytorch-grad-cam's HiResCAM / XGradCAM / EigenCAM /
  AblationCAM / FullGrad / LayerCAM on the same layers; Input x Gradient / DeepLIFT (rescale,
  zero baseline) against captum's InputXGradient / DeepLift (ReLU6 given captum's rescale rule,
  one module per call, as tests/test_deeplift_peers.py); LRP EpsilonPlusFlat / EpsilonGammaBox
  against zennit 0.5.1's composites with the canonizers that make the torch model the exported
  network (tests/test_lrp_peers.py); RISE against the paper's algorithm written in torch (a
  reference, not a released tool: the masks precomputed as its code does, then scored
  `RISE_BATCH` at a time) with the same masks, at equal mask count.

Inputs: scikit-image's sample photos, preprocessed as the model card says; target = each image's
top-1 class. cnnviz runs each method as the pipeline does (`cnnviz explain`): the method's whole
ONNX graph (cnnviz.methodgraph: `cam.cam_graph`, `backprop.gradient_graph`,
`backprop.integrated_gradients_graph`, `occlusion.occlusion_graph`, `cam.scorecam_graphs`) fed by
the one runner (cnnviz.runner.Runner) with the same images, targets and rows per call. Graphs,
runners (their sessions, warmed by one untimed call) and torch copies are built once per cell,
outside the timings; the forward is a plain session. Threads: 2 on both
sides (torch.set_num_threads(2) with OMP_WAIT_POLICY=PASSIVE set before torch loads; ONNX
Runtime intra_op 2, inter_op 1, allow_spinning 0).

Each method is also given as its floor ratio: its median over one ORT forward of the same model
and batch, next to its physical floor in forwards (Grad-CAM ~1; saliency, guided, deconvnet ~3,
a forward plus a backward of about two; IG steps x 3; occlusion patches + 1; Score-CAM one per
channel; a filter step ~3).

The plan (PLAN) is sized to fit 25 minutes on 2 quiet cores: the expensive peers run once and/or
on fewer IG steps or occlusion patches on the large models and at batch 16, some batch-16 cells
are estimated from batch 1; the output says which and why. Issue 17's pairs add an estimated
~8 minutes to that (not yet measured quiet; on loaded cores EfficientNet-Lite0's took 140 s at
batch 1 and 512 s at batch 16 with 5 repeats, now 2), so the whole plan is ~35 minutes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_peers.py [--quick] [--out FILE.md]
        [--models efficientnet-lite0,resnet50,vgg16] [--batches 1,16] [--repeats N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_backprop  # noqa: E402
import bench_engine  # noqa: E402
import bench_filters  # noqa: E402
import benchlib  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import OwnTime  # noqa: E402

THREADS = 2
SCORE_BATCH = 64  # Score-CAM masked inputs per run, both sides (bench_cam.py)
OCCLUSION_BATCH = 32  # occluded copies per run (cnnviz: the rows given to runner.chunk_plan)
IG_CHUNK = 1  # cnnviz IG rows (images x path points) per run: lowest cost per point on 2 cores
CAPTUM_IG_ALL = 50  # captum IG: up to this many path points in one batch (its default: all)
CAPTUM_IG_CHUNK = 16  # ... beyond it, internal_batch_size 16 (memory: batch 16 x 8 steps)
ABLATION_BATCH = 64  # Ablation-CAM ablated copies per run, both sides (cnnviz's default)
RISE_BATCH = 32  # RISE masked images per run, both sides (cnnviz's default)
FUSION_LAYERS = 4  # fused LayerCAM: the deepest 4 resolution stages (cnnviz's default, auto)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    weights: str
    cam_module: str  # torch module whose output is the card's Grad-CAM tensor (last conv layer)
    filter_layer: str  # card layer whose channels activation maximization maximizes
    filter_module: str  # torch module whose output, clamped, is that layer's tensor
    filter_clamp: tuple[float | None, float | None]


SPECS = {
    s.name: s
    for s in (
        ModelSpec(
            "efficientnet-lite0",
            "efficientnet-lite0",
            "pretrained",
            "head_act",  # the oracle gives the head its own ReLU6 module
            "blocks.8.expand_conv",  # 480 x 14 x 14, ReLU6
            "_blocks.8._bn0",
            (0.0, 6.0),
        ),
        ModelSpec(
            "resnet50",
            "torchvision:resnet50",
            "random",
            "layer4.2.bn3",  # the card's last conv: layer4.2.conv3 with its BN folded
            "layer3.5.conv2",  # 256 x 14 x 14, ReLU
            "layer3.5.bn2",
            (0.0, None),
        ),
        ModelSpec(
            "vgg16",
            "torchvision:vgg16",
            "random",
            "features.29",  # the ReLU after features.28
            "features.24",  # 512 x 14 x 14, ReLU
            "features.24",
            (0.0, None),
        ),
    )
}


@dataclass(frozen=True)
class Cell:
    """What runs for one model and batch (None / "skip": not run, estimated from batch 1)."""

    repeats: int = 5  # forward, Grad-CAM, Grad-CAM++, saliency, guided, deconvnet
    peer_warmup: int = 1  # untimed warm-up calls per torch contender (ORT ones: always 1)
    gradcampp: bool = True
    ig_steps: int | None = 8
    ig_repeats: int = 1
    occlusion: tuple[int, int] | None = (56, 56)  # window, stride
    occlusion_repeats: int = 1
    scorecam: str = "estimate"  # measure: both | estimate: the peer from a torch probe | skip
    filter_steps: int | None = 3
    filter_rounds: int = 1
    split: bool = False  # one interleaved run per pair, sessions freed in between (memory)
    new: bool = True  # issue 17's methods (NEW)
    new_repeats: int | None = None  # their cheap pairs' repeats (None: `repeats`)
    heavy_repeats: int = 1  # FullGrad, Ablation-CAM, RISE
    fullgrad: bool = True  # False: estimated from batch 1 (the peer ~5 s an image)
    # Ablation-CAM: measure both | estimate: the peer from a torch probe (ceil(C / 64) forwards
    # at batch 64, as Score-CAM's) | skip: estimated from batch 1 (image by image, both sides)
    ablation: str = "estimate"
    rise_masks: int | None = 256  # None: estimated from batch 1
    why: tuple[str, ...] = ()  # reasons for the reductions, for the plan table


FULL_SETTINGS = "IG 50 steps, occlusion 32/16 (169 patches), Score-CAM peer measured"
PLAN: dict[tuple[str, int], Cell] = {
    ("efficientnet-lite0", 1): Cell(
        repeats=7,
        ig_steps=50,
        ig_repeats=3,
        occlusion=(32, 16),
        occlusion_repeats=3,
        scorecam="measure",
        filter_steps=8,
        filter_rounds=3,
        heavy_repeats=2,
        rise_masks=256,
        why=(
            "the target cell: full settings; Score-CAM 1 repeat (pytorch-grad-cam ~100 s)",
            "RISE 256 masks (the pipeline's default 4000 costs ~16x on both sides: ~1.5 + ~7 "
            "min a repeat on loaded cores); Ablation-CAM's peer estimated (20 torch forwards "
            "at batch 64, one timed): measured once it took 210 s on loaded cores",
        ),
    ),
    ("efficientnet-lite0", 16): Cell(
        repeats=5,
        ig_steps=8,
        ig_repeats=1,
        occlusion=(56, 56),
        occlusion_repeats=2,
        scorecam="skip",
        filter_steps=8,
        filter_rounds=2,
        why=(
            "IG 8 steps, 1 repeat: 50 steps would be ~50 s (cnnviz) + ~150 s (captum) a repeat",
            "occlusion 56/56 (16 patches): 32/16 would be ~55 s + ~175 s a repeat",
            "Score-CAM runs image by image in both libraries: estimated as 16 x batch 1",
            "FullGrad, Ablation-CAM, RISE estimated as 16 x batch 1: the peers run them image "
            "by image (FullGrad's per-channel cv2 resize ~5 s an image; Ablation-CAM one "
            "forward per channel; the paper's RISE code); cnnviz's batch-16 FullGrad is one "
            "graph call, so its estimate is pessimistic for cnnviz",
            "issue 17's cheap pairs 2 repeats (a repeat of the ten ~70 s on loaded cores)",
        ),
        new_repeats=2,
        fullgrad=False,
        ablation="skip",
        rise_masks=None,
    ),
    ("resnet50", 1): Cell(
        repeats=5,
        ig_steps=8,
        ig_repeats=2,
        occlusion=(56, 56),
        occlusion_repeats=2,
        scorecam="estimate",
        filter_steps=4,
        filter_rounds=2,
        why=(
            "IG 8 steps, occlusion 56/56 (16 patches): ~6x and ~10x cheaper than the full "
            "settings (cost is linear in steps and patches on both sides)",
            "Score-CAM peer estimated: 2048 channels = 32 torch forwards at batch 64 (one such "
            "forward timed); measuring it would take ~3 min",
            "Ablation-CAM not run: pytorch-grad-cam runs the whole network once per channel "
            "(2048: ~2 min); RISE 128 masks; issue 17's cheap pairs 3 repeats",
        ),
        ablation="skip",
        rise_masks=128,
        new_repeats=3,
    ),
    ("resnet50", 16): Cell(
        repeats=3,
        ig_steps=4,
        ig_repeats=1,
        occlusion=(56, 56),
        occlusion_repeats=1,
        scorecam="skip",
        filter_steps=3,
        filter_rounds=1,
        split=True,
        why=(
            "3 repeats (a repeat ~25 s); IG 4 steps, occlusion 56/56, 1 repeat",
            "one interleaved run per pair, sessions freed in between: five batch-16 gradient "
            "sessions side by side risk running out of memory",
            "Score-CAM: 16 x batch 1 (image by image in both libraries)",
            "FullGrad and RISE estimated as 16 x batch 1; Ablation-CAM not run; issue 17's "
            "cheap pairs 1 repeat",
        ),
        new_repeats=1,
        fullgrad=False,
        ablation="skip",
        rise_masks=None,
    ),
    ("vgg16", 1): Cell(
        repeats=5,
        ig_steps=8,
        ig_repeats=1,
        occlusion=(56, 56),
        occlusion_repeats=2,
        scorecam="estimate",
        filter_steps=3,
        filter_rounds=2,
        split=True,
        why=(
            "IG 8 steps (50: ~25 s + ~35 s a repeat), occlusion 56/56 (32/16: ~25 s + ~45 s)",
            "Score-CAM peer estimated: 512 channels = 8 torch forwards at batch 64 (one timed)",
            "one interleaved run per pair, sessions freed in between: each method has its own "
            "graph session (~9 VGG16 sessions of 1.2-1.7 GB side by side)",
            "Ablation-CAM not run (512 full forwards in the peer, ~1.5 min); RISE 128 masks",
        ),
        ablation="skip",
        rise_masks=128,
    ),
    ("vgg16", 16): Cell(
        repeats=2,
        peer_warmup=0,
        gradcampp=False,
        ig_steps=None,
        occlusion=None,
        scorecam="skip",
        filter_steps=None,
        split=True,
        why=(
            "one interleaved run per pair, sessions freed in between: a VGG16 session holds "
            "1.2-1.7 GB of weights (batch 1 peaked at 12 GB RSS with all of them)",
            "one repeat of the cheap pairs is ~75 s: 2 repeats, torch contenders not warmed up "
            "(the ORT sessions are), Grad-CAM++ not run (the same graph and torch pass as "
            "Grad-CAM)",
            "IG, occlusion and Score-CAM estimated as 16 x batch 1 (~2.5 min, ~2 min and "
            "~55 min a repeat to measure); activation maximization not run: on this CPU a "
            "filter-step costs the same at any batch (EfficientNet: compare its batch 1 and 16 "
            "rows)",
            "issue 17's methods not run: one repeat of their cheap pairs would add ~3 min",
        ),
        new=False,
    ),
}
QUICK_PLAN: dict[tuple[str, int], Cell] = {
    ("efficientnet-lite0", 1): Cell(
        repeats=2,
        ig_steps=4,
        occlusion=(112, 112),
        scorecam="estimate",
        filter_steps=2,
        rise_masks=64,
        why=("--quick: tiny settings, indicative only",),
    ),
    ("efficientnet-lite0", 2): Cell(
        repeats=1,
        ig_steps=4,
        occlusion=(112, 112),
        scorecam="skip",
        filter_steps=2,
        fullgrad=False,
        ablation="skip",
        rise_masks=None,
        why=("--quick",),
    ),
    ("resnet50", 1): Cell(
        repeats=1,
        ig_steps=2,
        occlusion=(112, 112),
        scorecam="skip",
        filter_steps=1,
        split=True,
        ablation="skip",
        rise_masks=32,
        why=("--quick; Score-CAM and Ablation-CAM not run (2048 channels); pair by pair",),
    ),
    ("vgg16", 1): Cell(
        repeats=1,
        ig_steps=2,
        occlusion=(112, 112),
        scorecam="skip",
        filter_steps=1,
        split=True,
        ablation="skip",
        rise_masks=32,
        why=("--quick; Score-CAM and Ablation-CAM not run (~1 min); pair by pair",),
    ),
}

# method: (label, peer label, physical floor in ORT forwards of the same model and batch)
METHODS = {
    "forward": ("forward", "torch forward (no_grad)"),
    "gradcam": ("Grad-CAM", "pytorch-grad-cam GradCAM"),
    "gradcampp": ("Grad-CAM++", "pytorch-grad-cam GradCAMPlusPlus"),
    "saliency": ("saliency", "captum Saliency"),
    "guided": ("guided backprop", "captum GuidedBackprop"),
    "deconvnet": ("deconvnet", "captum Deconvolution"),
    "ig": ("integrated gradients", "captum IntegratedGradients"),
    "occlusion": ("occlusion", "captum Occlusion"),
    "scorecam": ("Score-CAM", "pytorch-grad-cam ScoreCAM"),
    "filters": ("activation maximization", "torch autograd loop (lucent recipe)"),
    # issue 17
    "hirescam": ("HiResCAM", "pytorch-grad-cam HiResCAM"),
    "xgradcam": ("XGrad-CAM", "pytorch-grad-cam XGradCAM"),
    "eigencam": ("Eigen-CAM", "pytorch-grad-cam EigenCAM"),
    "ablationcam": ("Ablation-CAM", "pytorch-grad-cam AblationCAM"),
    "fullgrad": ("FullGrad", "pytorch-grad-cam FullGrad"),
    "layercam_fusion": ("LayerCAM, fused", "pytorch-grad-cam LayerCAM (several layers)"),
    "input_x_gradient": ("Input × Gradient", "captum InputXGradient"),
    "deeplift": ("DeepLIFT", "captum DeepLift"),
    "lrp_epf": ("LRP epsilon_plus_flat", "zennit EpsilonPlusFlat"),
    "lrp_egb": ("LRP epsilon_gamma_box", "zennit EpsilonGammaBox"),
    "rise": ("RISE", "the paper's algorithm in torch (reference, not a tool)"),
}
# issue 17's methods: {method: its physical floor in ORT forwards (None: no simple one)}
NEW: dict[str, float | None] = {
    "hirescam": 1.0,  # the backward stops at the last conv layer
    "xgradcam": 1.0,
    "eigencam": 1.0,  # a forward to the layer and a small eigenproblem
    "ablationcam": None,  # a forward + the tail after the layer per ablated channel
    "fullgrad": 3.0,  # forward + backward (to the input and every bias)
    "layercam_fusion": 3.0,  # the backward reaches the shallowest fused layer
    "input_x_gradient": 3.0,
    "deeplift": 3.0,  # + the baseline's one-row forward
    "lrp_epf": 3.0,  # a forward and a rule-modified backward
    "lrp_egb": 3.0,
    "rise": None,  # one forward per mask: set from the cell's mask count
}
# the short peer name in the targets' text
PEER_SHORT = {
    m: "pytorch-grad-cam"
    for m in ("hirescam", "xgradcam", "eigencam", "ablationcam", "fullgrad", "layercam_fusion")
}
PEER_SHORT.update(
    input_x_gradient="captum",
    deeplift="captum",
    lrp_epf="zennit",
    lrp_egb="zennit",
    rise="the paper's algorithm",
)
# Targets (issue 9), on EfficientNet-Lite0 at batch 1: (kind, bound, text)
TARGETS = {
    "gradcam": ("forward", 1.2, "≤ 1.2× one ORT forward"),
    "saliency": ("peer", 0.5, "≤ 0.5× captum"),
    "guided": ("peer", 0.5, "≤ 0.5× captum"),
    "deconvnet": ("peer", 0.5, "≤ 0.5× captum"),
    "ig": ("peer", 0.4, "≤ 0.4× captum"),
    "occlusion": ("peer", 0.3, "≤ 0.3× captum"),
    "scorecam": ("speedup", 7.0, "≥ 7× faster than pytorch-grad-cam"),
    "filters": ("rate", 4.0, "≥ 4× the torch loop's filter-steps/s"),
    # issue 17 item 5: ≤ 0.5× the peer's time on the CPU
    **{m: ("peer", 0.5, f"≤ 0.5× {PEER_SHORT[m]}") for m in NEW},
}
TARGET_CELL = ("efficientnet-lite0", 1)


# ------------------------------------------------------------------------------------ inputs
def photos(count: int, pre: dict) -> np.ndarray:
    """[count, 3, H, W]: scikit-image's sample photos (mirrored after the 11th), preprocessed."""
    from cnnviz.images import SAMPLE_IMAGES, preprocess, to_rgb
    from PIL import Image, ImageOps
    from skimage import data

    names = list(SAMPLE_IMAGES)
    out = []
    for i in range(count):
        array = getattr(data, SAMPLE_IMAGES[names[i % len(names)]])()
        if isinstance(array, tuple):
            array = array[0]
        image = to_rgb(Image.fromarray(np.asarray(array)))
        if (i // len(names)) % 2:
            image = ImageOps.mirror(image)
        out.append(preprocess(image, pre))
    return np.stack(out).astype(np.float32)


# ------------------------------------------------------------------------------------ torch side
def _bottleneck_forward(self, x):
    """torchvision's Bottleneck without in-place ops and with one ReLU module per use (same
    values): hooks (pytorch-grad-cam on bn3, captum's ReLU rules) then see each call apart."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu3(out + identity)


def torch_nets(spec: ModelSpec):
    """(net, net for captum's guided / deconvolution rules): the exported weights, eval mode."""
    import types

    import torch

    if spec.source == "efficientnet-lite0":
        net = benchlib.torch_oracle().pretrained_effnet(own_head_relu6=True)
        return net, bench_backprop.swap_relu6(net)
    from cnnviz.export.sources import torchvision_model
    from torchvision.models.resnet import Bottleneck

    with contextlib.redirect_stdout(io.StringIO()):
        net = torchvision_model(spec.source.split(":", 1)[1], spec.weights).module
    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
        if isinstance(module, Bottleneck):
            module.relu2, module.relu3 = torch.nn.ReLU(), torch.nn.ReLU()
            module.forward = types.MethodType(_bottleneck_forward, module)
    return net.eval(), net


def pgc_call(cls, net, layer, xt, targets, batch_size: int | None = None) -> Callable:
    """One pytorch-grad-cam call; its hooks live for the call only (no cross-talk). `layer`: a
    module, or a list of them (fused LayerCAM; FullGrad: none)."""
    layers = layer if isinstance(layer, list) else [layer]

    def run():
        cam = cls(model=net, target_layers=layers)
        if batch_size:
            cam.batch_size = batch_size
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ScoreCAM's tqdm bars
                return cam(input_tensor=xt, targets=targets)
        finally:
            cam.activations_and_grads.release()

    return run


# ------------------------------------------------------------------------------------ one cell
@dataclass
class CellResult:
    model: str
    batch: int
    cell: Cell
    times: dict[str, list[float]]
    agreement: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    wall: float = 0.0
    setup: float = 0.0


def _pearson(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _np(t) -> np.ndarray:
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


# first image's map of each contender's result, ours / peer
VIEWS: dict[str, tuple[Callable, Callable]] = {
    "forward": (lambda o: o[0][0], lambda o: _np(o)[0]),
    "gradcam": (lambda o: o["gradcam"][0], lambda o: _np(o)[0]),
    "gradcampp": (lambda o: o["gradcampp"][0], lambda o: _np(o)[0]),
    "saliency": (lambda o: o["map"][0], lambda o: np.abs(_np(o)[0]).max(axis=0)),
    "guided": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "deconvnet": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "ig": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "occlusion": (lambda o: o[0], lambda o: _np(o)[0, 0]),
    "scorecam": (lambda o: o[0], lambda o: _np(o)[0]),
    "hirescam": (lambda o: o["hirescam"][0], lambda o: _np(o)[0]),
    "xgradcam": (lambda o: o["xgradcam"][0], lambda o: _np(o)[0]),
    "eigencam": (lambda o: o["map"][0], lambda o: _np(o)[0]),  # the peer's sign is LAPACK's
    "ablationcam": (lambda o: o[0], lambda o: _np(o)[0]),
    "fullgrad": (lambda o: o["map"][0], lambda o: _np(o)[0]),
    "layercam_fusion": (lambda o: o["map"][0], lambda o: _np(o)[0]),
    "input_x_gradient": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "deeplift": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "lrp_epf": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "lrp_egb": (lambda o: o["signed"][0], lambda o: _np(o)[0]),
    "rise": (lambda o: o[0], lambda o: _np(o)[0]),  # the paper's estimator on both sides
}


def method_runner(graph):  # noqa: ANN001, ANN201 - a MethodGraph in, a Runner out
    """The pipeline's runner of a method graph on the CPU at THREADS threads. The graph's
    ModelProto is dropped once the session holds the model (the runner needs only its shapes
    and roles): a VGG16 cell would otherwise keep a second copy of the weights per method."""
    from cnnviz.runner import Runner

    runner = Runner(graph, "cpu", THREADS)
    graph.model = None
    return runner


# fused LayerCAM on EfficientNet-Lite0: layers auto ends its 56 / 28 / 14 px stages at
# blocks.3 / 5 / 11's expand_conv (the block's first ReLU6), but torch calls that block's `_swish`
# module twice, so no hook sees that tensor alone: the harness fuses the layers of
# tests/test_layercam_fusion.py instead (the same four resolutions, the project convs' outputs).
EFFNET_FUSION = (
    "blocks.2.project_conv",
    "blocks.4.project_conv",
    "blocks.10.project_conv",
    "conv_head",
)


def fusion_modules(spec: ModelSpec, net, card) -> tuple[list[str], list, str] | None:
    """(the fused layers' tensors, the torch modules whose outputs they are, the setting), or
    None where the harness has no such map (ResNet-50: not mapped)."""
    from cnnviz.methods.layercam_fusion import fusion_layers, stage_layers

    if spec.name == "efficientnet-lite0":  # the BN after each project conv (folded in ONNX)
        modules = [net._blocks[int(n.split(".")[1])]._bn2 for n in EFFNET_FUSION[:-1]]
        tensors = fusion_layers(card, ",".join(EFFNET_FUSION), FUSION_LAYERS)
        return tensors, [*modules, net.head_act], "layers " + ", ".join(EFFNET_FUSION)
    if spec.name == "vgg16":  # auto: features.N, the ReLU ending each stage
        rows = stage_layers(card, FUSION_LAYERS)
        names = [row["name"] for row in rows]
        if not all(n.startswith("features.") for n in names):
            return None
        modules = [net.features[int(n.split(".")[1])] for n in names]
        return [row["tensor"] for row in rows], modules, "layers auto"
    return None


def run_cell(
    spec: ModelSpec, model, card, nets, batch: int, cell: Cell, only: set[str] | None = None
) -> CellResult:
    """Time one model and batch. Each pair's builder makes its runners (outside the timings);
    all pairs then run as one interleaved run, or with `cell.split` one interleaved run per
    pair whose sessions are freed before the next pair's are built (memory). `only`: the
    methods to run (the forward always runs: the floor ratios need it)."""
    import torch
    from captum.attr import (
        Deconvolution,
        GuidedBackprop,
        IntegratedGradients,
        Occlusion,
        Saliency,
    )
    from cnnviz.methods import backprop as bp
    from cnnviz.methods import cam
    from cnnviz.methods import gradient_free as gf
    from cnnviz.methods.common import last_conv_layer
    from cnnviz.methods.explain import ig_points, score_channels
    from cnnviz.methods.occlusion import occlusion_graph, patch_counts, patch_origins
    from cnnviz.modelcard import find_layer
    from cnnviz.runner import chunk_plan
    from cnnviz.runtime import make_session
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    started = time.perf_counter()
    net, relu_net = nets
    x = photos(batch, card["preprocess"])
    xt = torch.from_numpy(x)
    in_name, out_name = card["input"]["name"], card["output"]["name"]
    probe_session = make_session(model, "cpu", THREADS)
    targets = [int(t) for t in probe_session.run([out_name], {in_name: x})[0].argmax(axis=1)]
    del probe_session
    layer = net.get_submodule(spec.cam_module)
    tg = [ClassifierOutputTarget(t) for t in targets]
    info: dict = {"targets": targets[:4], "scorecam_channels": last_conv_layer(card)["shape"][0]}
    feeds = {"images": x, "targets": np.asarray(targets, np.int64)}  # the pipeline's row feeds
    first = {name: value[:1] for name, value in feeds.items()}  # warm-up calls: one image
    built: dict[str, object] = {}  # the forward session, built on first use

    def session(key: str):
        if key not in built:
            built[key] = make_session(model, "cpu", THREADS)
        return built[key]

    Pair = tuple[dict[str, Callable[[], object]], dict[str, int], dict[str, int]]
    fast = (1, cell.peer_warmup)

    def pair(method: str, ours, peer, repeats: int, warmup: tuple[int, int]) -> Pair:
        names = (f"{method}/ours", f"{method}/peer")
        return (
            dict(zip(names, (ours, peer), strict=True)),
            dict.fromkeys(names, repeats),
            dict(zip(names, warmup, strict=True)),
        )

    def forward_pair() -> Pair:
        fwd = session("forward")

        def torch_forward():
            with torch.no_grad():
                return net(xt)

        return pair(
            "forward", lambda: fwd.run([out_name], {in_name: x}), torch_forward, cell.repeats, fast
        )

    cheap_new = cell.new_repeats or cell.repeats  # issue 17's cheap pairs

    def cam_pair(variant: str, cls, repeats: int | None = None) -> Callable[[], Pair]:
        def build() -> Pair:  # explain.cam_family with one member: images per call = batch
            graph = cam.cam_graph(model, card, None, batch, (variant,))
            info["cam_tensor"] = graph.metadata["layer"]
            runner = method_runner(graph)
            return pair(
                variant,
                lambda: runner.run(feeds),
                pgc_call(cls, net, layer, xt, tg),
                repeats or cell.repeats,
                fast,
            )

        return build

    def gradient_pair(method: str, policy: str, peer_cls, peer_net) -> Callable[[], Pair]:
        def build() -> Pair:  # explain._gradient_method: images per call = batch
            runner = method_runner(bp.gradient_graph(model, policy, batch))
            peer = peer_cls(peer_net)
            return pair(
                method,
                lambda: runner.run(feeds),
                lambda: peer.attribute(xt.clone().requires_grad_(), target=targets),
                cell.repeats,
                fast,
            )

        return build

    def ig_pair() -> Pair:  # explain._integrated_gradients, IG_CHUNK rows per call
        steps, ig = cell.ig_steps, IntegratedGradients(net)
        chunk = None if batch * steps <= CAPTUM_IG_ALL else CAPTUM_IG_CHUNK
        alphas, weights = ig_points("gausslegendre", steps)
        images, points = chunk_plan(len(alphas), IG_CHUNK)
        images = min(images, batch)
        runner = method_runner(bp.integrated_gradients_graph(model, images, points))
        path = {"alphas": alphas, "weights": weights}
        fixed = {"baseline": bp.make_baseline("zero", x[0], card["preprocess"])[None]}
        runner.run(first, {k: v[:points] for k, v in path.items()}, fixed)  # warm, untimed
        info["ig"] = {
            "steps": steps,
            "captum_internal_batch_size": chunk,
            "images_points_per_call": (images, points),
        }

        def ours():
            return runner.run(feeds, path, fixed)

        def captum():
            return ig.attribute(
                xt, target=targets, n_steps=steps, method="gausslegendre", internal_batch_size=chunk
            )

        return pair("ig", ours, captum, cell.ig_repeats, (0, 0))

    def occlusion_pair() -> Pair:  # explain._occlusion, OCCLUSION_BATCH rows per call
        window, stride = cell.occlusion
        occluder = Occlusion(torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval())
        per_eval = max(1, OCCLUSION_BATCH // batch)
        size = tuple(x.shape[-2:])
        origins = patch_origins(size, window, stride)
        images, points = chunk_plan(len(origins), OCCLUSION_BATCH)
        images = min(images, batch)
        runner = method_runner(occlusion_graph(model, card, images, points, window))
        runner.run(first, {"origins": origins[:points]})  # warm, untimed
        count = np.maximum(patch_counts(size, window, stride), 1)
        calls = -(-len(origins) // points)  # point chunks per image; the last one padded
        info["occlusion"] = {
            "window": window,
            "stride": stride,
            "patches": len(origins),
            "images_points_per_call": (images, points),
            "forwards_per_image": calls * (points + 1),
        }

        def ours():
            return (runner.run(feeds, {"origins": origins})["total"] / count).astype(np.float32)

        def captum():
            return occluder.attribute(
                xt,
                sliding_window_shapes=(3, window, window),
                strides=(3, stride, stride),
                baselines=0,
                target=targets,
                perturbations_per_eval=per_eval,
            )

        return pair("occlusion", ours, captum, cell.occlusion_repeats, (0, 0))

    def scorecam_pair() -> Pair:  # explain._scorecam on the first image, SCORE_BATCH masks a call
        graphs = cam.scorecam_graphs(model, card, None, 1, SCORE_BATCH)
        acts_runner, scorer, finisher = (method_runner(g) for g in graphs[:3])
        counts: dict = {}
        info["scorecam_counts"] = counts
        x1, t1 = first["images"], int(first["targets"][0])

        def ours():
            acts = acts_runner.run({"images": x1})["acts"]
            weights, found = score_channels(scorer, x1, t1, acts[0])
            counts.update(found)
            return finisher.run({"acts": acts, "weights": weights[None]})["map"]

        # warm, untimed: one call of each graph
        acts = acts_runner.run({"images": x1})["acts"]
        scorer.run(first, {"lowres": acts[0][:SCORE_BATCH]})
        finisher.run({"acts": acts, "weights": np.ones(acts.shape[:2], np.float32)})

        # the probe behind the estimate: one torch forward of SCORE_BATCH masked-size inputs
        probe = (xt[:1] * 0.5).expand(SCORE_BATCH, -1, -1, -1).contiguous()

        def torch_probe():
            with torch.no_grad():
                net(probe)

        fns = {"scorecam/ours": ours, "scorecam/probe": torch_probe}
        if cell.scorecam == "measure":
            fns["scorecam/peer"] = pgc_call(ScoreCAM, net, layer, xt[:1], tg[:1], SCORE_BATCH)
        return fns, dict.fromkeys(fns, 1), dict.fromkeys(fns, 0)

    def filters_pair() -> Pair:
        row = find_layer(card, spec.filter_layer)
        chans, steps = list(range(batch)), cell.filter_steps
        hook = net.get_submodule(spec.filter_module)
        info["filters"] = {"layer": spec.filter_layer, "shape": row["shape"], "steps": steps}

        def ours():  # seconds per filter-step, setup excluded
            rate, setup = bench_filters.ort_filter_rate(model, row["tensor"], chans, steps, batch)
            info["filters"]["setup_s"] = setup
            return OwnTime(1.0 / rate)

        def torch_loop():
            step = bench_filters.torch_lucent(
                net, spec.filter_layer, chans, steps, hook=hook, clamp=spec.filter_clamp
            )
            return OwnTime(step / len(chans))

        return pair("filters", ours, torch_loop, cell.filter_rounds, (0, 0))

    # ---- issue 17's methods ----------------------------------------------------------------
    def eigencam_pair() -> Pair:  # gradient_free.run_eigencam: images per call = batch
        from pytorch_grad_cam import EigenCAM

        runner = method_runner(gf.eigencam_graph(model, card, None, batch))
        images = {"images": x}
        return pair(
            "eigencam",
            lambda: runner.run(images),
            pgc_call(EigenCAM, net, layer, xt, tg),
            cheap_new,
            fast,
        )

    def ablation_pair() -> Pair:  # gradient_free.run_ablationcam, ABLATION_BATCH channels a run
        from pytorch_grad_cam import AblationCAM

        graphs = gf.ablation_graphs(model, card, None, batch, ABLATION_BATCH)
        acts_runner, scorer, finisher = (method_runner(g) for g in graphs[:3])
        counts: dict = {}
        info["ablationcam"] = counts

        def ours():
            acts = acts_runner.run({"images": x})["acts"]
            weights = []
            for i, t in enumerate(targets):
                channels = gf.ablation_plan(acts[i])
                counts.update(channels=int(acts.shape[1]), ablated=len(channels))
                w, _ = gf.ablation_weights(scorer, x[i : i + 1], acts[i : i + 1], t, channels)
                weights.append(w)
            return finisher.run({"acts": acts, "weights": np.stack(weights)})["map"]

        fns, reps, warm = pair("ablationcam", ours, None, cell.heavy_repeats, (1, 0))
        if cell.ablation == "measure":
            fns["ablationcam/peer"] = pgc_call(AblationCAM, net, layer, xt, tg, ABLATION_BATCH)
        else:  # one torch forward of ABLATION_BATCH inputs: the peer's unit of work
            del fns["ablationcam/peer"], reps["ablationcam/peer"], warm["ablationcam/peer"]
            probe = xt[:1].expand(ABLATION_BATCH, -1, -1, -1).contiguous()

            def torch_probe():
                with torch.no_grad():
                    net(probe)

            fns["ablationcam/probe"], reps["ablationcam/probe"] = torch_probe, cell.heavy_repeats
            warm["ablationcam/probe"] = 0
        return fns, reps, warm

    def fullgrad_pair() -> Pair:  # fullgrad.run_fullgrad (normalization: channel, the default)
        from cnnviz.methods.fullgrad import fullgrad_graph
        from pytorch_grad_cam import FullGrad

        graph = fullgrad_graph(model, batch, "channel")
        info["fullgrad"] = {"bias_layers": int(graph.metadata["layers"])}
        runner = method_runner(graph)
        peer = pgc_call(FullGrad, net, [], xt, tg)
        return pair("fullgrad", lambda: runner.run(feeds), peer, cell.heavy_repeats, (1, 0))

    def fusion_pair() -> Pair:  # layercam_fusion.run_layercam_fusion, layers auto, mean
        from cnnviz.methods.layercam_fusion import layercam_fusion_graph
        from pytorch_grad_cam import LayerCAM

        tensors, modules, setting = fusion
        info["layercam_fusion"] = {"setting": setting}
        runner = method_runner(layercam_fusion_graph(model, tensors, batch, "mean"))
        peer = pgc_call(LayerCAM, net, modules, xt, tg)
        return pair("layercam_fusion", lambda: runner.run(feeds), peer, cheap_new, fast)

    def ixg_pair() -> Pair:  # attribution.run_input_x_gradient
        from captum.attr import InputXGradient
        from cnnviz.methods.attribution import input_x_gradient_graph

        runner = method_runner(input_x_gradient_graph(model, batch))
        peer = InputXGradient(net)
        return pair(
            "input_x_gradient",
            lambda: runner.run(feeds),
            lambda: peer.attribute(xt.clone().requires_grad_(), target=targets),
            cheap_new,
            fast,
        )

    def deeplift_pair() -> Pair:  # attribution.run_deeplift, baseline zero (the default)
        from captum.attr import DeepLift
        from captum.attr._core import deep_lift
        from cnnviz.methods.attribution import deeplift_graph

        baseline = bp.make_baseline("zero", x[0], card["preprocess"])[None]
        runner = method_runner(deeplift_graph(model, batch))
        runner.run(first, None, {"baseline": baseline})  # warm, untimed
        lifted = benchlib.torch_oracle().one_module_per_call(net, xt)  # once, untimed
        x0 = torch.from_numpy(np.ascontiguousarray(baseline))

        def captum():  # ReLU6 given the rescale rule captum gives nn.ReLU (test_deeplift_peers)
            rules = deep_lift.SUPPORTED_NON_LINEAR
            added = torch.nn.ReLU6 not in rules
            rules[torch.nn.ReLU6] = deep_lift.nonlinear
            try:
                return DeepLift(lifted).attribute(xt, baselines=x0, target=targets)
            finally:
                if added:
                    del rules[torch.nn.ReLU6]

        return pair(
            "deeplift",
            lambda: runner.run(feeds, None, {"baseline": baseline}),
            captum,
            cheap_new,
            (0, cell.peer_warmup),
        )

    def lrp_pair(key: str, composite: str) -> Callable[[], Pair]:
        def build() -> Pair:  # lrp.run_lrp with the registry's epsilon / gamma defaults
            from cnnviz.methods.lrp import lrp_graph, pixel_bounds, settings_of
            from cnnviz.registry import defaults
            from zennit.attribution import Gradient
            from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

            options = {**defaults("lrp"), "composite": composite}
            settings = settings_of(options, card, model, tuple(x.shape[1:]))
            runner = method_runner(lrp_graph(model, batch, composite, settings))
            low, high = pixel_bounds(card["preprocess"])
            bounds = [torch.from_numpy(np.broadcast_to(v, x.shape).copy()) for v in (low, high)]
            seed = torch.eye(int(card["output"]["num_classes"]))[targets]

            def zennit():  # the composite registered per call, as its Attributor does
                canonizers = lrp_canonizers()
                if composite == "epsilon_plus_flat":
                    comp = EpsilonPlusFlat(canonizers=canonizers)
                else:
                    comp = EpsilonGammaBox(low=bounds[0], high=bounds[1], canonizers=canonizers)
                with Gradient(net, comp) as attributor:
                    return attributor(xt, lambda out: seed * out)[1]

            return pair(key, lambda: runner.run(feeds), zennit, cheap_new, fast)

        return build

    def lrp_canonizers() -> list:
        if spec.name == "efficientnet-lite0":
            return benchlib.torch_oracle().zennit_effnet_canonizers(net)
        if spec.name == "resnet50":
            from zennit.torchvision import ResNetCanonizer

            return [ResNetCanonizer()]
        return []  # VGG16: no BatchNorm

    def rise_pair() -> Pair:  # gradient_free.run_rise, RISE_BATCH masked images a call
        import torch.nn.functional as F  # noqa: N812

        count, grid, p = cell.rise_masks, 7, 0.5
        grids, shifts = gf.rise_masks(count, grid, p, 0, x.shape[-2:])
        images, points = chunk_plan(count, RISE_BATCH)
        images = min(images, batch)
        runner = method_runner(gf.rise_graph(model, card, images, points, grid))
        masks_in = {"grids": grids, "shifts": shifts}
        runner.run(first, {k: v[:points] for k, v in masks_in.items()})  # warm, untimed
        info["rise"] = {"masks": count, "grid": grid, "p": p, "rows_per_call": images * points}

        def ours():
            out = runner.run(feeds, masks_in)
            return np.stack(
                [
                    gf.rise_finish(t, c, "paper", count, p)
                    for t, c in zip(out["map"], out["coverage"], strict=True)
                ]
            )

        # the paper's code: masks generated once (its generate_masks, saved and loaded), then per
        # image the masked copies scored `gpu_batch` at a time, sal = P^T M / N / p1
        height, width = x.shape[-2:]
        cells = gf.rise_cells((height, width), grid)
        up = [gf.rise_upsampling((grid + 1) * c, grid) for c in cells]
        masks = np.stack(
            [
                up[0][dy : dy + height] @ g @ up[1][dx : dx + width].T
                for g, (dy, dx) in zip(grids, shifts, strict=True)
            ]
        )
        mt = torch.from_numpy(masks.astype(np.float32))[:, None]  # [N, 1, H, W]

        def paper():
            out = []
            with torch.no_grad():
                for i, t in enumerate(targets):
                    scores = [
                        F.softmax(net(xt[i : i + 1] * mt[j : j + RISE_BATCH]), dim=1)[:, t]
                        for j in range(0, count, RISE_BATCH)
                    ]
                    sal = torch.cat(scores) @ mt.view(count, -1)
                    out.append((sal / count / p).view(height, width))
            return torch.stack(out)

        return pair("rise", ours, paper, cell.heavy_repeats, (0, 0))

    named: list[tuple[str, Callable[[], Pair]]] = [
        ("forward", forward_pair),
        ("gradcam", cam_pair("gradcam", GradCAM)),
    ]
    if cell.gradcampp:
        named.append(("gradcampp", cam_pair("gradcampp", GradCAMPlusPlus)))
    named += [
        ("saliency", gradient_pair("saliency", "gradient", Saliency, net)),
        ("guided", gradient_pair("guided", "guided", GuidedBackprop, relu_net)),
        ("deconvnet", gradient_pair("deconvnet", "deconvnet", Deconvolution, relu_net)),
    ]
    if cell.ig_steps:
        named.append(("ig", ig_pair))
    if cell.occlusion:
        named.append(("occlusion", occlusion_pair))
    if cell.scorecam != "skip":
        named.append(("scorecam", scorecam_pair))
    if cell.filter_steps:
        named.append(("filters", filters_pair))
    fusion = fusion_modules(spec, net, card) if cell.new else None
    if cell.new:
        from pytorch_grad_cam import HiResCAM, XGradCAM

        named += [
            ("hirescam", cam_pair("hirescam", HiResCAM, cheap_new)),
            ("xgradcam", cam_pair("xgradcam", XGradCAM, cheap_new)),
            ("eigencam", eigencam_pair),
            ("input_x_gradient", ixg_pair),
            ("deeplift", deeplift_pair),
            ("lrp_epf", lrp_pair("lrp_epf", "epsilon_plus_flat")),
            ("lrp_egb", lrp_pair("lrp_egb", "epsilon_gamma_box")),
        ]
        if fusion is not None:
            named.append(("layercam_fusion", fusion_pair))
        if cell.fullgrad:
            named.append(("fullgrad", fullgrad_pair))
        if cell.ablation != "skip":
            named.append(("ablationcam", ablation_pair))
        if cell.rise_masks:
            named.append(("rise", rise_pair))
    builders = [b for name, b in named if only is None or name == "forward" or name in only]

    def progress(name: str, seconds: float) -> None:
        if seconds > 5:
            print(f"    {spec.name} b{batch} {name}: {seconds:.1f} s", flush=True)

    groups = [[b] for b in builders] if cell.split else [builders]
    times: dict[str, list[float]] = {}
    results: dict[str, object] = {}
    setup = 0.0
    for group in groups:
        t0 = time.perf_counter()
        fns: dict[str, Callable[[], object]] = {}
        reps: dict[str, int] = {}
        warm: dict[str, int] = {}
        for build in group:
            f, r, w = build()
            fns.update(f)
            reps.update(r)
            warm.update(w)
        setup += time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times.update(
                benchlib.run_interleaved(fns, reps, warm, results=results, progress=progress)
            )
        if cell.split:  # drop every reference to this pair's runners before the next is built
            fns.clear()
            built.clear()
            f = r = w = None
            gc.collect()
    agreement = {}
    for method, (mine, theirs) in VIEWS.items():
        if f"{method}/ours" in results and f"{method}/peer" in results:
            try:
                agreement[method] = _pearson(
                    mine(results[f"{method}/ours"]), theirs(results[f"{method}/peer"])
                )
            except Exception as exc:  # noqa: BLE001 - a view mismatch must not lose the timings
                print(f"    agreement {method}: {exc}", flush=True)
    result = CellResult(spec.name, batch, cell, times, agreement, info)
    result.setup, result.wall = setup, time.perf_counter() - started
    return result  # sessions and closures go with this frame; the caller collects


# ------------------------------------------------------------------------------------ the report
@dataclass
class Stat:
    median: float  # seconds (filters: seconds per filter-step)
    low: float
    high: float
    n: int
    estimate: str = ""  # how it was estimated; "" when measured

    @classmethod
    def of(cls, values: list[float] | None) -> Stat | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, k: float, how: str) -> Stat:
        return Stat(self.median * k, self.low * k, self.high * k, self.n, how)


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f}" if ms < 1000 else f"{ms:,.0f}"


def fmt_time(s: Stat | None) -> str:
    if s is None:
        return "–"
    if s.estimate:
        return f"~{_ms(s.median)} (est.: {s.estimate})"
    spread = f" ({_ms(s.low)}–{_ms(s.high)})" if s.n > 1 else ""
    return f"{_ms(s.median)}{spread} ×{s.n}"


def fmt_rate(s: Stat | None) -> str:
    if s is None:
        return "–"
    if s.estimate:
        return f"~{1 / s.median:.2f}/s (est.: {s.estimate})"
    spread = f" ({1 / s.high:.2f}–{1 / s.low:.2f})" if s.n > 1 else ""
    return f"{1 / s.median:.2f}/s{spread} ×{s.n}"


@dataclass
class Row:
    ours: Stat | None
    peer: Stat | None
    setting: str = ""
    floor: float | None = None  # physical floor in ORT forwards of the same model and batch


def cell_stats(res: CellResult, by_key: dict[tuple[str, int], CellResult]) -> dict[str, Row]:
    """{method: Row}, with the estimates filled in from the model's batch-1 cell."""
    t, info, b = res.times, res.info, res.batch
    base = by_key.get((res.model, 1)) if b != 1 else None
    out: dict[str, Row] = {}
    floors = {"gradcam": 1.0, "gradcampp": 1.0, "saliency": 3.0, "guided": 3.0}
    floors["deconvnet"] = 3.0
    for method in ("forward", "gradcam", "gradcampp", "saliency", "guided", "deconvnet"):
        ours, peer = Stat.of(t.get(f"{method}/ours")), Stat.of(t.get(f"{method}/peer"))
        if ours is not None or peer is not None:
            out[method] = Row(ours, peer, "", floors.get(method))
    if "gradcampp" not in out and "gradcam" in out:
        how = "= Grad-CAM (same graph / same torch pass)"
        row = out["gradcam"]
        out["gradcampp"] = Row(row.ours.scaled(1, how), row.peer.scaled(1, how), "not run", 1.0)
    # IG / occlusion: measured, or batch x the batch-1 cell (same settings)
    for method in ("ig", "occlusion"):
        src = res if f"{method}/ours" in t else base
        if src is None or f"{method}/ours" not in src.times:
            continue
        ours, peer = Stat.of(src.times[f"{method}/ours"]), Stat.of(src.times[f"{method}/peer"])
        if method == "ig":
            steps = src.info["ig"]["steps"]
            setting, floor = f"{steps} steps", 3.0 * steps
        else:
            o = src.info["occlusion"]
            setting = f"{o['window']}/{o['stride']}, {o['patches']} patches"
            if o.get("forwards_per_image", o["patches"] + 1) != o["patches"] + 1:
                setting += f" (cnnviz: {o['forwards_per_image']} forwards an image)"
            floor = o["patches"] + 1.0
        if src is not res:
            how = f"{b} × batch 1"
            ours, peer = ours.scaled(b, how), peer.scaled(b, how)
        out[method] = Row(ours, peer, setting, floor)
    # Score-CAM: one image; the peer measured or ceil(C / 64) torch forwards at batch 64
    src = res if "scorecam/ours" in t else base
    if src is not None and "scorecam/ours" in src.times:
        ours = Stat.of(src.times["scorecam/ours"])
        peer = Stat.of(src.times.get("scorecam/peer"))
        channels = src.info["scorecam_channels"]
        runs = math.ceil(channels / SCORE_BATCH)
        probe = Stat.of(src.times["scorecam/probe"])
        estimate = probe.scaled(runs, f"{runs} torch forwards at batch {SCORE_BATCH}")
        counts = src.info.get("scorecam_counts", {})
        setting = f"{channels} channels; cnnviz ran {counts.get('forward_passes', '?')} passes"
        if peer is None:
            peer = estimate
        else:
            setting += f"; the estimate ({runs} probe forwards) gives {_ms(estimate.median)} ms"
        if src is not res:
            how = f"{b} × batch 1"
            ours = ours.scaled(b, how)
            peer = peer.scaled(b, how + (" of an estimate" if peer.estimate else ""))
        out["scorecam"] = Row(ours, peer, setting, channels + 1.0)
    if "filters/ours" in t:
        f = info["filters"]
        setting = f"{f['layer']} {f['shape']}, {f['steps']} steps, {b} filter(s) a batch"
        out["filters"] = Row(Stat.of(t["filters/ours"]), Stat.of(t["filters/peer"]), setting, 3.0)
    elif base is not None and "filters/ours" in base.times:
        how = "the batch-1 rate"
        out["filters"] = Row(
            Stat.of(base.times["filters/ours"]).scaled(1, how),
            Stat.of(base.times["filters/peer"]).scaled(1, how),
            "not run at this batch",
            3.0,
        )
    # issue 17's methods: measured, or batch x the batch-1 cell (the same settings)
    for method, floor in NEW.items():
        src = res if f"{method}/ours" in t else base
        if src is None or f"{method}/ours" not in src.times:
            continue
        ours, peer = Stat.of(src.times[f"{method}/ours"]), Stat.of(src.times.get(f"{method}/peer"))
        setting = ""
        if method == "rise":
            r = src.info["rise"]
            setting = f"{r['masks']} masks (grid {r['grid']}, p {r['p']}), {RISE_BATCH} a run"
            floor = float(r["masks"])
        elif method == "ablationcam":
            a = src.info["ablationcam"]
            setting = f"{a.get('channels', '?')} channels, cnnviz ablated {a.get('ablated', '?')}"
            if peer is None and "ablationcam/probe" in src.times:
                runs = math.ceil(int(a["channels"]) / ABLATION_BATCH)
                how = f"{runs} torch forwards at batch {ABLATION_BATCH}"
                peer = Stat.of(src.times["ablationcam/probe"]).scaled(runs, how)
        elif method == "fullgrad":
            setting = f"{src.info['fullgrad']['bias_layers']} bias layers"
        elif method == "layercam_fusion":
            setting = src.info["layercam_fusion"]["setting"] + ", mean"
        elif method == "deeplift":
            setting = "zero baseline"
        if src is not res:
            how = f"{b} × batch 1"
            ours = ours.scaled(b, how)
            peer = peer.scaled(b, how) if peer is not None else None
        out[method] = Row(ours, peer, setting, floor)
    return out


def ratio(method: str, ours: Stat, peer: Stat) -> float:
    """cnnviz / peer medians; activation maximization: cnnviz rate / torch rate."""
    if method == "filters":
        return peer.median / ours.median
    return ours.median / peer.median


def judge(method: str, row: Row | None, fwd: Row | None) -> tuple[str, str, str] | None:
    """(measured value as text, "met" / "missed by ...", " (est.)" or "") against TARGETS."""
    kind, bound, _ = TARGETS[method]
    if row is None or row.ours is None:
        return None
    ours, peer = row.ours, row.peer
    if kind == "forward":
        if fwd is None or fwd.ours is None:
            return None
        value = ours.median / fwd.ours.median
        shown, ok = f"{value:.2f}× one ORT forward", value <= bound
    elif peer is None:
        return None
    elif kind == "speedup":
        value = peer.median / ours.median
        shown, ok = f"{value:.1f}× faster", value >= bound
    elif kind == "rate":
        value = ratio(method, ours, peer)
        shown, ok = f"{value:.1f}× the torch loop", value >= bound
    else:
        value = ratio(method, ours, peer)
        shown = f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"
        shown, ok = f"{shown}× {PEER_SHORT.get(method, 'captum')}", value <= bound
    if ok:
        verdict = "met"
    elif kind in ("speedup", "rate"):
        verdict = f"**missed** by {(1 - value / bound) * 100:.0f}% ({value:.2g} < {bound:g})"
    else:
        verdict = f"**missed** by {(value / bound - 1) * 100:.0f}% ({value:.2g} > {bound:g})"
    est = " (est.)" if ours.estimate or (peer is not None and peer.estimate) else ""
    return shown, verdict, est


def report(results: list[CellResult], args, wall: float, load: tuple, partial: bool = False) -> str:
    from importlib.metadata import version

    import captum
    import onnx
    import onnxruntime
    import torch
    import torchvision

    by_key = {(r.model, r.batch): r for r in results}
    stats = {(r.model, r.batch): cell_stats(r, by_key) for r in results}

    lines = []
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem = next(
        (
            int(line.split()[1]) / 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0.0,
    )
    command = "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "") + " python "
    command += " ".join(
        shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]
    )
    lines += [
        "## cnnviz against its torch peers, one interleaved run (`benchmarks/bench_peers.py`)",
        "",
        (
            f"**PARTIAL** ({len(results)} cells so far; the run did not finish)\n\n"
            if partial
            else ""
        )
        + f"**Command:** `{command}` — wall time {wall / 60:.1f} min"
        + (" (`--quick`: tiny settings, indicative only)" if args.quick else ""),
        "",
        f"**Machine:** {os.cpu_count()} × {cpu}, {mem:.0f} GB, no GPU; load average "
        f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        f"**Versions:** Python {platform.python_version()}, onnxruntime {onnxruntime.__version__} "
        f"(CPUExecutionProvider), onnx {onnx.__version__}, numpy {np.__version__}, torch "
        f"{torch.__version__} (CPU), torchvision {torchvision.__version__}, pytorch-grad-cam "
        f"(`grad-cam`) {version('grad-cam')}, captum {captum.__version__}, zennit "
        f"{version('zennit')}. "
        f"**Date:** {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"**Threads:** {THREADS} each: `torch.set_num_threads({THREADS})` with "
        f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`; ONNX Runtime "
        f"`intra_op_num_threads={THREADS}`, `inter_op_num_threads=1`, "
        "`session.intra_op.allow_spinning=0`.",
        "",
        "Models from `cnnviz.export.export_model` (EfficientNet-Lite0 pretrained; vgg16 and "
        "resnet50 torchvision, `weights: random`), 224×224; inputs: scikit-image sample photos "
        "(chelsea, coffee, astronaut, …, mirrored after the 11th) preprocessed as the model card "
        "says, target = each image's top-1 class. cnnviz runs each method as `cnnviz explain` "
        "does: the method's whole ONNX graph through the one runner (`cnnviz.runner.Runner`), "
        "rows per call: the cell's batch (CAMs, saliency, guided, deconvnet), "
        f"{IG_CHUNK} (IG: one image, one path point), {OCCLUSION_BATCH} occluded copies plus "
        "the image itself (occlusion; `runner.chunk_plan`, the last call padded), "
        f"{SCORE_BATCH} masked inputs (Score-CAM); graphs and runners are built (and warmed by "
        "one untimed call) outside the timings. Times in ms: median (min–max) ×repeats of one "
        "interleaved run per model and batch (each repeat runs every contender once, rotating "
        "the order). Activation maximization in filter-steps/s (higher is better). **est.** "
        "marks estimates, not measurements (how: in the cell).",
        "",
        "Issue 17's methods the same way: HiResCAM / XGrad-CAM in the CAM graph, Eigen-CAM, "
        f"Ablation-CAM ({ABLATION_BATCH} ablated copies a run, both sides), FullGrad "
        "(normalization channel), fused LayerCAM (mean of 4 layers at 4 resolutions, the peer "
        "given the same layers as its target_layers: on EfficientNet-Lite0 those of "
        "tests/test_layercam_fusion.py, since `layers: auto` picks tensors of a ReLU6 module "
        "torch calls twice per block), Input × Gradient, DeepLIFT (zero baseline; captum's "
        "DeepLift on a copy with one module per call and ReLU6 given its rescale rule), LRP "
        "(zennit's composite and canonizers registered per call, as its Attributor does) and "
        f"RISE (grid 7, p 0.5, {RISE_BATCH} masked images a run; the peer is the paper's "
        "algorithm written in torch with the same masks precomputed, a reference, not a "
        "released tool: OpenVINO XAI and DIANNA, the ONNX-native tools that offer RISE, are "
        "not in this machine's package index; r compares the paper's estimator on both "
        "sides, the pipeline's default coverage estimator divides the same sums differently at "
        "no extra cost).",
        "",
    ]
    # --- targets
    if TARGET_CELL in stats:
        s = stats[TARGET_CELL]
        lines += [
            "### Targets (EfficientNet-Lite0, batch 1)",
            "",
            "| comparison | target | measured | |",
            "|---|---|---|---|",
        ]
        for method, (_kind, _bound, text) in TARGETS.items():
            row = s.get(method)
            verdict = judge(method, row, s.get("forward"))
            if verdict is None:
                lines.append(f"| {METHODS[method][0]} | {text} | not run | – |")
                continue
            shown, ok, est = verdict
            label = METHODS[method][0] + (f" ({row.setting})" if row.setting else "")
            lines.append(f"| {label} | {text} | {shown}{est} | {ok} |")
        lines.append("")
    # --- pairs
    lines += [
        "### Pairs: cnnviz (ONNX Runtime) against the torch peer",
        "",
        "Ratio: cnnviz median / peer median (activation maximization: cnnviz rate / torch rate). "
        "r: Pearson correlation of the two results on the first image (same computation, "
        "same inputs; logits for the forward). captum's GuidedBackprop / Deconvolution run on "
        "a copy of EfficientNet-Lite0 whose ReLU6 modules are an nn.ReLU subclass computing "
        "clamp(x, 0, 6) (unswapped they would return the plain gradient).",
        "",
        "| model | batch | method | setting | cnnviz | peer | peer ms | ratio | target | r |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key = (r.model, r.batch)
        for method, row in stats[key].items():
            ours, peer = row.ours, row.peer
            form = fmt_rate if method == "filters" else fmt_time
            rat = ""
            if ours is not None and peer is not None:
                value = ratio(method, ours, peer)
                rat = f"{value:.3g}" + (" est." if ours.estimate or peer.estimate else "")
                if method == "scorecam":
                    rat += f" ({1 / value:.1f}× faster)"
            target = ""
            if key == TARGET_CELL and method in TARGETS:
                verdict = judge(method, row, stats[key].get("forward"))
                if verdict is not None:
                    target = f"{TARGETS[method][2]}: {verdict[1]}"
                    if TARGETS[method][0] == "forward":
                        target += f" ({verdict[0]})"
            agree = r.agreement.get(method)
            agree_text = "" if agree is None or math.isnan(agree) else f"{agree:.4f}"
            lines.append(
                f"| {r.model} | {r.batch} | {METHODS[method][0]} | {row.setting} | "
                f"{form(ours)} | {METHODS[method][1]} | {form(peer)} | {rat} | {target} | "
                f"{agree_text} |"
            )
    lines.append("")
    # --- floors
    lines += [
        "### Floor ratios: each cnnviz method in ORT forwards of the same model and batch",
        "",
        "Floor ratio = method median / one ORT forward (same model, batch). Physical floor: "
        "Grad-CAM ~1 forward (the backward stops at the last conv layer); saliency, guided, "
        "deconvnet ~3 (forward + backward); IG steps × 3 (cnnviz adds the 2 end points for its "
        "completeness check); occlusion patches + 1 (the unoccluded image); Score-CAM one "
        "forward per channel (+1; cnnviz skips constant and duplicate maps, so it can go "
        "below); a filter step ~3 (on the model cut at the layer, so below 3 is possible).",
        "",
        "| model | batch | method | setting | cnnviz ms | ORT forward ms | floor ratio "
        "| physical floor | × floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key = (r.model, r.batch)
        fwd_row = stats[key].get("forward")
        fwd = fwd_row.ours if fwd_row else None
        for method, row in stats[key].items():
            ours = row.ours
            if method == "forward" or ours is None or fwd is None or row.floor is None:
                continue
            median = ours.median * (r.batch if method == "filters" else 1)
            ratio_f = median / fwd.median
            est = " est." if ours.estimate else ""
            shown = f"~{_ms(median)}" if ours.estimate else _ms(median)
            if method == "filters":
                shown += f" a step of {r.batch}"
            lines.append(
                f"| {r.model} | {r.batch} | {METHODS[method][0]} | {row.setting} | {shown} | "
                f"{_ms(fwd.median)} | {ratio_f:.3g}{est} | {row.floor:g} | "
                f"{ratio_f / row.floor:.2f}{est} |"
            )
    lines.append("")
    # --- plan
    lines += [
        "### The plan: what ran, what was reduced or estimated, and why",
        "",
        f"Reference settings: {FULL_SETTINGS}, activation maximization 8 steps × 3 rounds, "
        "cheap pairs ≥ 5 repeats. Cells cost (wall, including untimed setup) as listed.",
        "",
        "| model | batch | repeats (cheap / IG / occlusion / filters) | Score-CAM | reductions "
        "and reasons | setup s | cell wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.cell
        reps = (
            f"{c.repeats} / {c.ig_repeats if c.ig_steps else '–'} / "
            f"{c.occlusion_repeats if c.occlusion else '–'} / "
            f"{c.filter_rounds if c.filter_steps else '–'}"
        )
        score = {
            "measure": "both measured (1 run)",
            "estimate": "cnnviz measured, peer estimated",
            "skip": "estimated from batch 1" if r.batch != 1 else "not run",
        }[c.scorecam]
        lines.append(
            f"| {r.model} | {r.batch} | {reps} | {score} | {'; '.join(c.why)} | "
            f"{r.setup:.0f} | {r.wall:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown section here (default: print only)")
    parser.add_argument("--quick", action="store_true", help="tiny plan: a smoke check (~3 min)")
    parser.add_argument("--models", help="comma-separated subset of the plan's models")
    parser.add_argument("--batches", help="comma-separated subset of the plan's batches")
    parser.add_argument("--repeats", type=int, help="override the cheap pairs' repeats")
    parser.add_argument(
        "--methods", help="comma-separated subset of the pairs (METHODS keys; forward always runs)"
    )
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "cnnviz-bench"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    started, load = time.perf_counter(), os.getloadavg()
    plan = QUICK_PLAN if args.quick else PLAN
    models = args.models.split(",") if args.models else None
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    results: list[CellResult] = []
    for name in dict.fromkeys(m for m, _ in plan):
        if models and name not in models:
            continue
        spec = SPECS[name]
        model, card = bench_engine.exported(name, spec.source, spec.weights, Path(args.model_dir))
        nets = torch_nets(spec)
        for (m, batch), cell in plan.items():
            if m != name or (batches and batch not in batches):
                continue
            if args.repeats:
                cell = Cell(**{**cell.__dict__, "repeats": args.repeats})
            print(f"== {name} batch {batch} ({time.perf_counter() - started:.0f} s)", flush=True)
            only = set(args.methods.split(",")) if args.methods else None
            res = run_cell(spec, model, card, nets, batch, cell, only)
            gc.collect()
            results.append(res)
            rows = cell_stats(res, {(r.model, r.batch): r for r in results})
            for method, row in rows.items():
                form = fmt_rate if method == "filters" else fmt_time
                print(f"   {method:10s} {form(row.ours):>36s} | {form(row.peer):>36s}", flush=True)
            print(f"   cell {res.wall:.0f} s (setup {res.setup:.0f} s)", flush=True)
            if args.out:  # a partial report after every cell: a late crash keeps the rest
                elapsed = time.perf_counter() - started
                partial = report(results, args, elapsed, load, partial=True)
                Path(args.out).write_text(partial)
        del model, nets
        gc.collect()
    text = report(results, args, time.perf_counter() - started, load)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
