"""Shared helpers of the benchmark scripts: the interleaved timing loop and the torch oracle.

`run_interleaved` is the one timing loop (bench_backprop, bench_cam and bench_peers use it): every
repeat runs each contender once, in turn (in a rotating order unless `rotate=False`), so a change
in the shared machine's load hits all contenders alike. Repeats and warm-up calls can differ per
contender: a contender with fewer repeats than the others runs in the first rounds only.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class OwnTime(float):
    """Returned by a contender that times itself: the loop records this many seconds instead of
    the call's wall time (e.g. a step rate measured without its one-off setup)."""


def torch_oracle():
    """tests/torch_oracle.py, the shared torch side (pretrained EfficientNet, ReLU6 swap)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import torch_oracle

    return torch_oracle


def _per(value: int | Mapping[str, int], name: str) -> int:
    return int(value.get(name, 0)) if isinstance(value, Mapping) else int(value)


def run_interleaved(
    contenders: Mapping[str, Callable[[], object]],
    repeats: int | Mapping[str, int],
    warmup: int | Mapping[str, int] = 1,
    rotate: bool = True,
    results: dict[str, object] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, list[float]]:
    """{name: [seconds per call]}; `repeats` / `warmup`: one count, or one per contender.

    Warm-up calls run first, contender by contender, untimed. `results` receives each
    contender's last return value; `progress(name, seconds)` is called after each timed call.
    """
    names = list(contenders)
    for name in names:
        for _ in range(_per(warmup, name)):
            out = contenders[name]()
            if results is not None:
                results[name] = out
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = max((_per(repeats, name) for name in names), default=0)
    for r in range(rounds):
        # rotate the order so that no contender always follows the same one
        order = names[r % len(names) :] + names[: r % len(names)] if rotate else names
        for name in order:
            if r >= _per(repeats, name):
                continue
            start = time.perf_counter()
            out = contenders[name]()
            took = time.perf_counter() - start
            times[name].append(float(out) if isinstance(out, OwnTime) else took)
            if results is not None:
                results[name] = out
            if progress is not None:
                progress(name, times[name][-1])
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
