"""Class activation maps and occlusion: cnnviz (ONNX Runtime) against pytorch-grad-cam and captum.

Same process, interleaved (each repeat runs every contender once, in turn), 2 threads on both
sides (torch.set_num_threads(2); ORT intra_op 2, inter_op 1, allow_spinning 0), EfficientNet-Lite0
pretrained, batch 1, 224x224, the chelsea photo, target = its top-1 class, layer = the head ReLU6
(1280x7x7). cnnviz runs each method as `cnnviz explain` does: its whole ONNX graph
(`cam.cam_graph`, `occlusion.occlusion_graph`, `cam.scorecam_graphs`) fed by the one runner
(cnnviz.runner.Runner); graphs, runners and pytorch-grad-cam objects are built once, outside the
timings.
pytorch-grad-cam hooks a torch copy whose head has its own ReLU6 module (the stock class reuses
one module for stem and head, and a hook on it would see the stem first). Score-CAM: 1 repeat
each (pytorch-grad-cam's takes a minute or more), batch 64 on both sides. Occlusion: window 32,
stride 16 (13 x 13 = 169 patches), zero baseline, 32 rows a run on both sides (captum's
perturbations_per_eval; cnnviz: the rows given to `runner.chunk_plan`, the graph adds the
unoccluded image, the last call is padded), on softmax probabilities.

    python benchmarks/bench_cam.py [--model-dir DIR] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import benchlib
import numpy as np
import onnx

# (what, contender, reference, target ratio, "<=" or ">=" on reference / contender)
ROWS = [
    ("Grad-CAM vs ORT forward", "gradcam (cnnviz)", "ORT forward", 1.2),
    ("Grad-CAM", "gradcam (cnnviz)", "GradCAM (pytorch-grad-cam)", None),
    ("Grad-CAM++", "gradcampp (cnnviz)", "GradCAMPlusPlus (pytorch-grad-cam)", None),
    ("Score-CAM", "scorecam (cnnviz)", "ScoreCAM (pytorch-grad-cam)", 1 / 7),
    ("Score-CAM, no dedupe", "scorecam, no dedupe (cnnviz)", "ScoreCAM (pytorch-grad-cam)", None),
    ("Occlusion 32/16", "occlusion (cnnviz)", "Occlusion (captum)", 0.3),
]


def effnet(model_dir: Path | None) -> tuple[onnx.ModelProto, dict]:
    from cnnviz.modelcard import load_card

    if model_dir is None:
        from cnnviz.export import export_model

        model_dir = Path(tempfile.mkdtemp(prefix="bench-cam-"))
        export_model("efficientnet-lite0", "efficientnet-lite0", model_dir)
    card = load_card(model_dir)
    return onnx.load(str(Path(model_dir) / card["onnx"])), card


def effnet_torch():
    """The pretrained torch network with its own head ReLU6 (tests/torch_oracle.py)."""
    return benchlib.torch_oracle().pretrained_effnet(own_head_relu6=True)


LAST: dict[str, object] = {}  # each contender's last result, for the agreement column


def run_interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """The shared interleaved loop (benchlib), fixed order; last results go to LAST."""
    return benchlib.run_interleaved(contenders, repeats, warmup, rotate=False, results=LAST)


def as_map(result: object) -> np.ndarray | None:
    """[H, W] from any contender's result (dict of maps, torch tensor, array)."""
    if isinstance(result, dict):
        result = next(iter(result.values()))
    if hasattr(result, "detach"):
        result = result.detach().numpy()
    result = np.asarray(result)
    while result.ndim > 2:
        result = result[0]
    return result if result.ndim == 2 else None


def agreement(ours: str, ref: str) -> str:
    a, b = as_map(LAST.get(ours)), as_map(LAST.get(ref))
    if a is None or b is None or a.shape != b.shape:
        return ""
    return f"{np.corrcoef(a.ravel(), b.ravel())[0, 1]:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--score-batch", type=int, default=64)
    parser.add_argument("--occlusion-batch", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from captum.attr import Occlusion
    from cnnviz.images import preprocess
    from cnnviz.methods import cam
    from cnnviz.methods.explain import score_channels
    from cnnviz.methods.occlusion import occlusion_graph, patch_counts, patch_origins
    from cnnviz.runner import Runner, chunk_plan
    from cnnviz.runtime import make_session
    from PIL import Image
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from skimage import data

    torch.set_num_threads(2)
    model, card = effnet(args.model_dir)
    x = preprocess(Image.fromarray(data.chelsea()), card["preprocess"])[None]
    forward = make_session(model, "cpu", 2)
    target = int(forward.run(None, {"input": x})[0].argmax())
    feeds = {"images": x, "targets": np.array([target], np.int64)}
    cams = {
        v: Runner(cam.cam_graph(model, card, None, 1, (v,)), "cpu", 2)
        for v in ("gradcam", "gradcampp")
    }
    origins = patch_origins(x.shape[-2:], 32, 16)
    images, points = chunk_plan(len(origins), args.occlusion_batch)
    occluder_graph = Runner(occlusion_graph(model, card, images, points, 32), "cpu", 2)
    count = np.maximum(patch_counts(x.shape[-2:], 32, 16), 1)
    acts_graph, scores_graph, finish_graph, _ = cam.scorecam_graphs(
        model, card, None, 1, args.score_batch
    )
    acts_runner, scorer, finisher = (
        Runner(g, "cpu", 2) for g in (acts_graph, scores_graph, finish_graph)
    )
    net = effnet_torch()
    xt = torch.from_numpy(x)
    targets = [ClassifierOutputTarget(target)]
    peers = {
        name: cls(model=net, target_layers=[net.head_act])
        for name, cls in [
            ("gradcam", GradCAM),
            ("gradcampp", GradCAMPlusPlus),
            ("scorecam", ScoreCAM),
        ]
    }
    peers["scorecam"].batch_size = args.score_batch
    occluder = Occlusion(torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval())
    info: dict = {}

    def peer(name: str) -> Callable[[], object]:
        return lambda: peers[name](input_tensor=xt, targets=targets)

    def score_cam(dedupe: bool) -> np.ndarray:
        """explain._scorecam on one image; without dedupe every channel is scored."""
        acts = acts_runner.run({"images": x})["acts"]
        if dedupe:
            weights, counts = score_channels(scorer, x, target, acts[0])
            info.update(counts)
        else:
            scores = scorer.run(feeds, {"lowres": acts[0]})["scores"][0]
            weights = cam.score_weights(scores.astype(np.float64)).astype(np.float32)
        return finisher.run({"acts": acts, "weights": weights[None]})["map"]

    fast = {
        "ORT forward": lambda: forward.run(None, {"input": x}),
        "gradcam (cnnviz)": lambda: cams["gradcam"].run(feeds),
        "GradCAM (pytorch-grad-cam)": peer("gradcam"),
        "gradcampp (cnnviz)": lambda: cams["gradcampp"].run(feeds),
        "GradCAMPlusPlus (pytorch-grad-cam)": peer("gradcampp"),
        "occlusion (cnnviz)": lambda: (
            occluder_graph.run(feeds, {"origins": origins})["total"] / count
        ),
        "Occlusion (captum)": lambda: occluder.attribute(
            xt,
            sliding_window_shapes=(3, 32, 32),
            strides=(3, 16, 16),
            baselines=0,
            target=target,
            perturbations_per_eval=args.occlusion_batch,
        ),
    }
    times = run_interleaved(fast, args.repeats)
    score_cam(True)  # warm the Score-CAM runners, untimed
    slow = {
        "scorecam (cnnviz)": lambda: score_cam(True),
        "scorecam, no dedupe (cnnviz)": lambda: score_cam(False),
        "ScoreCAM (pytorch-grad-cam)": peer("scorecam"),
    }
    with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bars
        times.update(run_interleaved(slow, 1, warmup=0))

    print(
        f"EfficientNet-Lite0, batch 1, 224x224, 2 threads, {args.repeats} repeats "
        f"(Score-CAM: 1); torch {torch.__version__}"
    )
    print(
        f"Score-CAM: {info.get('channels')} channels, {info.get('constant')} constant, "
        f"{info.get('forward_passes')} forward passes with dedupe\n"
    )
    print("| contender | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        print(
            f"| {name} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f} | "
            f"{1e3 * max(values):.1f} |"
        )
    print("\n| comparison | ratio (contender / reference) | target | Pearson r of the maps |")
    print("|---|---:|---|---:|")
    failed = False
    for what, ours, ref, goal in ROWS:
        ratio = statistics.median(times[ours]) / statistics.median(times[ref])
        ok = goal is None or ratio <= goal
        failed |= not ok
        shown = "" if goal is None else f"<= {goal:.3g}" + ("" if ok else " MISSED")
        print(f"| {what}: {ours} / {ref} | {ratio:.3f} | {shown} | {agreement(ours, ref)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
