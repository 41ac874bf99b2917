"""Class predictions: batched forward passes, softmax where the model gives logits, top-k."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..artifacts import write_json
from ..images import failure_recorder, read_manifest, shard_batches
from ..modelcard import load_card, model_path
from ..runtime import make_session, run_batched


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def predict(
    session: ort.InferenceSession,
    card: dict[str, Any],
    images: Sequence[np.ndarray],
    batch_size: int = 16,
) -> np.ndarray:
    """Class probabilities [N, classes] for preprocessed images (each float32 [3, H, W])."""
    batch = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    (out,) = run_batched(
        session, {card["input"]["name"]: batch}, [card["output"]["name"]], batch_size
    )
    out = out.reshape(len(batch), -1).astype(np.float64)
    kind = card["output"].get("kind", "logits")
    if kind == "logits":
        out = softmax(out)
    elif kind == "sigmoid_logits":  # a multi-label model's final Sigmoid, removed at export
        out = 1.0 / (1.0 + np.exp(-out))
    return out.astype(np.float32)


def top_k(probs: np.ndarray, labels: Sequence[str] | None, k: int = 5) -> list[Any]:
    """[{"index", "label", "prob"}] best first for probs [C]; a list of such lists for [N, C].

    Ties keep the lower class index first, so results are deterministic.
    """
    probs = np.asarray(probs)
    if probs.ndim == 2:
        return [top_k(row, labels, k) for row in probs]
    labels = labels or []
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {
            "index": int(i),
            "label": str(labels[i]) if i < len(labels) else f"class {int(i)}",
            "prob": float(probs[i]),
        }
        for i in order
    ]


_rank = top_k  # predict_shard's parameter `top_k` (the CLI's name for k) shadows the function


def predict_shard(
    model_dir: str | Path,
    manifest: str | Path,
    out_json: str | Path,
    device: str = "auto",
    batch_size: int = 16,
    top_k: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Top-k predictions for every staged image of one shard, written to `out_json`.

    Images that failed staging are carried into "failed" so the report can list them; one that
    fails to load here is added there too and the others go on.
    """
    card = load_card(model_dir)
    session = make_session(model_path(model_dir, card), device, threads)
    shard = read_manifest(manifest)
    failed = list(shard["failed"])
    results: list[dict[str, Any]] = []
    record = failure_recorder(failed)
    for ids, inputs in shard_batches(shard["images"], card["preprocess"], batch_size, record):
        probs = predict(session, card, list(inputs), batch_size)
        for image_name, row in zip(ids, _rank(probs, card.get("labels"), top_k), strict=True):
            results.append({"id": image_name, "top": row})
    data = {"model": card.get("name", Path(model_dir).name), "images": results, "failed": failed}
    write_json(out_json, data)
    return data
