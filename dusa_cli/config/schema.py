"""The run configuration: pydantic models parsed from YAML presets plus command-line overrides.

Every model forbids unknown keys so a typo in a preset is an error naming the key, not a
silently ignored setting. Method-specific options are validated by the method's own config
class, looked up in the method registry (the schema knows no method by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from dusa_cli.data.corruptions import resolve_corruptions


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per pydantic error list: `a.b: message; c: message`."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    name: str = Field(description="timm model name, e.g. convnext_large.fb_in1k or dusa_digits_resnet")
    checkpoint: Path | None = Field(
        default=None, description="local .pth/.safetensors weights; strict loading"
    )
    pretrained: bool = Field(
        default=False,
        description="load the weights named by the model's pretrained config from a local file "
        "shipped with the package (never downloaded)",
    )
    num_classes: int | None = Field(default=None, description="override the head size")


class DataConfig(StrictModel):
    root: Path = Field(description="ImageNet-C layout <corruption>/<severity>/<class>/ or CIFAR-C .npy files")
    corruptions: list[str] = Field(default_factory=lambda: ["all"])
    severities: list[int] = Field(default_factory=lambda: [5])
    num_ex: int | None = Field(default=None, ge=1, description="deterministic subset per task")
    batch_size: int = Field(default=64, ge=1, description="images per online step (micro-batch)")
    num_workers: int = Field(default=0, ge=0)
    shuffle: bool = Field(default=True, description="shuffle within a task (seeded)")

    @field_validator("corruptions", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        return resolve_corruptions(value)

    @field_validator("severities")
    @classmethod
    def _severity_range(cls, value: list[int]) -> list[int]:
        if not value or any(s not in range(1, 6) for s in value):
            raise ValueError("severities must be a non-empty list of integers 1..5")
        return value


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    accumulation: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    fused: bool = Field(default=False, description="fused Adam/AdamW kernels (CUDA only)")


class MethodConfig(StrictModel):
    """Base of every method's options; `name` selects the registry entry."""

    name: str


class RunConfig(StrictModel):
    setting: Literal["reset_each_shift", "continual"] = "reset_each_shift"
    seed: int = 2024
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    output: Path = Path("results/run")


class ExperimentConfig(StrictModel):
    task: Literal["cls"] = "cls"
    model: ModelConfig
    data: DataConfig
    method: SerializeAsAny[MethodConfig]
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method_options(cls, value: Any) -> MethodConfig:
        from dusa_cli.methods import get_method

        if isinstance(value, MethodConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("method needs a 'name'")
        try:
            return get_method(value["name"]).Config.model_validate(value)
        except ValidationError as error:  # re-raised flat so the location names the method key
            raise ValueError(format_validation_error(error, prefix="method")) from None
