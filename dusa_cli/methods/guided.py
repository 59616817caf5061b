"""What the diffusion-guided methods (DUSA for classification and for segmentation) share: the
timestep they noise at, whether the prior adapts, and activation checkpointing."""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeInt, model_validator

from dusa_cli.config.schema import MethodConfig
from dusa_cli.priors.paths import NoisePath


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
            raise ValueError("set either timestep or timestep_range, not both")
        if self.timestep_range is not None and not self.timestep_range[0] < self.timestep_range[1]:
            raise ValueError(f"timestep_range [lo, hi) needs lo < hi, got {list(self.timestep_range)}")
        return self

    def check_timestep(self, path: NoisePath) -> None:
        """A DDPM step on a flow path (or the reverse) would run silently at a meaningless noise
        level, and a range past the path's end would fail mid-run: ConfigError."""
        if self.timestep is not None:
            path.check_time(self.timestep)
        elif self.timestep_range is not None:
            path.check_range(*self.timestep_range)


def draw_timestep(config: GuidedConfig, path: NoisePath, batch: int, device: torch.device) -> torch.Tensor:
    """One timestep shared by the whole step, as the official code draws it (§1.4.7), as (batch,)."""
    if config.timestep_range is not None:
        low, high = config.timestep_range
        return (low + (high - low) * torch.rand((), device=device)).expand(batch)
    # Filled on the device: a tensor built from a Python number would be a blocking host copy.
    return torch.full((batch,), config.timestep if config.timestep is not None else path.default_timestep, device=device)
