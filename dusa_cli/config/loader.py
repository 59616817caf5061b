"""Load a YAML preset, apply command-line overrides, validate into an ExperimentConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dusa_cli.config.schema import ExperimentConfig, format_validation_error
from dusa_cli.errors import ConfigError


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as a YAML scalar/list (`5`, `true`, `[1,2]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


def load_config(
    path: Path | None, overrides: dict[str, Any], assignments: list[str] | None = None
) -> ExperimentConfig:
    """Preset < flag overrides < `--set` assignments; errors name the key and the file."""
    data = read_yaml(path) if path is not None else {}
    for dotted, value in overrides.items():
        if dotted == "method.name" and data.get("method", {}).get("name") != value:
            data["method"] = {}  # another method: the preset's method options do not apply
        set_path(data, dotted, value)
    for assignment in assignments or []:
        set_path(data, *parse_assignment(assignment))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        source = str(path) if path is not None else "command line"
        raise ConfigError(f"{source}: {format_validation_error(error)}") from None
    except ConfigError as error:
        source = str(path) if path is not None else "command line"
        raise ConfigError(f"{source}: {error}") from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
