"""Per-process timings for bench_pipeline.py; does nothing unless CNNVIZ_PROFILE names a file.

bench_pipeline.py puts this folder first on PYTHONPATH, so every Python process of the run
(Snakemake itself and each `cnnviz` job) imports it at start-up. At exit each process appends
one JSON line to $CNNVIZ_PROFILE:

  start      when the process was forked (from /proc: 10 ms resolution), epoch seconds
  site       when the interpreter had started up (this module running), epoch seconds
  end        when it exited (atexit), epoch seconds
  import_s   time inside top-level `import` statements (nested imports counted once)
  session_s  time inside onnxruntime.InferenceSession(...) (session creation), and its count
  run_s      time inside InferenceSession.run and .run_with_iobinding (= model compute), and
             their count
  write_s    time inside cnnviz.artifacts.atomic_path blocks: every PNG / NPY / JSON write
  cpu_s      its user + system CPU seconds (wall >> cpu/2 means it waited for the cores)
  maxrss_kb  the process's peak resident memory

No project code changes: onnxruntime and cnnviz.artifacts are patched right after their first
import. The hooks cost ~5 µs per session.run call (benchmarks/PIPELINE.md).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

PATH = os.environ.get("CNNVIZ_PROFILE", "")
TOTALS: dict[str, float] = {
    "import_s": 0.0,
    "session_s": 0.0,
    "session_n": 0,
    "run_s": 0.0,
    "run_n": 0,
    "write_s": 0.0,
    "write_n": 0,
}
_PATCHED: set[str] = set()
_DEPTH = [0]


def process_start() -> float:
    """Epoch seconds at which this process was forked (/proc/self/stat field 22)."""
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return time.time() - (uptime - ticks)


def _timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[key + "_s"] += time.perf_counter() - started
            TOTALS[key + "_n"] += 1

    return wrapper


def _patch() -> None:
    ort = sys.modules.get("onnxruntime")
    if ort is not None and "ort" not in _PATCHED and hasattr(ort, "InferenceSession"):
        _PATCHED.add("ort")
        session = ort.InferenceSession
        session.__init__ = _timed("session", session.__init__)
        session.run = _timed("run", session.run)
        # cnnviz.runner runs the method graphs through I/O binding: the same model compute
        session.run_with_iobinding = _timed("run", session.run_with_iobinding)
    artifacts = sys.modules.get("cnnviz.artifacts")
    if artifacts is not None and "artifacts" not in _PATCHED:
        _PATCHED.add("artifacts")
        original = artifacts.atomic_path

        @contextlib.contextmanager
        def atomic_path(path: Any) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                with original(path) as tmp:
                    yield tmp
            finally:
                TOTALS["write_s"] += time.perf_counter() - started
                TOTALS["write_n"] += 1

        artifacts.atomic_path = atomic_path


def _install() -> None:
    site = time.time()
    start = process_start()
    real_import = builtins.__import__

    def timed_import(*args: Any, **kwargs: Any) -> Any:
        if _DEPTH[0]:
            return real_import(*args, **kwargs)
        _DEPTH[0] += 1
        started = time.perf_counter()
        try:
            return real_import(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            TOTALS["import_s"] += time.perf_counter() - started
            if len(_PATCHED) < 2:
                _patch()

    builtins.__import__ = timed_import

    def report() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "argv": sys.argv[:6],
            "start": round(start, 3),
            "site": round(site, 3),
            "end": round(time.time(), 3),
            **{k: round(v, 4) for k, v in TOTALS.items()},
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "maxrss_kb": usage.ru_maxrss,
        }
        with open(PATH, "a") as fh:  # one short append per process
            fh.write(json.dumps(record) + "\n")

    atexit.register(report)


if PATH:
    _install()
