"""`cnnviz <step>`: every pipeline step as a command (the Snakemake rules call these).

Each subcommand parses its arguments and calls one library function; the library does the work.
Imports are lazy so that `cnnviz --help` and light steps start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import CnnvizError

log = logging.getLogger("cnnviz")
Command = Callable[[argparse.Namespace], None]
# Each step's declared outputs, as the rules name them: on bad input they become failure markers.
FILTER_FILES = (".png", ".npy", ".json", ".curve.png")
METRICS_SUMMARY_FILES = ("summary.json", "deletion_insertion.png", "randomization.png")
Outputs = Callable[[argparse.Namespace], list[tuple[Path, bool]]]  # (path, is a folder)


def _sample_image(args: argparse.Namespace) -> None:
    from .images import write_sample_image

    write_sample_image(args.name, Path(args.out))


def _stage(args: argparse.Namespace) -> None:
    from .images import stage_shard

    if len(args.ids) != len(args.images):
        raise CnnvizError(f"stage: {len(args.ids)} ids for {len(args.images)} images")
    from .images import read_labels

    pairs = list(zip(args.ids, map(Path, args.images), strict=True))
    labels = read_labels(args.labels) if args.labels else None
    stage_shard(pairs, Path(args.staged_dir), Path(args.manifest), labels=labels)


def _export(args: argparse.Namespace) -> None:
    from .export import export_model

    spec = json.loads(args.spec)
    card_path = Path(args.card)
    export_model(
        name=args.name,
        source=spec["source"],
        out_dir=card_path.parent,
        weights=spec.get("weights", "pretrained"),
        exporter=spec.get("exporter", "torchscript"),
        preprocess=spec.get("preprocess"),
        labels=spec.get("labels"),
        threads=args.threads,
        output=spec.get("output"),
    )


def _predict(args: argparse.Namespace) -> None:
    from .methods.predictions import predict_shard

    predict_shard(
        Path(args.card).parent,
        Path(args.manifest),
        Path(args.out),
        top_k=args.top_k,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
    )


def _activations(args: argparse.Namespace) -> None:
    from .methods.activations import activations_shard

    options = json.loads(args.options) if args.options else {}
    activations_shard(
        Path(args.card).parent,
        Path(args.manifest),
        Path(args.out_dir),
        layers=options.get("layers", "all"),
        channels=options.get("channels") or {},
        blank_eps=options.get("blank_eps", 1e-6),
        grids=options.get("grids", "all"),
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
    )


def _explain(args: argparse.Namespace) -> None:
    from .methods.explain import explain_shard

    explain_shard(
        Path(args.card).parent,
        Path(args.manifest),
        args.method,
        [Path(d) for d in args.out_dir],
        options=json.loads(args.options) if args.options else {},
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        predictions=Path(args.predictions) if args.predictions else None,
    )


def _render(args: argparse.Namespace) -> None:
    from .pictures import render_shard

    render_shard(
        Path(args.card).parent,
        Path(args.manifest),
        [Path(d) for d in args.maps_dir],
        [Path(d) for d in args.out_dir],
        selection=json.loads(args.pictures),
        predictions=Path(args.predictions) if args.predictions else None,
    )


def _filters(args: argparse.Namespace) -> None:
    from .config import section_defaults
    from .methods.filters import visualize_layer
    from .methods.objectives import NEURON_OBJECTIVE

    options = {**section_defaults("filters"), **(json.loads(args.options) if args.options else {})}
    if args.neurons:
        options["objective"] = NEURON_OBJECTIVE
    visualize_layer(
        Path(args.card).parent,
        args.layer,
        Path(args.out_dir),
        mode=args.mode,
        filters=options["count"],
        steps=options["steps"],
        seed=options["seed"],
        batch_size=options["batch_size"],
        device=args.device,
        threads=args.threads,
        expression=options["objective"],
    )


def _class_models(args: argparse.Namespace) -> None:
    from .config import section_defaults
    from .methods.class_models import class_models

    options = {**section_defaults("class_models"),
               **(json.loads(args.options) if args.options else {})}
    class_models(
        Path(args.card).parent, [Path(p) for p in args.predictions], Path(args.out_dir),
        top=options["top"], classes=options["classes"], pictures=options["pictures"],
        diversity=options["diversity"], layer=options["layer"], mode=options["mode"],
        steps=options["steps"], seed=options["seed"], param_size=options["param_size"],
        device=args.device, threads=args.threads,
    )


def _class_model_files(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    from .methods.class_models import STEM

    stem = Path(args.out_dir) / STEM
    return [(stem.with_name(stem.name + ext), False) for ext in FILTER_FILES]


def _zip_report(args: argparse.Namespace) -> None:
    from .report.portable import report_zip

    report_zip(Path(args.index), Path(args.out))


def _sparsity(args: argparse.Namespace) -> None:
    from .methods.activations import sparsity_plot

    sparsity_plot([Path(p) for p in args.activations], Path(args.out))


def _atlas_map(args: argparse.Namespace) -> None:
    from .methods.atlas import map_shard

    options = json.loads(args.options) if args.options else {}
    map_shard(
        Path(args.card).parent,
        Path(args.manifest),
        Path(args.out),
        layers=options.get("layers", "auto"),
        top_k=int(options.get("top_k", 9)),
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
    )


def _atlas_reduce(args: argparse.Namespace) -> None:
    from .methods.atlas import reduce_atlas

    reduce_atlas(
        Path(args.card).parent,
        [Path(p) for p in args.shards],
        [Path(p) for p in args.manifests],
        Path(args.out_dir),
        options=json.loads(args.options) if args.options else {},
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
    )


def _metrics(args: argparse.Namespace) -> None:
    from .metrics import metrics_shard

    metrics_shard(
        Path(args.card).parent,
        Path(args.manifest),
        args.method,
        Path(args.out),
        maps_dir=Path(args.maps_dir) if args.maps_dir else None,
        method_options=json.loads(args.options) if args.options else {},
        settings=json.loads(args.metrics) if args.metrics else {},
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        boxes=Path(args.boxes) if args.boxes else None,
    )


def _metrics_summary(args: argparse.Namespace) -> None:
    from .metrics import summarize

    summarize([Path(p) for p in args.inputs], Path(args.out_dir))


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    build_report(
        results_dir=Path(args.results),
        index=Path(args.index),
        config=json.loads(args.config) if args.config else {},
        models=args.models,
        self_contained=args.self_contained,
        audit=Path(args.audit) if args.audit else None,
    )


def _audit_snapshot(args: argparse.Namespace) -> None:
    from .artifacts import write_json
    from .audit import snapshot

    config = json.loads(args.config) if args.config else {}
    methods = (config.get("methods") or {}).get("enabled")
    data = snapshot(Path(args.results), args.run_id, config, args.models, methods, args.baseline)
    write_json(Path(args.out), data)


def _audit_compare(args: argparse.Namespace) -> None:
    from .artifacts import read_json, write_json
    from .audit import compare

    write_json(Path(args.out), compare(read_json(args.baseline), read_json(args.current)))


def _audit_index(args: argparse.Namespace) -> None:
    from .audit import write_runs_index

    write_runs_index(Path(args.runs_dir), Path(args.out), title=args.title)


def _check_config(args: argparse.Namespace) -> None:
    from .config import check_config_file

    problems = check_config_file(args.configfile)
    if problems:
        raise CnnvizError("the config is not valid:\n" + "\n".join(problems))
    print(f"{args.configfile}: valid")


def _out_file(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    return [(Path(args.out), False)]


def _out_folder(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    return [(Path(args.out_dir), True)]


def _out_folders(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    return [(Path(d), True) for d in args.out_dir]


def _filter_files(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    stem = Path(args.out_dir) / f"{args.layer}.{args.mode}"
    return [(stem.with_name(stem.name + ext), False) for ext in FILTER_FILES]


def _metrics_summary_files(args: argparse.Namespace) -> list[tuple[Path, bool]]:
    return [(Path(args.out_dir) / name, False) for name in METRICS_SUMMARY_FILES]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnviz", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--record-failures",
        action="store_true",
        help="on bad input, write failure markers as the step's outputs and exit 0 "
        "(the workflow's rules do: the run goes on and the report lists the failure)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STEP")

    def add(
        name: str, func: Command, help_: str, outputs: Outputs | None = None
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func, outputs=outputs)
        return p

    def runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
        p.add_argument("--batch-size", type=int, default=8, help="images per ONNX Runtime call")

    p = add(
        "check-config",
        _check_config,
        "check a config file: YAML syntax (naming the line) and every key against the schema",
    )
    p.add_argument("configfile")

    p = add("sample-image", _sample_image, "write one of scikit-image's sample photos as PNG")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)

    p = add(
        "stage",
        _stage,
        "read, check and convert a shard of images; list the failures",
        lambda a: [(Path(a.manifest), False), (Path(a.staged_dir), True)],
    )
    p.add_argument("--manifest", required=True, help="shard manifest JSON to write")
    p.add_argument("--staged-dir", required=True, help="folder for the converted RGB PNGs")
    p.add_argument("--ids", nargs="+", required=True, help="one id per image, in order")
    p.add_argument("--images", nargs="+", required=True, help="image files, in order")
    p.add_argument("--labels", default="", help="CSV/TSV of file name, true class (optional)")

    p = add(
        "export",
        _export,
        "export a model to ONNX and write model.json beside it",
        lambda a: [(Path(a.card), False), (Path(a.card).with_name("model.onnx"), False)],
    )
    p.add_argument("--name", required=True, help="the model's name in the config")
    p.add_argument("--spec", required=True, help="the model's config entry as JSON")
    p.add_argument("--card", required=True, help="model.json to write (model.onnx goes beside)")
    p.add_argument("--threads", type=int, default=None)

    p = add("predict", _predict, "top-k predictions for a shard of images", _out_file)
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=5)
    runtime_options(p)

    p = add(
        "activations",
        _activations,
        "feature maps of every conv layer, as channel grids",
        _out_folder,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="the config's activations section as JSON")
    runtime_options(p)

    p = add(
        "render",
        _render,
        "draw the pictures of a shard's maps, every method named (the rows report.pictures "
        "selects)",
        _out_folders,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--maps-dir", required=True, nargs="+",
                   help="the explain step's folder for the shard, one per method")
    p.add_argument("--predictions", default=None, help="the predict step's JSON for the shard")
    p.add_argument("--out-dir", required=True, nargs="+", help="one folder per method")
    p.add_argument("--pictures", default='"all"',
                   help='which rows, as JSON: "all", "failures", "none" or {"top": N}')

    p = add(
        "explain",
        _explain,
        "explanation methods (Grad-CAM, saliency, ...) for a shard; a family's members "
        "(the CAMs) named together come from one run",
        _out_folders,
    )
    p.add_argument("--method", required=True, nargs="+", help="one or more methods")
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out-dir", required=True, nargs="+", help="one folder per method")
    p.add_argument("--predictions", default=None,
                   help="the predict step's JSON for the shard (targets without a forward pass)")
    p.add_argument("--options", default="{}", help="the methods' options as JSON")
    runtime_options(p)

    p = add(
        "filters",
        _filters,
        "visualize a layer's filters by activation maximization",
        _filter_files,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--layer", required=True, help="layer name from model.json")
    p.add_argument("--mode", default="lucent", choices=["lucent", "seed"])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="the config's filters section as JSON")
    p.add_argument("--neurons", action="store_true",
                   help="picture each filter's centre unit, neuron(layer, c), not `objective`")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)

    p = add(
        "class-models",
        _class_models,
        "pictures that maximize class logits (the run's top classes and named ones)",
        _class_model_files,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--predictions", nargs="*", default=[], help="the predict step's JSONs")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="the config's class_models section as JSON")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)

    p = add("zip-report", _zip_report, "zip a report with exactly the files its pages link")
    p.add_argument("index", help="the report's index.html")
    p.add_argument("out", help="the zip file to write")

    p = add("sparsity", _sparsity, "plot blank-channel fraction against depth", _out_file)
    p.add_argument("--activations", nargs="+", required=True, help="activation folders (shards)")
    p.add_argument("--out", required=True)

    p = add(
        "atlas-map",
        _atlas_map,
        "feature atlas, map: each channel's top-k in one shard",
        _out_file,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="the shard's top-k JSON to write")
    p.add_argument("--options", default="{}", help="the config's atlas section as JSON")
    runtime_options(p)

    p = add(
        "atlas-reduce",
        _atlas_reduce,
        "feature atlas, reduce: merge shards, project, tile",
        _out_folder,
    )
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--shards", nargs="+", required=True, help="atlas-map outputs, all shards")
    p.add_argument("--manifests", nargs="+", required=True, help="every shard's manifest")
    p.add_argument("--out-dir", required=True, help="folder for {layer}.png and {layer}.json")
    p.add_argument("--options", default="{}", help="the config's atlas section as JSON")
    runtime_options(p)

    p = add(
        "metrics",
        _metrics,
        "explanation quality of one method's maps over a shard",
        _out_file,
    )
    p.add_argument("--method", required=True, help="the method, or 'random' (the reference)")
    p.add_argument("--card", required=True, help="model.json")
    p.add_argument("--manifest", required=True)
    p.add_argument("--maps-dir", default=None, help="the explain step's output for the method")
    p.add_argument("--out", required=True, help="the metrics JSON to write")
    p.add_argument("--options", default="{}", help="the method's options as JSON")
    p.add_argument("--metrics", default="{}", help="the config's metrics section as JSON")
    p.add_argument("--boxes", default="", help="CSV of object boxes per image (optional)")
    runtime_options(p)

    p = add(
        "metrics-summary",
        _metrics_summary,
        "one model's metrics: summary.json and plots",
        _metrics_summary_files,
    )
    p.add_argument("--inputs", nargs="+", required=True, help="metrics JSONs (shards x methods)")
    p.add_argument("--out-dir", required=True, help="folder for summary.json and the plots")

    p = add("report", _report, "build the HTML report")
    p.add_argument("--results", required=True, help="the results folder")
    p.add_argument("--index", required=True, help="index.html to write (model pages beside)")
    p.add_argument("--config", default="{}", help="the config as run, JSON")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument(
        "--self-contained",
        action="store_true",
        help="write one HTML file with every picture embedded (for a small run)",
    )
    p.add_argument("--audit", default=None, help="audit-compare's JSON: what changed since then")

    p = add("audit-snapshot", _audit_snapshot, "freeze a stamped run's checksums, top-k, maps")
    p.add_argument("--results", required=True, help="the results folder")
    p.add_argument("--run-id", required=True)
    p.add_argument("--baseline", default="", help="the run this one is compared with")
    p.add_argument("--config", default="{}", help="the config as run, JSON")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--out", required=True, help="snapshot.json to write")

    p = add("audit-compare", _audit_compare, "what changed between two runs' snapshots")
    p.add_argument("--baseline", required=True, help="the earlier run's snapshot.json")
    p.add_argument("--current", required=True, help="this run's snapshot.json")
    p.add_argument("--out", required=True, help="audit.json to write")

    p = add("audit-index", _audit_index, "the index of stamped runs (runs/index.html)")
    p.add_argument("--runs-dir", required=True, help="{output}/runs")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="cnnviz")

    sub.add_parser(
        "gradcheck",
        help="check the gradient engine against finite differences (cnnviz gradcheck --help)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gradcheck"]:  # its own parser: `cnnviz gradcheck --help`
        from .autodiff.gradcheck import main as gradcheck_main

        return gradcheck_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    started = time.perf_counter()
    outputs = args.outputs(args) if args.outputs else []
    try:
        args.func(args)
    except CnnvizError as error:
        print(f"cnnviz {args.command}: error: {error}", file=sys.stderr)
        if not (args.record_failures and outputs):
            return 2
        return _record(args.command, error, outputs)
    except Exception as error:  # noqa: BLE001 - every job's failure is data (see below)
        if not (args.record_failures and outputs) or _environmental(error):
            raise
        # Not an error cnnviz foresaw (a bug, or an input no check knew): still the job's
        # result, named in the report, so one model or shard never stops the run.
        import traceback

        traceback.print_exc()
        return _record(args.command, UnexpectedError(args.command, error), outputs)
    if outputs:
        from .failures import clear_failure

        clear_failure(outputs)
        _stamp_folders(outputs)
    log.info("%s done in %.1f s", args.command, time.perf_counter() - started)
    return 0


class UnexpectedError(CnnvizError):
    """An exception no check in cnnviz foresaw, recorded as the job's failure."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(
            f"{type(error).__name__}: {error} (not an error cnnviz {step} expected: the "
            "traceback is in the job's log; please report it with the input that caused it)"
        )


def _environmental(error: BaseException) -> bool:
    """Errors of the machine, not of the input (memory, a full disk): the job fails so that
    Snakemake retries it (with more memory), instead of recording a result."""
    import errno

    if isinstance(error, MemoryError):
        return True
    codes = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EIO, errno.EROFS)
    return isinstance(error, OSError) and error.errno in codes


def _record(step: str, error: CnnvizError, outputs: list[tuple[Path, bool]]) -> int:
    from .failures import record_failure

    record_failure(step, error, outputs)
    _stamp_folders(outputs)
    print(f"cnnviz {step}: recorded the failure in its outputs", file=sys.stderr)
    return 0


def _stamp_folders(outputs: list[tuple[Path, bool]]) -> None:
    """A finished job's folder outputs record their files (resume.py: half-empty folders)."""
    from .resume import write_stamp

    for path, is_dir in outputs:
        if is_dir:
            write_stamp(path)


if __name__ == "__main__":
    raise SystemExit(main())
