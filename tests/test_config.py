"""The config schema, the workflow's lint and its dry run (fast, no model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cnnviz.config import config_errors

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "quick.yaml", "seed-vgg16.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = yaml.safe_load((REPO / "config" / name).read_text())
    assert config_errors(config, SCHEMA) == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c.update(device="tpu"), "config key device"),
        (lambda c: c.update(shard_size=0), "config key shard_size"),
        (lambda c: c["models"]["efficientnet-lite0"].update(weights="bogus"),
         "config key models.efficientnet-lite0.weights"),
        (lambda c: c["models"]["efficientnet-lite0"].update(source="caffe:x"),
         "config key models.efficientnet-lite0.source"),
        (lambda c: c["images"].update(samples=["not_a_photo"]), "config key images.samples.0"),
        (lambda c: c.update(colour="red"), "config key (top level)"),
        (lambda c: c["activations"].update(layers=[]), "config key activations.layers"),
    ],
)
def test_schema_errors_name_the_key(change, key: str) -> None:
    config = default_config()
    change(config)
    errors = config_errors(config, SCHEMA)
    assert errors and any(e.startswith(key) for e in errors), errors


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def test_snakemake_lint_is_clean() -> None:
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_rejects_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = default_config()
    config["models"]["efficientnet-lite0"]["weights"] = "bogus"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    assert result.returncode != 0
    assert "config key models.efficientnet-lite0.weights" in result.stdout + result.stderr


def test_dry_run_plans_one_job_per_model_and_shard(tmp_path: Path) -> None:
    config = default_config()
    config["shard_size"] = 4  # 6 sample photos -> 2 shards
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--directory", str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert counts["export"] == "1" and counts["predict"] == "2" and counts["stage_shard"] == "2"
    assert counts["sample_image"] == "6"


def test_every_conda_env_named_by_a_rule_exists() -> None:
    rules = (REPO / "workflow" / "rules").glob("*.smk")
    for rule_file in rules:
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', rule_file.read_text()):
            assert (rule_file.parent / env).resolve().is_file(), f"{rule_file.name}: {env}"


def test_schema_offers_exactly_the_sample_photos_the_code_writes() -> None:
    from cnnviz.images import SAMPLE_IMAGES

    schema = yaml.safe_load(SCHEMA.read_text())
    offered = schema["properties"]["images"]["properties"]["samples"]["items"]["enum"]
    assert sorted(offered) == sorted(SAMPLE_IMAGES)


