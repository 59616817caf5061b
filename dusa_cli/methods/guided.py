"""What the diffusion-guided methods (DUSA for classification and for segmentation) share: the
timestep they noise at, whether the prior adapts, activation checkpointing, which of the adapted
model's parameters train, and what a reset restores."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt, model_validator
from torch import nn

from dusa_cli.config.schema import MethodConfig
from dusa_cli.draws import Draws
from dusa_cli.errors import ConfigError
from dusa_cli.methods.base import TTAMethod, norm_parameters, use_batch_statistics
from dusa_cli.priors.paths import NoisePath

# Which parameters of the classifier or segmenter adapt: all (official), norm-layer affine ones, none.
ModelUpdate = Literal["all", "norm", "none"]


class GuidedConfig(MethodConfig):
    timestep: float | None = Field(
        default=None, description="fixed timestep; default: the prior path's (DDPM 100, flow σ 0.25)"
    )
    timestep_range: tuple[float, float] | None = Field(
        default=None, description="draw one timestep per step uniformly from [lo, hi) instead"
    )
    update_prior: bool = Field(default=True, description="false: frozen prior (freezeDiff ablation)")
    gradient_checkpointing: bool | NonNegativeInt = Field(
        default=False,
        description="recompute the prior's blocks in backward: true (all), false, or N (the first N: less recompute, less memory saved)",
    )

    @model_validator(mode="after")
    def _one_timestep_rule(self) -> GuidedConfig:
        if self.timestep is not None and self.timestep_range is not None:
            raise ValueError("set either timestep or timestep_range, not both (to replace a preset's timestep: --set method.timestep=null)")
        if self.timestep_range is not None and not self.timestep_range[0] < self.timestep_range[1]:
            raise ValueError(f"timestep_range [lo, hi) needs lo < hi, got {list(self.timestep_range)}")
        return self

    def check_timestep(self, path: NoisePath) -> None:
        """A DDPM step on a flow path (or the reverse) would run silently at a meaningless noise
        level, and a range past the path's end would fail mid-run: ConfigError."""
        try:
            if self.timestep is not None:
                path.check_time(self.timestep)
            elif self.timestep_range is not None:
                path.check_range(*self.timestep_range)
        except ConfigError as error:
            key = "timestep" if self.timestep is not None else "timestep_range"
            raise ConfigError(f"method.{key}: {error} (the prior's {path.name} path)") from None


def draw_timestep(config: GuidedConfig, path: NoisePath, batch: int, device: torch.device, draws: Draws) -> torch.Tensor:
    """One timestep shared by the whole step, as the official code draws it (§1.4.7), as (batch,):
    a `timestep_range` draw comes from the micro-batch's stream, the same on every process."""
    if config.timestep_range is not None:
        low, high = config.timestep_range
        return (low + (high - low) * draws.uniform(device)).expand(batch)
    # Filled on the device: a tensor built from a Python number would be a blocking host copy.
    return torch.full((batch,), config.timestep if config.timestep is not None else path.default_timestep, device=device)


class GuidedMethod(TTAMethod):
    """A method whose model adapts through a generative prior that adapts with it. Subclasses set
    `self.prior` through `adopt_prior` and run the model through `run_model`."""

    uses_prior = True
    config: GuidedConfig
    prior: nn.Module  # GenerativePrior or SD3Prior: `path`, `trainable_parameters()`, `transformer`

    def adapt_model(self, which: ModelUpdate, batch_statistics: bool) -> None:
        """After the base class froze the model (eval mode: no dropout or drop-path): `which`
        parameters trainable and, with `batch_statistics`, BatchNorm on the batch's statistics
        (the official runners differ here: see the callers)."""
        if batch_statistics:
            use_batch_statistics(self.model)
        if which == "all":
            self.model.requires_grad_(True)
        elif which == "norm":
            for param in norm_parameters(self.model):
                param.requires_grad_(True)

    def adopt_prior(self, prior: nn.Module) -> GuidedMethod:
        """Use `prior` (on its devices already): frozen but for its trainable part, unless
        `update_prior` is off (the freezeDiff ablation)."""
        self.config.check_timestep(prior.path)
        prior.requires_grad_(False)
        if self.config.update_prior:
            for param in prior.trainable_parameters():
                param.requires_grad_(True)
        self.prior = prior
        return self

    def run_model(self, images: torch.Tensor, fp32: bool) -> torch.Tensor:
        """The model's logits as fp32; with `fp32`, computed outside autocast, as the official code."""
        if fp32:
            with torch.autocast(images.device.type, enabled=False):
                return self.model(images.float()).float()
        return self.model(images).float()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model} | ({"prior": self.prior} if hasattr(self, "prior") else {})

    def state_dict(self) -> dict[str, Any]:
        # The VAE (and SD3's prompts) are frozen: a reset restores the model and the transformer.
        return {"model": self.model.state_dict(), "prior": self.prior.transformer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.prior.transformer.load_state_dict(state["prior"])
