"""Shared by the SLURM, rerun and fault tests: tiny models and configs, the real workflow run
through the project's profiles, a traced `cnnviz` on PATH, and comparisons of two result folders.

The traced `cnnviz` is a small script put first on PATH for a run. It calls the real CLI and
writes one JSON record per step (start, end, exit code, SLURM job id, CUDA_VISIBLE_DEVICES, and
whether ONNX Runtime could use CUDA there), and it can inject faults without any hook in cnnviz:
- `CNNVIZ_FAIL_ONCE=<step>`: the first call of that step exits 75 before doing anything;
- `CNNVIZ_SLOW_WRITES=<step>:<seconds>`: that step pauses before each atomic rename, so a kill
  can land while a temporary file exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper
from onnx_build import finish_model

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
PROFILES = REPO / "config" / "profiles"
SAMPLES = ["chelsea", "coffee"]
# atomic_path's temporaries: .{final name}.{random}{suffix}
TEMP_NAME = re.compile(r"^\..+\.[^.]+$")

TRACED_CNNVIZ = '''#!{python}
"""cnnviz, traced for the tests (tests/cluster/workflow_runs.py)."""
import json, os, sys, time
from pathlib import Path

step = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
trace = Path(os.environ["CNNVIZ_TRACE_DIR"])
record = {{"step": step, "argv": sys.argv[1:], "start": time.time(), "pid": os.getpid(),
          "slurm_job": os.environ.get("SLURM_JOB_ID"),
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}


def finish(rc):
    record.update(end=time.time(), rc=rc)
    runtime = sys.modules.get("cnnviz.runtime")  # loaded by steps that run ONNX Runtime
    record["cuda_usable"] = runtime.cuda_usable() if runtime else None
    path = trace / f"{{step}}-{{os.getpid()}}-{{time.time_ns()}}.json"
    path.write_text(json.dumps(record))
    sys.exit(rc)


if step == os.environ.get("CNNVIZ_FAIL_ONCE"):
    marker = trace / f"failed-once-{{step}}"
    if not marker.exists():
        marker.write_text("")
        record["injected"] = True
        print(f"cnnviz {{step}}: injected failure (first attempt)", file=sys.stderr)
        finish(75)
slow_step, _, seconds = os.environ.get("CNNVIZ_SLOW_WRITES", "").partition(":")
if step == slow_step:
    rename = os.replace

    def slow_replace(src, dst, **kwargs):
        time.sleep(float(seconds))
        rename(src, dst, **kwargs)

    os.replace = slow_replace
from cnnviz.cli import main

finish(main(sys.argv[1:]))
'''


# --------------------------------------------------------------------------- models and configs


def tiny_classifier(
    path: Path,
    seed: int = 0,
    classes: int = 10,
    side: int = 32,
    dynamic_size: bool = False,
    extra_op: str | None = None,
) -> Path:
    """A small CNN saved as ONNX: Conv-Relu-MaxPool-Conv-Relu-GAP-Gemm, [batch, 3, side, side].

    `dynamic_size`: height and width symbolic too; `extra_op`: a unary op (e.g. Softsign, which
    has no backward rule) after the second Relu.
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1.0 / np.sqrt(np.prod(shape[1:]))
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        return numpy_helper.from_array(values, name)

    inits = [
        weight("w1", 8, 3, 3, 3), numpy_helper.from_array(np.full(8, 0.05, np.float32), "b1"),
        weight("w2", 16, 8, 3, 3), numpy_helper.from_array(np.full(16, 0.05, np.float32), "b2"),
        weight("fc_w", classes, 16), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="/conv1/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="/pool/MaxPool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="/conv2/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
    ]  # fmt: skip
    features = "r2"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["r2"], ["x2"], name=f"/extra/{extra_op}"))
        features = "x2"
    nodes += [
        helper.make_node("GlobalAveragePool", [features], ["gap"], name="/gap/GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/flatten/Flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="/fc/Gemm", transB=1),
    ]  # fmt: skip
    size = ["height", "width"] if dynamic_size else [side, side]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, *size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    model = finish_model(nodes, inits, [image], [logits])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def tiny_model_entry(path: Path, classes: int = 10, side: int = 32) -> dict:
    """The config entry of a tiny_classifier file."""
    return {
        "source": f"onnx:{path}",
        "preprocess": {"size": [side, side], "resize": "stretch", "scale": 255.0,
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "channel_order": "RGB"},
        "labels": [f"thing {i}" for i in range(classes)],
    }  # fmt: skip


def write_config(path: Path, models: dict, enabled: Iterable[str] = (), **sections) -> Path:
    """A small run: two sample photos in one shard, one ONNX Runtime thread, the `enabled`
    methods only (no filters, atlas, metrics or class models); `sections` update top-level
    keys (dicts merged)."""
    config = {
        "output": "results",
        "device": "auto",
        "threads": 1,
        "shard_size": 8,
        "batch_size": 8,
        "images": {"samples": list(SAMPLES), "paths": []},
        "models": models,
        "methods": {"enabled": list(enabled)},
        # Image-independent and whole-run extras: off unless a test turns them on.
        "filters": {"enabled": False},
        "atlas": {"enabled": False},
        "metrics": {"enabled": False},
        "class_models": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- running snakemake


def traced_env(folder: Path, **faults: str) -> dict[str, str]:
    """Environment whose `cnnviz` is the traced one; records go to folder/trace."""
    bin_dir, trace = folder / "bin", folder / "trace"
    bin_dir.mkdir(parents=True, exist_ok=True)
    trace.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "cnnviz"
    script.write_text(TRACED_CNNVIZ.format(python=sys.executable))
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "CNNVIZ_TRACE_DIR": str(trace)}  # fmt: skip
    env.update({f"CNNVIZ_{key.upper()}": value for key, value in faults.items()})
    return env


def trace_records(folder: Path) -> list[dict]:
    return sorted(
        (json.loads(p.read_text()) for p in (folder / "trace").glob("*.json")),
        key=lambda r: r["start"],
    )


def snakemake_cmd(
    workdir: Path, configfile: Path, *args: str, profile: str = "default"
) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE),
        "--profile", str(PROFILES / profile),
        "--directory", str(workdir), "--configfile", str(configfile), *args,
    ]  # fmt: skip


def snakemake(
    workdir: Path,
    configfile: Path,
    *args: str,
    profile: str = "default",
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` through config/profiles/<profile>; stdout holds everything."""
    return subprocess.run(
        snakemake_cmd(workdir, configfile, *args, profile=profile),
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a snakemake run or dry run: {rule: jobs}, without the total."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"\s*([\w-]+)\s+(\d+)\s*", line)
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    counts.pop("total", None)
    return counts


def dry_run_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """The jobs a dry run lists, as (rule, wildcards), in its order."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        header = re.fullmatch(r"\s*(?:local)?(?:rule|checkpoint) (\w+):", line)
        if header:
            jobs.append((header.group(1), {}))
            continue
        values = re.fullmatch(r"\s*wildcards: (.*)", line)
        if values and jobs:
            jobs[-1][1].update(dict(kv.split("=", 1) for kv in values.group(1).split(", ")))
    return jobs


def planned(workdir: Path, configfile: Path, *args: str) -> set[tuple[str, ...]]:
    """What Snakemake would run now (a dry run): {(rule, wildcard values...)}."""
    done = snakemake(workdir, configfile, "-n", *args)
    assert done.returncode == 0, done.stdout[-3000:]
    jobs = {(rule, *wildcards.values()) for rule, wildcards in dry_run_jobs(done.stdout)}
    assert len(jobs) == sum(job_counts(done.stdout).values()), done.stdout[-3000:]
    return jobs


# --------------------------------------------------------------------------- comparing results

COMPARED = ("samples", "images")  # plus every model folder; logs, benchmarks, report are per run


def artifact_files(results: Path) -> dict[str, Path]:
    """Every artifact a rerun must reproduce, by path relative to `results`."""
    skip = {"logs", "benchmarks", "report", "models"}
    return {
        str(p.relative_to(results)): p
        for p in results.rglob("*")
        if p.is_file()
        and p.relative_to(results).parts[0] not in skip
        and p.name != ".snakemake_timestamp"
    }


def temp_leftovers(root: Path) -> list[Path]:
    """Files that look like an interrupted atomic write: hidden, named after another file."""
    return sorted(p for p in root.rglob(".*") if p.is_file() and TEMP_NAME.match(p.name))


def assert_same_results(got: Path, want: Path) -> None:
    """Same files; predictions and activation stats equal, raw maps allclose, PNGs identical."""
    got_files, want_files = artifact_files(got), artifact_files(want)
    extra = sorted(set(got_files) - set(want_files))
    missing = sorted(set(want_files) - set(got_files))
    assert not extra and not missing, f"{got} has extra files {extra} and lacks {missing}"
    assert any(name.endswith(".png") for name in want_files)
    for name, path in want_files.items():
        other = got_files[name]
        if path.suffix == ".json" and "/predictions/" in f"/{name}":
            assert json.loads(other.read_text()) == json.loads(path.read_text()), name
        elif path.suffix == ".json" and "/activations/" in f"/{name}":
            assert json.loads(other.read_text()) == json.loads(path.read_text()), name
        elif path.suffix == ".npy":
            np.testing.assert_allclose(np.load(other), np.load(path), rtol=1e-5, atol=1e-7,
                                       err_msg=name)  # fmt: skip
        elif path.suffix == ".png":
            assert other.read_bytes() == path.read_bytes(), f"{name} differs"
