"""Load a YAML preset, apply command-line overrides, validate into an ExperimentConfig."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dusa_cli.config.schema import REQUIRED, ExperimentConfig, format_problems, validation_problems
from dusa_cli.errors import ConfigError


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML{_where(error)}: {getattr(error, 'problem', error)}") from None
    except ValueError as error:  # a tag that cannot build its value (`!!float abc`)
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" (line {mark.line + 1})" if mark else ""


INHERIT_KEY = "inherit"


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset, resolved through `inherit: other.yaml` (relative to the preset's folder)."""
    data = read_yaml(path)
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in seen:
        raise ConfigError(f"{path}: inherit loop through {parent_path}")
    return merge(read_preset(parent_path, (*seen, parent_path)), data)


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as a YAML scalar/list (`5`, `true`, `[1,2]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a tag that cannot build its value (`!!float abc`)
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: say what is wrong with it
            raise ConfigError(f"--set {assignment}: invalid YAML: {getattr(error, 'problem', error)}") from None
        value = raw  # a string YAML cannot read as a scalar (`a: b`), taken as written
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


def _options_for(method: str, options: Any) -> dict[str, Any]:
    """Keep the preset's method options that the newly chosen method also accepts
    (dusa → dusa_u keeps the prior settings; dusa → tent drops them)."""
    from dusa_cli.methods import get_method

    if not isinstance(options, dict):
        return {}
    try:
        accepted = get_method(method).Config.model_fields
    except ValueError:
        return {}  # unknown method: validation reports it
    return {key: value for key, value in options.items() if key in accepted}


def load_config(
    path: Path | None, overrides: dict[str, Any], assignments: list[str] | None = None
) -> ExperimentConfig:
    """Preset < flag overrides < `--set` assignments; errors name the key and the file."""
    data = read_preset(path) if path is not None else {}
    assigned = [parse_assignment(assignment) for assignment in assignments or []]
    for dotted, value in [*overrides.items(), *assigned]:
        if dotted == "method.name":  # `--method tent` and `--set method.name=tent` alike
            data["method"] = _options_for(value, data.get("method"))
        set_path(data, dotted, value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        problems = validation_problems(error, ExperimentConfig)
        given = set(overrides) | {dotted for dotted, _ in assigned}
        shown = [("", _required(location)) if text == REQUIRED else (location, text) for location, text in problems]
        message = f"{_blame(path, [location for location, _ in problems], given)}: {format_problems(shown)}"
        if path is None and any(text == REQUIRED for _, text in problems):
            example = "seg/ade20k_c_segformer_b5.yaml" if data.get("task") == "seg" else "cls/digits.yaml"
            message += f"; or start from a preset: -c configs/{example} (more in configs/)"
        raise ConfigError(message) from None


# The keys without a default, and the flag of every run command that gives each.
REQUIRED_FLAGS = {"model.name": "--model", "data.root": "--data", "method.name": "--method"}


def _required(key: str) -> str:
    flag = REQUIRED_FLAGS.get(key)
    return f"{key} is required" + (f" ({flag})" if flag else "")


def saved_run_config(overrides: dict[str, Any], assignments: list[str] | None = None) -> Path | None:
    """The config.yaml of the run in the output these settings name (`--set run.output` wins
    over `-o`, as in load_config; else the default output), if it holds one."""
    from dusa_cli.config.schema import RunConfig
    from dusa_cli.data.files import absolute_path

    settings = [*overrides.items(), *(parse_assignment(assignment) for assignment in assignments or [])]
    outputs = [value for key, value in settings if key == "run.output" and value not in (None, "")]
    output = Path(str(outputs[-1])) if outputs else RunConfig.model_fields["output"].default
    saved = absolute_path(output) / "config.yaml"
    return saved if saved.is_file() else None


def _blame(path: Path | None, locations: list[str], given: set[str]) -> str:
    """Where the bad values came from: the preset file, the command line or both."""
    sections = [re.sub(r"(\.\d+)+$", "", location) for location in locations]  # run.compile.0: the list itself
    from_command_line = [
        any(location == key or location.startswith(f"{key}.") or key.startswith(f"{section}.") for key in given)
        for location, section in zip(locations, sections)
    ]
    if path is None or all(from_command_line):
        return "command line"
    return f"{path} and command line" if any(from_command_line) else str(path)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"run": {"seed": 1}} → {"run.seed": 1}: configs compared key by key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Config values naming paths that a run writes, not reads (the prompt cache is written if missing).
OUTPUT_KEYS = frozenset({"run.output", "method.prompt_cache"})


def input_paths(config: ExperimentConfig) -> dict[str, Path]:
    """The local paths a run reads, by config key: weights, model and prior folders, the data.
    (Other string values, such as a prior preset's name or a VAE of `none`, are not paths.)"""
    values = flatten(config.model_dump(mode="json")).items()
    named = {key: Path(value) for key, value in values if isinstance(value, str) and key not in OUTPUT_KEYS}
    return {key: path for key, path in named.items() if path.is_absolute()}


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
