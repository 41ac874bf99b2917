"""Class models (Simonyan, Vedaldi & Zisserman 2014): what each class looks like to the model.

For each chosen class k, pictures that maximize the class's logit (the score before softmax,
as the paper does: maximizing the probability can also be done by lowering the other classes),
with lucent's recipe (decorrelated Fourier picture, random transforms, Adam) by default, or the
seed's plain ascent. Several pictures per class with a diversity term (`objectives.diversity`,
Gram matrices at one layer) show several things the class responds to instead of one.

The classes: the run's most frequent top-1 predictions (`top`), then any named in the config
(labels or indices). One graph (`objective_job.ObjectiveJob`, objective
class_logit(k) [+ w * diversity(layer)]) serves every class: only the class table changes.

Files in `out_dir`: class_models.png (one row per class, its pictures side by side),
class_models.npy [classes, pictures, H, W, 3] in [0, 1], class_models.json (per class: index,
label, why chosen, logit curves per picture, start and final logits and probabilities),
class_models.curve.png (the logit per step).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from . import objectives as ob

STEM = "class_models"


def top_predicted(prediction_files: Sequence[Path], n: int) -> list[tuple[int, int]]:
    """[(class index, images with it as top-1)] for the n most frequent top-1 classes of the
    run (ties: the lower index first)."""
    from ..artifacts import read_json

    counts: collections.Counter = collections.Counter()
    for path in prediction_files:
        data = read_json(Path(path))
        for row in (data or {}).get("images", []) if isinstance(data, dict) else []:
            if row.get("top"):
                counts[int(row["top"][0]["index"])] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def class_index(name: str | int, labels: Sequence[str], classes: int) -> int:
    """A class named by its index or its label (exact, then case-insensitive)."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        k = int(name)
        if not 0 <= k < classes:
            raise ConfigError(f"class_models.classes: class {k} is not in 0..{classes - 1}")
        return k
    for fold in (False, True):
        for i, label in enumerate(labels):
            if (label.lower() == str(name).lower()) if fold else label == name:
                return i
    raise ConfigError(f"class_models.classes: no class is labelled {name!r}; name it by its "
                      "label as model.json lists it, or by its index")


def diversity_layer(card: dict[str, Any], layer: str) -> str:
    """The layer the diversity term compares the pictures at: auto = a middle stage."""
    from ..modelcard import find_layer
    from .filters import default_layers

    if layer != "auto":
        return find_layer(card, layer)["tensor"]
    names = default_layers(card, 3)
    if not names:
        raise ConfigError("class_models: the model has no conv layer for the diversity term; "
                          "set class_models.pictures to 1")
    return find_layer(card, names[len(names) // 2])["tensor"]


def class_models(model_dir: Path, predictions: Sequence[Path], out_dir: Path, *, top: int,
                 classes: Sequence[str | int], pictures: int, diversity: float,
                 layer: str, mode: str, steps: int, seed: int, param_size: int,
                 device: str = "auto", threads: int | None = None) -> dict:
    """Optimize `pictures` pictures per chosen class and write the files (module doc)."""
    from ..artifacts import write_json, write_npy
    from ..modelcard import load_card, model_path
    from ..render import save_png
    from .filters import LUCENT_LR, SEED_STEP, filter_rng, image_grid
    from .objective_job import ObjectiveJob
    from .optvis import Normalization, deprocess

    started = time.perf_counter()
    card = load_card(model_dir)
    model = onnx.load(str(model_path(model_dir, card)))
    labels = list(card.get("labels") or [])
    n_classes = int((card.get("output") or {}).get("num_classes") or len(labels))
    chosen: dict[int, str] = {}
    for k, count in top_predicted(predictions, top):
        chosen[k] = f"top-1 for {count} image{'s' if count != 1 else ''} of the run"
    for name in classes:
        k = class_index(name, labels, n_classes)
        chosen.setdefault(k, "named in the config")
    if not chosen:
        raise ConfigError("class_models: no class to show (no predictions and none named)")
    if pictures < 1 or steps < 1:
        raise ConfigError("class_models: pictures and steps must be at least 1")
    template = ob.class_logit(0)
    div_tensor = None
    if pictures > 1 and diversity != 0:
        div_tensor = diversity_layer(card, layer)
        template = template + diversity * ob.diversity(div_tensor)

    def objective(k: int) -> ob.Objective:
        return ob.Objective(tuple((w, t) if t.kind != "class_logit"
                                  else (w, ob.Term("class_logit", ob.LOGITS, cls=k))
                                  for w, t in template.terms))

    lr = LUCENT_LR if mode == "lucent" else SEED_STEP
    norm = Normalization.from_preprocess(card.get("preprocess") or {})
    job = ObjectiveJob(model, [objective(0)] * pictures, pictures, mode=mode, steps=steps,
                       lr=lr, norm=norm, param_size=param_size, device=device, threads=threads)
    rows, images, raws = [], [], []
    for row, (k, why) in enumerate(chosen.items()):
        objs = [objective(k)] * pictures
        rngs = [filter_rng(seed, row * pictures + i) for i in range(pictures)]
        imgs, curves, tcurves, start, final, fterms = job.run_objectives(objs, rngs, steps)
        raws.append(imgs)
        images.append(deprocess(imgs) if mode == "seed" else imgs)
        rows.append({
            "index": k, "label": labels[k] if k < len(labels) else f"class {k}", "why": why,
            "logit_curves": np.round(tcurves[:, 0], 5).tolist(),
            "final_logit": np.round(fterms[:, 0], 5).tolist(),
            "objective_curves": np.round(curves, 5).tolist(),
            "final_objective": np.round(final, 5).tolist(),
        })  # fmt: skip
    stack = np.stack(images).astype(np.float32)  # [classes, pictures, H, W, 3]
    probs = _probabilities(model, np.stack(raws), norm, device, threads)
    for row, p in zip(rows, probs, strict=True):
        row["final_probability"] = np.round(p[:, row["index"]].astype(np.float64), 5).tolist()
        row["final_top1"] = [int(i) for i in p.argmax(1)]
    out_dir = Path(out_dir)
    paths = {ext: str(out_dir / f"{STEM}.{ext}") for ext in ("png", "npy", "json")}
    paths["curve"] = str(out_dir / f"{STEM}.curve.png")
    write_npy(paths["npy"], stack)
    save_png(paths["png"], _rows_grid(stack, image_grid))
    _save_curves(paths["curve"], rows, f"{card.get('name')}: class logits")
    summary = {
        "model": card.get("name"), "mode": mode, "steps": steps, "seed": seed, "lr": lr,
        "pictures": pictures, "diversity": diversity if div_tensor else 0.0,
        "diversity_tensor": div_tensor,
        "objective": "class_logit(k)" + template.text()[len("class_logit(0)"):],
        "image_shape": list(stack.shape[2:]), "classes": rows, "providers": job.providers,
        "seconds": round(time.perf_counter() - started, 3), "files": paths,
        "note": "logit_curves[p][t]: picture p's logit of the class on the input of step t "
                "(lucent: the randomly transformed picture); final_*: on the picture itself",
    }  # fmt: skip
    write_json(paths["json"], summary)
    return summary


def _probabilities(model, stack, norm, device, threads) -> np.ndarray:
    """[classes, pictures, K] softmax of the logits on the final pictures (the optimized ones,
    before seed mode's deprocess; resized to the model's input as the evaluation does)."""
    from ..graph import cut_at, input_name
    from ..runtime import make_session
    from .objective_job import logits_tensor
    from .optvis import resize

    logits = logits_tensor(model)
    session = make_session(cut_at(model, [logits]), device, threads)
    shape = session.get_inputs()[0].shape
    hw = (int(shape[2]), int(shape[3]))
    c, p = stack.shape[:2]
    x = stack.reshape(c * p, *stack.shape[2:]).transpose(0, 3, 1, 2)
    x = resize(x, hw) if x.shape[2:] != hw else x
    out = session.run([logits], {input_name(model): norm(x.astype(np.float32))})[0]
    z = out - out.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).reshape(c, p, -1)


def _rows_grid(stack: np.ndarray, grid, sep: int = 2) -> np.ndarray:
    """One row per class, its pictures side by side (tiles as `filters.image_grid` makes)."""
    rows = []
    for pictures in stack:
        tiles = [grid(p[None]) for p in pictures]
        gap = np.full((tiles[0].shape[0], sep, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
    gap = np.full((sep, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)


def _save_curves(path: str, rows: list[dict], title: str) -> None:
    from matplotlib.figure import Figure

    from ..render import save_figure

    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, row in enumerate(rows):
        colour = f"C{i % 10}"
        for j, curve in enumerate(row["logit_curves"]):
            ax.plot(curve, color=colour, linewidth=1.2,
                    label=f"{row['label']} ({row['index']})" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("class logit")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(path, fig)
