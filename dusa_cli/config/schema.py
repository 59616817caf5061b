"""The run configuration: pydantic models parsed from YAML presets plus command-line overrides.

Every model forbids unknown keys so a typo in a preset is an error naming the key, not a
silently ignored setting. Method-specific options are validated by the method's own config
class, looked up in the method registry (the schema knows no method by name).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dusa_cli.data.corruptions import check_severities, resolve_corruptions
from dusa_cli.data.files import absolute_path
from dusa_cli.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from dusa_cli.methods.base import TTAMethod

T = TypeVar("T")


REQUIRED = "required"  # a missing key's message: the command line names what gives it (config/loader.py)


DOTTED_KEY = re.compile(r"\w+(\.\w+)+: ")  # a message that starts with the key it is about

# pydantic's errors for a value that is not a number, by what the key takes: said with the value.
NUMBER_ERRORS = {
    "int_parsing": "an integer", "int_from_float": "an integer", "int_type": "an integer",
    "float_parsing": "a number", "float_type": "a number",
}  # fmt: skip


def validation_problems(error: ValidationError, model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(location, message) per pydantic error of validating `model`. Errors that a nested config
    re-raised as text (data, method) already carry their location: it is taken from the text.
    A missing section is named by the keys it lacks (`model` → `model.name`), and a section
    given a value by what it takes, not by pydantic's class names."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        if item["type"] == "missing":
            problems += [(".".join(filter(None, (prefix, key))), REQUIRED) for key in _required_keys(model, item["loc"])]
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _guess_key(model, item["loc"], prefix)
            if ":" in str(item["loc"][-1]):  # `{mse:0}`: YAML reads one key "mse:0"
                key, _, value = str(item["loc"][-1]).partition(":")
                message += f" (YAML needs a space after the colon: {{{key}: {value}}})"
        elif item["type"] == "model_type":
            message = f"expected a section (a mapping of its keys), got {item['input']!r}"
        elif item["type"] in NUMBER_ERRORS:
            message = f"expected {NUMBER_ERRORS[item['type']]}, got {item['input']!r}"
        else:
            message = item["msg"].removeprefix("Value error, ")
        # A nested config's error names its key, and so may a whole-config check (`optim.accumulation: …`).
        if message.startswith((f"{location}.", f"{location}: ")) if location else DOTTED_KEY.match(message):
            location, _, message = message.partition(": ")
            if message == "unknown key":  # a section checked on its own (method, data) knows only its keys
                message += _guess_key(model, tuple(location.removeprefix(f"{prefix}.").split(".")), prefix)
        problems.append((location, message))
    return problems


def format_problems(problems: list[tuple[str, str]]) -> str:
    """One line: `a.b: message; c: message`."""
    return "; ".join(f"{location}: {message}" if location else message for location, message in problems)


def format_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    return format_problems(validation_problems(error, model, prefix))


def _guess_key(model: type[BaseModel], location: tuple[int | str, ...], prefix: str) -> str:
    """`, did you mean 'optim.lr'?` for an unknown key of `model`: the closest key of its section
    (a typo), else the same key in another section (`seed` → `run.seed`); empty if neither."""
    *section, key = (str(part) for part in location)
    keys = _dotted_keys(model)
    here = ".".join(section)
    siblings = {dotted.rpartition(".")[2]: dotted for dotted in keys if dotted.rpartition(".")[0] == here}
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    guess = siblings[close[0]] if close else next((dotted for dotted in keys if dotted.rpartition(".")[2] == key), None)
    return f", did you mean '{'.'.join(filter(None, (prefix, guess)))}'?" if guess else ""


def _required_keys(model: type[BaseModel], location: tuple[int | str, ...]) -> list[str]:
    """The keys that a missing `location` of `model` lacks: itself, or for a section the
    required keys in it."""
    section: type[BaseModel] | None = model
    for part in location:
        field = section.model_fields.get(str(part)) if section is not None else None
        section = next((m for m in _alternatives(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)), None) if field else None
    inside = [] if section is None else [
        key for name, field in section.model_fields.items() if field.is_required() for key in _required_keys(model, (*location, name))
    ]  # fmt: skip
    return inside or [".".join(str(part) for part in location)]


def _dotted_keys(model: type[BaseModel], section: str = "") -> list[str]:
    """Every key of the model's tree, sections included: `optim`, `optim.lr`, …"""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{section}{name}"
        keys.append(dotted)
        for nested in _alternatives(field.annotation):
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                keys += _dotted_keys(nested, f"{dotted}.")
    return keys


def _not_empty(value: Any) -> Any:
    """An empty path would be the working directory, never what was meant (`--set data.root=`
    reads as null)."""
    if value is None or isinstance(value, str) and not value.strip():
        raise ValueError("expected a path, got an empty one")
    return value


# A local file or folder, stored absolute (`~` expanded, symlinks kept): a run's config.yaml names
# the same files from any working directory (`-c RUN/config.yaml`, `--resume` elsewhere), and
# `dusa report` does not split seeds run from different directories.
LocalPath = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(absolute_path)]


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field accepts: `int | None` → [int, NoneType]; Annotated is looked through."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _alternatives(arg)]
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    return [annotation]


def _refuse_boolean(value: Any, accepted: list[Any]) -> None:
    if isinstance(value, bool) and bool not in accepted and any(member in (int, float) for member in accepted):
        number = "a number" if float in accepted else "an integer"
        raise ValueError(f"expected {number}, got the boolean {str(value).lower()} (YAML reads yes/no and on/off as booleans too)")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value: Any, info: ValidationInfo) -> Any:
        """`--set` reads values as YAML: `yes`/`true` are booleans, which pydantic would take as
        1 for a number (`optim.lr=yes` → 1.0): refused. A single value where only a list fits
        (`--set run.track=tensorboard`, `severities: 3`) is a list of one."""
        accepted = [member for member in _alternatives(cls.model_fields[info.field_name].annotation) if member is not type(None)]
        _refuse_boolean(value, accepted)
        if isinstance(value, list):  # `severities: [true]`, `betas: [0.9, yes]` too
            items = [
                alternative for member in accepted if get_origin(member) in (list, tuple)
                for arg in get_args(member) if arg is not Ellipsis for alternative in _alternatives(arg)
            ]  # fmt: skip
            for item in value:
                _refuse_boolean(item, items)
        if value is not None and not isinstance(value, list) and accepted and all(get_origin(member) is list for member in accepted):
            return [value]
        return value


class ModelConfig(StrictModel):
    name: str = Field(
        description="cls: timm model name, e.g. convnext_large.fb_in1k or dusa_digits_resnet; seg: segformer"
    )
    checkpoint: LocalPath | None = Field(
        default=None,
        description="cls: local .pth/.safetensors weights, strict loading; seg: a local transformers "
        "SegFormer directory (from_pretrained)",
    )
    pretrained: bool = Field(
        default=False,
        description="load the weights named by the model's pretrained config from a local file "
        "shipped with the package (never downloaded)",
    )
    random_init: bool = Field(
        default=False,
        description="cls: run the model untrained (random weights), e.g. a smoke test; otherwise a run "
        "needs checkpoint or pretrained",
    )
    num_classes: int | None = Field(default=None, ge=1, description="override the head size")


def _located(check: Callable[[Any], T], value: Any) -> T:
    """`check(value)`, its ConfigError as a ValueError: pydantic adds where in the config it was."""
    try:
        return check(value)
    except ConfigError as error:
        raise ValueError(str(error)) from None


class DataConfig(StrictModel):
    root: LocalPath = Field(description="ImageNet-C layout <corruption>/<severity>/<class>/ or CIFAR-C .npy files")
    corruptions: list[str] = Field(default_factory=lambda: ["all"], validate_default=True)
    severities: list[int] = Field(default_factory=lambda: [5])
    num_ex: int | None = Field(default=None, ge=1, description="fixed subset per task, the same for every seed")
    batch_size: int = Field(default=64, ge=1, description="images per online step (micro-batch)")
    num_workers: int = Field(default=0, ge=0)
    shuffle: bool = Field(default=True, description="shuffle within a task (seeded)")

    @field_validator("corruptions", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> list[str]:
        if value is None:
            raise ValueError("expected a corruption name or a list of them")
        return _located(resolve_corruptions, value if isinstance(value, list) else [value])

    @field_validator("severities")
    @classmethod
    def _severity_range(cls, value: list[int]) -> list[int]:
        return list(_located(check_severities, value))


class SegDataConfig(DataConfig):
    """ADE20K-C: one image per online step, resized so its short side is `short_side`
    (mmseg's Resize(scale=(2048, 512), keep_ratio=True), docs/research/dusa_official.md §3.2)."""

    root: LocalPath = Field(
        description="ADE20K-C: <corruption>/<severity>/validation/ (official) or images/validation/<corruption>_<severity>/"
    )
    annotations: LocalPath | None = Field(
        default=None, description="folder of label PNGs; default ROOT/annotations/validation"
    )
    batch_size: Literal[1] = Field(default=1, description="one image per step (images differ in size)")
    short_side: int = Field(default=512, ge=16, description="the segmenter's input: short side resized to this")
    max_long_side: int = Field(default=2048, ge=8, description="…unless the long side would exceed this")


Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's moment decays


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD's momentum")
    weight_decay: float = Field(default=0.0, ge=0)
    accumulation: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    fused: bool = Field(default=False, description="fused Adam/AdamW kernels (CUDA only)")


class MethodConfig(StrictModel):
    """Base of every method's options; `name` selects the registry entry."""

    name: str


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class RunConfig(StrictModel):
    setting: Literal["reset_each_shift", "continual"] = "reset_each_shift"
    seed: int = Field(default=2024, ge=0, lt=2**63, description="seeds every random draw (a 63-bit key)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast precision (fp16 adds a GradScaler); DUSA segmentation (task seg with a prior) defaults to bf16"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    split_devices: list[str] | None = Field(
        default=None,
        min_length=1,
        description="seg: devices the prior's transformer blocks are split across (model parallelism); "
        "the first also holds the segmenter, the VAE and the prompt cache",
    )
    compile: list[Literal["model", "prior"]] = Field(
        default_factory=list,
        description="networks to torch.compile (a few minutes of compilation first, then faster steps "
        "on a GPU): model = the classifier or segmenter, prior = the generative prior's transformer and VAE encoder",
    )
    compile_mode: CompileMode = Field(
        default="default",
        description="torch.compile mode of run.compile: reduce-overhead and max-autotune also capture CUDA graphs "
        "(less launch overhead), the max-autotune modes search kernels (longer compilation)",
    )
    channels_last: bool = Field(
        default=False, description="convolutional networks and inputs in channels-last memory format (GPU convolutions)"
    )
    profile: bool = Field(
        default=False,
        description="torch.profiler over micro-batches 3-5 of the first task run: OUTPUT/profile/ holds a trace, "
        "an operator table and the time by kind of work",
    )
    track: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="experiment trackers: tensorboard writes each finished task's scores and online curve to "
        "OUTPUT/tensorboard (needs the tensorboard package: pip install tensorboard)",
    )
    output: LocalPath = Field(default=Path("results/run"), validate_default=True)

    @model_validator(mode="after")
    def _mode_needs_something_to_compile(self) -> RunConfig:
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode} has nothing to compile: set run.compile too")
        return self


def fitting_methods(task: str | None, runs: Callable[[type[TTAMethod]], bool]) -> list[str]:
    """The registered methods that serve `task` (None: any) and that `runs` accepts (those a
    command runs), by name."""
    from dusa_cli.methods import available_methods, get_method

    return [name for name in available_methods() if runs(get_method(name)) and (task is None or task in get_method(name).tasks)]


def _uses_prior(method: Any) -> bool:
    """Whether the method a raw config names runs a generative prior (False if it names none)."""
    from dusa_cli.methods import get_method

    name = method.get("name") if isinstance(method, dict) else getattr(method, "name", method)
    try:
        return isinstance(name, str) and get_method(name).uses_prior
    except ValueError:  # an unknown method: the method field's validation says so
        return False


class ExperimentConfig(StrictModel):
    task: Literal["cls", "seg"] = Field(default="cls", description="classification or semantic segmentation")
    model: ModelConfig
    data: SerializeAsAny[DataConfig]
    method: SerializeAsAny[MethodConfig]
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _sd3_prior_defaults_to_bf16(cls, data: Any) -> Any:
        """Segmentation with an SD3-sized prior (DUSA-seg) runs in bf16 unless the config says
        otherwise (seed 001); segmentation baselines keep fp32, as the official runner's."""
        if isinstance(data, dict) and data.get("task") == "seg" and _uses_prior(data.get("method")):
            run = data.get("run") if isinstance(data.get("run"), dict) else {}
            if "precision" not in run and not isinstance(data.get("run"), RunConfig):
                data = data | {"run": run | {"precision": "bf16"}}
        return data

    @field_validator("data", mode="before")
    @classmethod
    def _data_for_task(cls, value: Any, info: ValidationInfo) -> DataConfig:
        if isinstance(value, DataConfig):
            return value
        schema = SegDataConfig if info.data.get("task") == "seg" else DataConfig
        try:
            return schema.model_validate(value)
        except ValidationError as error:
            raise ValueError(format_validation_error(error, schema, prefix="data")) from None

    @model_validator(mode="after")
    def _method_fits_experiment(self) -> ExperimentConfig:
        from dusa_cli.methods import get_method

        method = get_method(self.method.name)
        if self.task not in method.tasks:
            raise ValueError(f"method '{self.method.name}' serves task {'/'.join(sorted(method.tasks))}, not {self.task}")
        if not method.accumulates and self.optim.accumulation > 1:
            raise ValueError(
                f"optim.accumulation: method '{self.method.name}' learns from whole batches, so it must be 1 "
                f"(got {self.optim.accumulation}); set data.batch_size instead"
            )
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method_options(cls, value: Any, info: ValidationInfo) -> MethodConfig:
        from dusa_cli.methods import available_methods, get_method

        if isinstance(value, MethodConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and "name" not in value:  # `--set method.lr=…` alone
            raise ValueError(f"method.name: {REQUIRED}")
        if not isinstance(value, dict):
            raise ValueError("expected a method name or a mapping with one, e.g. {name: tent}")
        runs = (info.context or {}).get("runs")
        if runs is not None and value["name"] not in available_methods():  # offer what the caller runs
            offered = fitting_methods(info.data.get("task"), runs)
            raise ValueError(f"unknown method '{value['name']}'{did_you_mean(value['name'], offered)} (available: {', '.join(offered)})")
        try:
            schema = get_method(value["name"]).Config
            return schema.model_validate(value)
        except ValidationError as error:  # re-raised flat so the location names the method key
            raise ValueError(format_validation_error(error, schema, prefix="method")) from None
