# Config, the image plan and shared helpers. Cheap to parse: cluster jobs re-read it.
import json
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir).parent / "scripts"))
from cnnviz import plan  # noqa: E402  (stdlib-only module)
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
CAM_METHODS = {"gradcam", "gradcampp", "layercam", "guided_gradcam", "scorecam"}
# Jobs that run ONNX Runtime ask for a GPU when the config says cuda (SLURM: --gpus=1).
GPU_JOBS = 1 if config["device"] == "cuda" else 0


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    method="|".join(METHODS) or "(?!)",
    shard=r"s[0-9][0-9][0-9]+",
    name=r"[A-Za-z0-9_]+",


def shard_files(wildcards):
    return [path for _, path in SHARDS[wildcards.shard]]


def shard_ids(wildcards):
    return " ".join(image_id for image_id, _ in SHARDS[wildcards.shard])


def model_spec(wildcards):
    """The model's config entry as JSON: a change to it reruns that model's jobs only."""
    return json.dumps(config["models"][wildcards.model], sort_keys=True)


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


def method_options(wildcards):
    """Only the options that change this method's maps: editing one reruns that method alone."""
    methods = config["methods"]
    options = {"target": methods["target"]}
    if wildcards.method in CAM_METHODS:
        options["cam_layer"] = methods["cam_layer"]
    if wildcards.method == "guided_gradcam":
        options["cam_layer"] = methods["cam_layer"]
    own = {"scorecam", "smoothgrad", "integrated_gradients", "occlusion", "projections"}
    if wildcards.method in own:
        options.update(methods[wildcards.method])
    return json.dumps(options, sort_keys=True)


def mem_mb(wildcards, attempt):
    """Memory per ONNX Runtime job, growing with each retry."""
    return 3000 * attempt


def report_pages():
    return [f"{OUT}/report/index.html"] + expand(
        f"{OUT}/report/{{model}}.html", model=MODELS
    )
