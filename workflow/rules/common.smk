# Config, the image plan and shared helpers. Cheap to parse: cluster jobs re-read it.
import json
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir).parent / "scripts"))
from cnnviz import model_file, plan  # noqa: E402  (no heavy imports at parse time)
from cnnviz import audit  # noqa: E402  (its DAG-time helpers are stdlib-only)
from cnnviz import failures  # noqa: E402  (stdlib-only at import)
from cnnviz import registry  # noqa: E402  (stdlib-only)
from cnnviz import resume  # noqa: E402  (stdlib only)
from cnnviz.config import config_errors  # noqa: E402

DEFAULT_CONFIG = Path(workflow.basedir).parent / "config" / "config.yaml"

# The embedded default applies only when no --configfile is given: a user's config replaces
# it rather than merging into it (merging would keep the default model in every run).
if not workflow.config_settings.configfiles:

    configfile: DEFAULT_CONFIG


SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
try:
    validate(config, schema=SCHEMA)
except WorkflowError as error:
    problems = "\n".join(config_errors(config, SCHEMA)) or str(error)
    raise WorkflowError(f"the config is not valid:\n{problems}") from None

OUT = config["output"].rstrip("/")
# Scheduled audits (rules/audit.smk): a stamped run keeps its own report and snapshot.
RUN_ID = audit.resolve_run_id(config["run_id"])
RUN_DIR = f"{OUT}/runs/{RUN_ID}" if RUN_ID else ""
REPORT_DIR = f"{RUN_DIR}/report" if RUN_ID else f"{OUT}/report"
try:
    BASELINE = audit.resolve_baseline(f"{OUT}/runs", config["baseline"], RUN_ID)
except audit.ConfigError as error:
    raise WorkflowError(str(error)) from None
MODELS = sorted(config["models"])
SAMPLE_FILES = [f"{OUT}/samples/{name}.png" for name in config["images"]["samples"]]
IMAGE_FILES = SAMPLE_FILES + [
    str(p) for p in plan.discover_images(config["images"]["paths"])
]
if not IMAGE_FILES:
    raise ValueError(
        "config: no images to process; list sample photos under images.samples "
        "or your own folders, globs or files under images.paths"
    )
IMAGE_IDS = plan.assign_ids(IMAGE_FILES)
SHARDS = plan.shards(list(zip(IMAGE_IDS, IMAGE_FILES)), config["shard_size"])


METHODS = config["methods"]["enabled"]
# Jobs that run ONNX Runtime ask for a GPU (SLURM: --gpus=1) per `gpu_jobs`; auto: when cuda.
GPU_JOBS = int(
    config["device"] == "cuda" if config["gpu_jobs"] == "auto" else config["gpu_jobs"]
)


def _main_process():
    """The snakemake process the user started (not a cluster job re-reading the workflow)."""
    from snakemake_interface_executor_plugins.settings import ExecMode

    return workflow.exec_mode == ExecMode.DEFAULT


def _folder_outputs():
    """Every folder output a job of this run writes (resume.py: their records)."""
    kinds = ["activations", *METHODS, *(f"pictures/{method}" for method in METHODS)]
    per_model = [f"{OUT}/{m}/{kind}" for m in MODELS for kind in kinds]
    return (
        [f"{OUT}/images/{shard}" for shard in SHARDS]
        + [f"{folder}/{shard}" for folder in per_model for shard in SHARDS]
        + [f"{OUT}/{m}/atlas/layers" for m in MODELS]
    )


# After a kill: a lock whose run is gone is removed (resume.py); then a folder output that a
# failed cleanup or a kill left half-empty is moved aside, so that its job reruns. Not while a
# live run holds the lock, and not in cluster jobs (they re-read this file).
if _main_process():
    _stale = resume.clear_stale_lock()
    if _stale:
        print(_stale, file=sys.stderr)
    if not resume.lock_held():
        if not resume.dry_run(sys.argv):
            resume.claim_lock()
        for _line in resume.set_aside(_folder_outputs(), f"{OUT}/.trash"):
            print(f"cnnviz: {_line}", file=sys.stderr)


wildcard_constraints:
    layer=r"[A-Za-z0-9_.-]+",
    mode="lucent|seed",
    model="|".join(map(re.escape, MODELS)),
    method="|".join(METHODS) or "(?!)",
    shard=r"s[0-9][0-9][0-9]+",
    name=r"[A-Za-z0-9_]+",


def shard_files(wildcards):
    """The shard's images that exist: a path that does not (a typo, a dangling symlink, a
    pattern that matches nothing) is no input, or it would stop the run at DAG build; staging
    lists it under the failed images. When it appears, the input set changes and the shard
    is staged again. The sample photos are made by a rule: always inputs."""
    samples = set(SAMPLE_FILES)
    paths = [path for _, path in SHARDS[wildcards.shard]]
    return [p for p in paths if p in samples or p in plan.existing([p])]


def shard_paths(wildcards):
    """Every image path of the shard, quoted, as staging gets them (missing ones included)."""
    return " ".join(shlex.quote(str(path)) for _, path in SHARDS[wildcards.shard])


def labels_file(wildcards):
    """The true-class file (images.labels), an input so that editing it restages the images."""
    return [config["images"]["labels"]] if config["images"]["labels"] else []


def labels_option(wildcards, input):
    return f"--labels {shlex.quote(input.labels[0])}" if input.labels else ""


def boxes_file(wildcards):
    """The object boxes (images.boxes) for the pointing games: editing it reruns the metrics
    jobs only, not the staging."""
    return [config["images"]["boxes"]] if config["images"]["boxes"] else []


def boxes_option(wildcards, input):
    return f"--boxes {shlex.quote(input.boxes[0])}" if input.boxes else ""


def shard_ids(wildcards):
    return " ".join(image_id for image_id, _ in SHARDS[wildcards.shard])


def model_spec(wildcards):
    """The model's config entry as JSON: a change to it reruns that model's jobs only."""
    return json.dumps(config["models"][wildcards.model], sort_keys=True)


def _onnx_source(model):
    source = config["models"][model]["source"]
    return (
        Path(source[len("onnx:") :]).expanduser()
        if source.startswith("onnx:")
        else None
    )


def model_source_file(wildcards):
    """What an onnx:<path> export reads: the file and its external data files, so that replacing
    either re-exports that model. Only what exists: a missing file is the export job's error to
    record, not a reason to stop the run."""
    path = _onnx_source(wildcards.model)
    if path is None or not path.is_file():
        return []
    return [str(p) for p in model_file.model_files(path) if p.is_file()]


def model_digest(wildcards):
    """The checksums of what model_source_file lists (a param: a rewritten file re-exports the
    model, in a dry run too, even when its time stamp is older than the export's)."""
    return plan.files_digest(
        model_source_file(wildcards), ".snakemake/cnnviz-digests.json"
    )


def model_files(wildcards):
    return {
        "onnx": f"{OUT}/models/{wildcards.model}/model.onnx",
        "card": f"{OUT}/models/{wildcards.model}/model.json",
    }


def per_shard(pattern, **kwargs):
    return expand(pattern, shard=sorted(SHARDS), **kwargs)


def results_root(wildcards, input):
    """The results folder, derived from an input (results/models/M/model.json)."""
    return str(Path(input.cards[0]).parents[2])


def cam_family_options(wildcards):
    """The CAM family's members share their options (target, layer, fallback)."""
    return method_options(SimpleNamespace(method=registry.CAM_FAMILY[0]))


def method_options(wildcards):
    """Only the options that change this method's maps: editing one reruns that method alone."""
    options = registry.method_options(
        config["methods"], config["gradient_fallback"], wildcards.method
    )
    return json.dumps(options, sort_keys=True)


_SHARD_SIZES = {}


def shard_image_sizes(shard):
    """(width, height) of each image of a shard, from the file headers (cached per parse)."""
    if shard not in _SHARD_SIZES:
        _SHARD_SIZES[shard] = [plan.image_size(path) for _, path in SHARDS[shard]]
    return _SHARD_SIZES[shard]


def mem_mb(wildcards, attempt):
    """Memory per ONNX Runtime job, estimated from the largest image of its shard (all shards
    for a per-model job) and the model's files (graph and external data), growing with each
    retry (plan.job_memory_mb; benchmarks/bench_memory.py measured it)."""
    shards = [wildcards.shard] if "shard" in wildcards.keys() else sorted(SHARDS)
    sizes = [size for shard in shards for size in shard_image_sizes(shard)]
    model_bytes = 0
    if "model" in wildcards.keys():
        exported = Path(f"{OUT}/models/{wildcards.model}/model.onnx")
        source = exported if exported.is_file() else _onnx_source(wildcards.model)
        model_bytes = (
            model_file.model_bytes(source)
            if source is not None and source.is_file()
            else 0
        )
    return plan.job_memory_mb(sizes, model_bytes, attempt)


def stage_mem_mb(wildcards, attempt):
    """Memory for staging a shard: its largest image decoded whole (plan.job_memory_mb)."""
    return plan.job_memory_mb(
        shard_image_sizes(wildcards.shard), 0, attempt, staging=True
    )


def parent_folder(wildcards, output):
    return str(Path(output[0]).parent)


def filter_options(wildcards):
    """The optimization settings shared by every filter job (not the layer list)."""
    keep = ("count", "steps", "seed", "batch_size", "objective")
    return json.dumps({k: config["filters"][k] for k in keep}, sort_keys=True)


def filter_layers(model):
    """The configured layers, or (auto) a few spread over the depth of the exported model."""
    if config["filters"]["layers"] != "auto":
        return config["filters"]["layers"]
    card_path = checkpoints.export.get(model=model).output.card
    if failures.failure_of(card_path):
        return []  # the export failed: no filter jobs, the report lists why
    from cnnviz.methods.filters import default_layers

    return default_layers(json.loads(Path(card_path).read_text()), 4)


def class_model_pictures(wildcards):
    if not config["class_models"]["enabled"]:
        return []
    return expand(f"{OUT}/{{model}}/class_models/class_models.png", model=MODELS)


def filter_pictures(wildcards):
    """The filter jobs' grids, then the neuron jobs' (filters.neurons: their modes)."""
    if not config["filters"]["enabled"]:
        return []
    return [
        f"{OUT}/{model}/{kind}/{layer}.{mode}.png"
        for kind, modes in (
            ("filters", config["filters"]["modes"]),
            ("neurons", config["filters"]["neurons"]),
        )
        for model in MODELS
        for layer in filter_layers(model)
        for mode in modes
    ]


def report_pages():
    return [f"{REPORT_DIR}/index.html"] + expand(
        f"{REPORT_DIR}/{{model}}.html", model=MODELS
    )


def audit_targets():
    """A stamped run's snapshot and the index of runs (nothing when unstamped)."""
    return [f"{RUN_DIR}/snapshot.json", f"{OUT}/runs/index.html"] if RUN_ID else []


def audit_comparison():
    """The report's input when the run has a baseline: what changed since then."""
    return [f"{RUN_DIR}/audit.json"] if BASELINE else []


def audit_flag(wildcards, input):
    return f"--audit {shlex.quote(input.audit[0])}" if input.audit else ""


# ---- metrics (rules/metrics.smk): which methods, their settings, the summaries ----
METRICS = config["metrics"]
METRIC_METHODS = (
    [m for m in METHODS if m != "projections"]
    if METRICS["methods"] == "auto"
    else list(METRICS["methods"])
)
_METRICS_MISSING = sorted(set(METRIC_METHODS) - set(METHODS))
if METRICS["enabled"] and _METRICS_MISSING:
    raise ValueError(
        f"config: metrics.methods lists {', '.join(_METRICS_MISSING)}, which methods.enabled "
        "does not; enable them there or remove them from metrics.methods"
    )
METRIC_REFERENCE = "random"


def metrics_summaries():
    """The report's inputs: one summary per model when metrics are enabled."""
    return expand(
        f"{OUT}/{{model}}/metrics/summary.json",
        model=MODELS if METRICS["enabled"] else [],
    )


def metrics_settings_for(method):
    """The metrics section as JSON, the randomization test kept only where this method has it:
    editing one setting reruns only the jobs it changes."""
    settings = {k: v for k, v in METRICS.items() if k not in ("enabled", "methods")}
    tested = method in METRICS["randomization"]["methods"]
    settings["randomization"] = dict(
        METRICS["randomization"], methods=[method] if tested else []
    )
    sensitivity = METRICS["max_sensitivity"]
    listed = sensitivity["methods"] == "auto" or method in sensitivity["methods"]
    settings["max_sensitivity"] = dict(
        sensitivity, methods=[method] if listed and method != METRIC_REFERENCE else []
    )
    if method == METRIC_REFERENCE:
        settings.pop("randomization")
        settings.pop("class_sensitivity")
        settings.pop("max_sensitivity")
    return json.dumps(settings, sort_keys=True)


def metrics_settings(wildcards):
    return metrics_settings_for(wildcards.method)


def metrics_inputs(wildcards):
    return expand(
        f"{OUT}/{wildcards.model}/metrics/{{shard}}/{{method}}.json",
        shard=sorted(SHARDS),
        method=METRIC_METHODS + [METRIC_REFERENCE],
    )


def run_artifacts(wildcards):
    """Every artifact of the run, not only the report. Snakemake (>= 8) redoes a missing file only
    when a target asks for it, or a job that needs it reruns anyway: listing them all here makes
    a deleted output (an export, a shard's predictions, a map folder) be redone, and then what
    depends on it, in a dry run as in the run."""
    files = expand(
        f"{OUT}/models/{{model}}/model.{{ext}}", model=MODELS, ext=["onnx", "json"]
    )
    files += per_shard(f"{OUT}/images/{{shard}}.json") + per_shard(
        f"{OUT}/images/{{shard}}"
    )
    for model in MODELS:
        files += per_shard(f"{OUT}/{model}/predictions/{{shard}}.json")
        files += per_shard(f"{OUT}/{model}/activations/{{shard}}")
        files += expand(
            per_shard(f"{OUT}/{model}/{{{{method}}}}/{{shard}}"), method=METHODS
        )
        files += expand(
            per_shard(f"{OUT}/{model}/pictures/{{{{method}}}}/{{shard}}"),
            method=METHODS,
        )
        if config["atlas"]["enabled"]:
            files += per_shard(f"{OUT}/{model}/atlas/shards/{{shard}}.json")
        if METRICS["enabled"]:
            files += metrics_inputs(SimpleNamespace(model=model))
    return files + filter_pictures(wildcards) + class_model_pictures(wildcards)
