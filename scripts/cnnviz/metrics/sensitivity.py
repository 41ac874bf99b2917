"""Class sensitivity: does a method's map change with the class it explains?

For each explained map (class t), the same method explains another class of the same image and
the two maps are compared by Spearman rank correlation. "second": the most probable class other
than t (often a near neighbour: some likeness is expected); "last": the least probable class (a
far class: a map that explains the class should differ); or a fixed class index. A method whose
maps correlate strongly even for the far class shows the image, not the class (as Nie et al.
2018 found for guided backprop).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import ConfigError
from .similarity import spearman

KINDS = ("second", "last")


def other_class(probs: np.ndarray, target: int, kind: str | int) -> int:
    """The class to compare with for one image (see the module notes)."""
    order = [int(c) for c in np.argsort(-np.asarray(probs), kind="stable") if c != target]
    if kind == "second":
        return order[0]
    if kind == "last":
        return order[-1]
    if isinstance(kind, int) and not isinstance(kind, bool) and 0 <= kind < len(probs):
        return kind
    raise ConfigError(
        f"metrics class_sensitivity class {kind!r}: use second, last or a class index "
        f"0..{len(probs) - 1}"
    )


def class_sensitivity(
    job: Any,
    method: str,
    originals: np.ndarray,
    probs: np.ndarray,
    kinds: list[str | int],
) -> tuple[list[dict[str, dict]], float]:
    """Per row {kind: {"class", "label", "spearman"}} and the seconds spent.

    `originals` [N, H, W] are the maps of job.rows; `probs` [images, K] the class probabilities.
    """
    from .run import compute_maps, job_for

    labels = job.card.get("labels") or []
    started = time.perf_counter()
    per_row: list[dict[str, dict]] = [{} for _ in job.rows]
    for kind in kinds:
        rows = [(i, other_class(probs[i], t, kind)) for i, t in job.rows]
        maps = compute_maps(job_for(job, rows=rows), method)
        for r, ((_, c), before, after) in enumerate(zip(rows, originals, maps, strict=True)):
            rho = spearman(before, after)
            per_row[r][str(kind)] = {
                "class": c,
                "label": labels[c] if c < len(labels) else str(c),
                "spearman": None if np.isnan(rho) else rho,
            }
    return per_row, time.perf_counter() - started
