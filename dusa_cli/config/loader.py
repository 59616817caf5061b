"""Load a YAML preset, apply command-line overrides, validate into an ExperimentConfig."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from dusa_cli.config.schema import REQUIRED, ExperimentConfig, format_problems, validation_problems
from dusa_cli.errors import ConfigError

if TYPE_CHECKING:
    from dusa_cli.methods.base import TTAMethod


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder: name the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a regular file" if path.exists() else f"config file not found: {path}")
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


# The run commands' flags and the key each overrides (`--num-ex` → data.num_ex).
FLAG_KEYS = {
    "--task": "task", "--model": "model.name", "--checkpoint": "model.checkpoint", "--data": "data.root",
    "--corruption": "data.corruptions", "--severity": "data.severities", "--num-ex": "data.num_ex",
    "--setting": "run.setting", "--seed": "run.seed", "--output": "run.output", "--method": "method.name",
    "--prior": "method.prior", "--prior-checkpoint": "method.prior_checkpoint", "--vae": "method.vae",
    "--compile": "run.compile", "--profile": "run.profile", "--track": "run.track",
}  # fmt: skip
KEY_FLAGS = {key: flag for flag, key in FLAG_KEYS.items()}

# A weights file given on the command line replaces the packaged weights a preset asks for: the
# file is what loads, and the run's config.yaml says so (the `pretrained` key turned off).
PACKAGED_WEIGHTS = {"model.checkpoint": "model.pretrained", "method.prior_checkpoint": "method.prior_pretrained"}


def load_config(
    path: Path | None,
    overrides: dict[str, Any],
    assignments: list[str] | None = None,
    runs: Callable[[type[TTAMethod]], bool] | None = None,
) -> ExperimentConfig:
    """Preset < flag overrides < `--set` assignments; errors name the key and the file. `runs`:
    the methods the caller runs, which an unknown method's error offers (default: all)."""
    data = read_preset(path) if path is not None else {}
    assigned = [parse_assignment(assignment) for assignment in assignments or []]
    for dotted, value in [*overrides.items(), *assigned]:
        if dotted == "method.name":  # `--method tent` and `--set method.name=tent` alike
            data["method"] = _options_for(value, data.get("method"))
        set_path(data, dotted, value)
    given = {key: _as_given(key, value) for key, value in overrides.items()}
    given |= {dotted: f"--set {text.strip()}" for (dotted, _), text in zip(assigned, assignments or [])}
    for file_key, packaged_key in PACKAGED_WEIGHTS.items():
        if file_key in given and _lookup(data, file_key) is not None and _lookup(data, packaged_key) is True:
            if packaged_key in given:
                raise ConfigError(f"{given[file_key]} and {given[packaged_key]} both choose the weights: give one of them")
            set_path(data, packaged_key, False)
    try:
        return ExperimentConfig.model_validate(data, context={"runs": runs})
    except ValidationError as error:
        problems = validation_problems(error, ExperimentConfig)
        shown = [("", _required(location)) if text == REQUIRED else (location, text) for location, text in problems]
        message = f"{_blame(path, [location for location, _ in problems], given)}: {format_problems(shown)}"
        if path is None and any(text == REQUIRED for _, text in problems):
            example = "seg/ade20k_c_segformer_b5.yaml" if data.get("task") == "seg" else "cls/digits.yaml"
            message += f"; or start from a preset: -c configs/{example} (more in configs/)"
        raise ConfigError(message) from None


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    """The value at `a.b.c` in a raw config (None where it has none)."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _as_given(key: str, value: Any) -> str:
    """An override as the command line gave it: `--task seg`, `--corruption fog,snow`, `--profile`."""
    flag = KEY_FLAGS.get(key)
    if flag is None:  # not a flag's key (a caller's own override)
        return f"{key}={value}"
    if value is True:  # a flag that takes no value (--profile)
        return flag
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def _required(key: str) -> str:
    flag = KEY_FLAGS.get(key)
    return f"{key} is required" + (f" ({flag})" if flag else "")


def saved_run_config(overrides: dict[str, Any], assignments: list[str] | None = None) -> tuple[Path | None, Path]:
    """The config.yaml of the run in the output these settings name (`--set run.output` wins
    over `-o`, as in load_config; else the default output), if it holds one, and that output."""
    from dusa_cli.config.schema import RunConfig
    from dusa_cli.data.files import absolute_path

    settings = [*overrides.items(), *(parse_assignment(assignment) for assignment in assignments or [])]
    outputs = [value for key, value in settings if key == "run.output" and value not in (None, "")]
    output = Path(str(outputs[-1])) if outputs else RunConfig.model_fields["output"].default
    saved = absolute_path(output) / "config.yaml"
    return (saved if saved.is_file() else None), output


# Keys that decide what other parts of the config mean: `--task seg` makes data ADE20K-C's
# section, a method's name its options' (and both decide whether the method serves the task).
SCHEMA_KEYS = {"task": ("data", ""), "method.name": ("method", "")}


def _blame(path: Path | None, locations: list[str], given: dict[str, str]) -> str:
    """Where the bad values came from: the command line where it set each of them, the preset
    file where no flag touched them, else the file with the flags that set or reinterpreted some
    (`configs/cls/digits.yaml with --task seg`: the file's batch size is wrong for segmentation)."""

    def within(location: str, key: str) -> bool:  # `key` is the location or a section holding it ("": the whole config)
        return f"{location}.".startswith(f"{key}.")

    sections = [re.sub(r"(\.\d+)+$", "", location) for location in locations]  # run.compile.0: the list itself
    set_by = [
        [key for key in given if within(location, key) or key.startswith(f"{section}.")]
        for location, section in zip(locations, sections)
    ]  # the keys given for each location, or inside it
    if path is None or all(set_by):
        # The flags behind the values, as typed (`--seed -1`); a --set is not: the message names its key.
        touched = dict.fromkeys(key for keys in set_by for key in keys)
        flags = [given[key] for key in touched if key in KEY_FLAGS and not given[key].startswith("--set ")]
        return f"command line ({' '.join(flags)})" if flags else "command line"
    involved = [
        key for key in given
        if any(key in keys or any(within(location, part) for part in SCHEMA_KEYS.get(key, ())) for location, keys in zip(locations, set_by))
    ]  # fmt: skip
    return f"{path} with {' '.join(given[key] for key in involved)}" if involved else str(path)


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
