"""Max-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", 2019).

The input is perturbed `samples` times by seeded uniform noise in [-radius, radius] per value
(model input units, i.e. after normalization), the method's maps are recomputed for each
perturbed input (explain's `run_method`, as the randomization test recomputes them), and the
score of a map m is max over the samples of ||m(x + d) - m(x)|| / ||m(x)|| (Frobenius norms).
Lower is better: a small change of the input should not change the explanation much.

This is Quantus 0.6.0's MaxSensitivity with its defaults (uniform noise of bound `lower_bound`,
difference, Frobenius norms, divided by the norm of the original map; Yeh et al. leave the
denominator out, dividing makes methods with differently scaled maps comparable). The target
class stays the one explained.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np


def perturbation(
    shape: tuple[int, ...], radius: float, seed: int, image: int, sample: int
) -> np.ndarray:
    """The noise added to image `image` in sample `sample`: uniform in [-radius, radius]."""
    rng = np.random.default_rng([int(seed), int(image), int(sample)])
    return rng.uniform(-radius, radius, size=shape).astype(np.float32)


def max_sensitivity(
    job: Any, method: str, originals: np.ndarray, samples: int, radius: float, seed: int
) -> tuple[list[float | None], float]:
    """Per row of `job` the max-sensitivity of its map in `originals` [N, H, W], and seconds.

    A row whose original map is all zero has no relative change: None.
    """
    from .run import compute_maps, job_for

    started = time.perf_counter()
    originals = np.asarray(originals, dtype=np.float64)
    norms = np.linalg.norm(originals.reshape(len(originals), -1), axis=1)
    worst = np.zeros(len(originals))
    for s in range(int(samples)):
        noisy = job.inputs.copy()
        for i in sorted({i for i, _ in job.rows}):
            noisy[i] += perturbation(noisy[i].shape, radius, seed, i, s)
        maps = compute_maps(job_for(dataclasses.replace(job, inputs=noisy)), method)
        change = np.linalg.norm((maps - originals).reshape(len(originals), -1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            worst = np.maximum(worst, change / norms)
    values = [
        float(v) if n > 0 and np.isfinite(v) else None
        for v, n in zip(worst, norms, strict=True)
    ]
    return values, time.perf_counter() - started
