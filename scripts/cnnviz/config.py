"""Config checking with messages that name the key, e.g. `models.m1.weights`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def config_errors(config: dict[str, Any], schema_path: str | Path) -> list[str]:
    """Every schema violation in `config`, one line each, naming the key and what to do."""
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        lines.append(f"config key {key}: {_explain(error)}")
    return lines


def _explain(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"{error.message}{hint}"
    if error.validator == "enum":
        choices = ", ".join(map(repr, error.validator_value))
        return f"{error.instance!r} is not allowed; use one of {choices}"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{error.message}" + (f" ({description})" if description else "")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's contents; a YAML syntax error names the line and column (Snakemake's own
    message for a --configfile that does not parse says only "not valid JSON or YAML")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be read ({error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        raise ConfigError(
            f"config file {path}, {where}: {error.problem or error.context}"
            + (f"\n    {line}\n    {' ' * mark.column}^" if line else "")
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: a mapping of keys (output, images, models, ...)")
    return data


def check_config_file(path: str | Path, schema_path: str | Path = SCHEMA) -> list[str]:
    """Every problem of a config file: its YAML (with the line), then each schema violation."""
    data = load_config_file(path)
    return config_errors(data, schema_path)


@lru_cache(maxsize=4)
def _schema(schema_path: str) -> dict[str, Any]:
    return yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))


def section_defaults(section: str, schema_path: str | Path = SCHEMA) -> dict[str, Any]:
    """The defaults the schema writes for a top-level config section, nested sections filled
    in too: the one place they are written (a step called without a config, by a test or by
    hand, gets the same values the workflow's validation fills in)."""
    return _defaults(_schema(str(schema_path))["properties"][section])


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    out = dict(node.get("default") or {})
    for key, child in (node.get("properties") or {}).items():
        if child.get("type") == "object" and "properties" in child:
            out[key] = {**_defaults(child), **out.get(key, {})}
        elif "default" in child:
            out.setdefault(key, child["default"])
    return out
