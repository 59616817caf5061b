"""Noise paths: how a clean latent x0 and noise ε become the model input x_t, what the model is
trained to predict there, and which time value the model is fed. Kept apart from the networks:
the same transformer class serves both paths."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from dusa_cli.errors import ConfigError, did_you_mean


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t as (B, 1, …, 1) on x's device, so a scalar or a (B,) vector broadcasts over samples."""
    t = torch.as_tensor(t, device=like.device)
    return t.reshape(-1, *[1] * (like.ndim - 1))


class NoisePath(ABC):
    name: str
    default_timestep: float  # the fixed DUSA timestep on this path

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x_t for clean x0, standard-normal noise and path time t (scalar or one per sample)."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model predicts at x_t."""

    def model_time(self, t: torch.Tensor | float) -> torch.Tensor:
        """The time value the network was trained to receive for path time t (unscaled)."""
        return torch.as_tensor(t).float()

    @abstractmethod
    def check_time(self, t: float) -> None:
        """ConfigError unless t is a valid time on this path."""

    def check_range(self, low: float, high: float) -> None:
        """ConfigError unless every time drawn from [low, high) is valid on this path."""
        self.check_time(low)
        self.check_time(high)


class DDPMPath(NoisePath):
    """DiT/ADM Gaussian diffusion: linear betas 1e-4…0.02 over 1000 steps, ε-prediction,
    integer steps fed to the model as they are (docs/research/dusa_official.md §1.2)."""

    name = "ddpm"
    num_steps = 1000
    default_timestep = 100  # DUSA's fixed t (dusa_official.md §1.4 step 7)

    def __init__(self) -> None:
        # Computed in float64 and used as float32, as ADM builds its tables and extracts from them.
        betas = torch.linspace(1e-4, 0.02, self.num_steps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.coefficients = torch.stack([alphas_cumprod, alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()]).float()
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _lookup(self, t: torch.Tensor | float) -> torch.Tensor:
        """(ᾱ, √ᾱ, √(1−ᾱ)) at steps t as (3, …), looked up on t's device: a step never waits
        for the GPU to hand t back to the host."""
        steps = self._step(t)
        table = self._tables.get(steps.device)
        if table is None:
            table = self._tables[steps.device] = self.coefficients.to(steps.device)
        return table[:, steps]

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        return self._lookup(t)[0]

    @staticmethod
    def _step(t: torch.Tensor | float) -> torch.Tensor:
        """Integer steps; a fractional t (e.g. drawn from [100, 101)) is truncated, the same way
        for the noise level and the model time."""
        return torch.as_tensor(t).long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        _, signal, noise_level = (_per_sample(c, x0).to(x0.dtype) for c in self._lookup(t))
        return signal * x0 + noise_level * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_time(self, t: torch.Tensor | float) -> torch.Tensor:
        return self._step(t).float()

    def check_time(self, t: float) -> None:
        if t != int(t) or not 0 <= t < self.num_steps:
            raise ConfigError(f"ddpm timestep must be an integer in [0, {self.num_steps}), got {t}")

    def check_range(self, low: float, high: float) -> None:
        self.check_time(low)
        self.check_time(math.ceil(high) - 1)  # the last step a draw from [low, high) truncates to


class LinearFlowPath(NoisePath):
    """REPA/SiT linear interpolant x_t = (1−t)·x0 + t·ε, t ∈ [0, 1] (0 = data), velocity target
    ε − x0, continuous t fed to the model unscaled (docs/research/peers.md §C)."""

    name = "linear"
    # [A] About the signal-to-noise ratio of DDPM t=100 (x_t ≈ 0.946·x0 + 0.324·ε, §1.2):
    # t/(1−t) = 0.324/0.946 gives t ≈ 0.255; the round 0.25 is 3 % less noise per unit signal.
    default_timestep = 0.25

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = _per_sample(t, x0).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def check_time(self, t: float) -> None:
        if not 0 <= t <= 1:
            raise ConfigError(f"linear flow time must lie in [0, 1] (0 = data, 1 = noise), got {t}")


class SD3FlowPath(LinearFlowPath):
    """Stable Diffusion 3's rectified flow (diffusers FlowMatchEulerDiscreteScheduler): the same
    interpolant and velocity target as `linear` with σ as path time (σ = 1 noise, σ = 0 data),
    but the transformer is fed 1000·σ (docs/research/peers.md §D)."""

    name = "sd3_flow"
    # [A] σ with about the SNR of DDPM t=100, the fixed timestep of the official DUSA-seg on SD 1.5
    # (docs/research/dusa_official.md §3.5); see LinearFlowPath for the arithmetic. Used as σ directly:
    # the scheduler's `shift` maps sampling steps to σ, and DUSA samples no steps.
    default_timestep = 0.25

    def model_time(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(t).float() * 1000


PATHS: dict[str, type[NoisePath]] = {path.name: path for path in (DDPMPath, LinearFlowPath, SD3FlowPath)}


def create_path(name: str) -> NoisePath:
    if name not in PATHS:
        raise ConfigError(f"unknown noise path '{name}'{did_you_mean(name, PATHS)} (available: {', '.join(PATHS)})")
    return PATHS[name]()
