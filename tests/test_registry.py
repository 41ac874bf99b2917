"""The method registry is the one place a method is declared: everything that lists methods or
their options (the schema, the shipped config, the docs, the explain step, the report, the
workflow's routing) agrees with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cnnviz import registry

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_the_schema_file_holds_the_generated_blocks(tmp_path: Path) -> None:
    copy = tmp_path / "schema.yaml"
    copy.write_text(SCHEMA.read_text())
    assert registry.write_schema(copy) is False, "run: python3 -m cnnviz.registry --write-schema"
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["methods"] == registry.methods_schema()
    assert schema["$defs"]["method"]["enum"] == list(registry.METHODS)


def test_a_stale_schema_block_is_rewritten(tmp_path: Path) -> None:
    copy = tmp_path / "schema.yaml"
    copy.write_text(SCHEMA.read_text().replace('"samples"', '"samples_old"', 1))
    assert registry.write_schema(copy) is True
    assert copy.read_text() == SCHEMA.read_text()


def test_the_shipped_config_enables_every_method_at_its_defaults() -> None:
    methods = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["methods"]
    assert methods["enabled"] == list(registry.METHODS)
    for name, method in registry.METHODS.items():
        if method.options:
            assert methods[name] == registry.defaults(name), name


def test_the_docs_name_every_method_and_default() -> None:
    readme = (REPO / "README.md").read_text()
    config_readme = (REPO / "config" / "README.md").read_text()
    enabled_row = next(line for line in config_readme.splitlines()
                       if line.startswith("| `methods.enabled`"))
    for name, method in registry.METHODS.items():
        assert f"`{name}`" in readme, f"README's method table lacks {name}"
        assert re.search(rf"\b{name}\b", enabled_row), f"config/README: methods.enabled, {name}"
        for option, spec in method.options.items():
            row = next((line for line in config_readme.splitlines()
                        if line.startswith(f"| `methods.{name}.") and option in line), None)
            assert row is not None, f"config/README has no row for methods.{name}.{option}"
            default = spec.default if not isinstance(spec.default, bool) else str(spec.default)
            assert f"{default}" in row, f"config/README: methods.{name}.{option} = {default}"


def test_every_method_resolves_to_its_function_and_explain_dispatches_them_all() -> None:
    from cnnviz.methods import explain
    from cnnviz.report.captions import METHODS as CAPTIONS
    from cnnviz.report.collect import METHOD_ORDER

    assert list(explain.METHODS) == list(registry.METHODS) == METHOD_ORDER
    assert list(CAPTIONS) == list(registry.METHODS)
    for method in registry.METHODS.values():
        assert callable(registry.resolve(method.run)), method.run
        if method.family:
            assert method.run == registry.FAMILIES[method.family]
    assert registry.CAM_FAMILY[:3] == ("gradcam", "gradcampp", "layercam")


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_routed_options_are_exactly_what_changes_the_maps(method: str) -> None:
    """The workflow passes a method its target, its fallback only when it runs the engine, the
    CAM layer only when it reads it, and its own section with every default filled in."""
    config = {"target": "top1", "cam_layer": "auto", method: {}}
    options = registry.method_options(config, "error", method)
    spec = registry.METHODS[method]
    assert options["target"] == "top1"
    assert ("gradient_fallback" in options) == spec.gradient
    assert ("cam_layer" in options) == spec.cam_layer
    expected = {"target", *(["gradient_fallback"] if spec.gradient else []),
                *(["cam_layer"] if spec.cam_layer else []), *spec.options}
    assert set(options) == expected
    for name, option in spec.options.items():
        assert options[name] == option.default


def test_a_config_value_overrides_the_default() -> None:
    options = registry.method_options(
        {"target": "top1", "cam_layer": "auto", "smoothgrad": {"samples": 3}}, "error",
        "smoothgrad",
    )
    assert options["samples"] == 3 and options["noise_level"] == 0.15


def test_the_snakefile_and_the_schema_reject_an_unknown_method() -> None:
    from cnnviz.config import config_errors

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["methods"]["enabled"] = ["gradcam", "eigencamm"]
    config["metrics"] = {"methods": ["projections"]}
    errors = config_errors(config, SCHEMA)
    assert any("eigencamm" in e for e in errors), errors
    assert any("projections" in e for e in errors), errors
