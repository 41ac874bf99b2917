"""Config checking with messages that name the key, e.g. `models.m1.weights`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml


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
