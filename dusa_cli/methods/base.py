"""What every test-time adaptation method provides to the engine.

A method configures the model for adaptation, names the parameters it updates, and defines one
forward pass that returns the logits used for the online prediction and, if it adapts by
gradient, the loss. The engine owns the optimizer, precision, accumulation, resets and metrics,
so a method reads like the official Tent: configure, collect, forward.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dusa_cli.collectives import all_reduce_
from dusa_cli.config.schema import MethodConfig
from dusa_cli.draws import Draws
from dusa_cli.errors import ConfigError


@dataclass
class StepOutput:
    logits: torch.Tensor  # predictions from the pre-update forward pass
    loss: torch.Tensor | None = None  # None: nothing to back-propagate
    backpropagated: bool = False  # the method already sent `loss` back in parts through `backward`


# torch.compile modes whose compiled networks replay recorded CUDA graphs (on CUDA devices).
CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


class TTAMethod:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    uses_prior: ClassVar[bool] = False  # adapt-cls/adapt-seg run methods with a generative prior, baseline the rest
    trains: ClassVar[bool] = True  # False: gradient-free (the optimizer settings do not apply)
    tasks: ClassVar[frozenset[str]] = frozenset({"cls", "seg"})  # "cls": logits (B, C); "seg": (B, C, h, w)
    # False: the loss does not split over a batch's micro-batches (RoTTA learns from its memory
    # bank), so `optim.accumulation` must be 1.
    accumulates: ClassVar[bool] = True
    captures_cudagraphs: bool = False  # compiled in a mode that records CUDA graphs (see `compile`)

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config
        # The engine's loss back-propagation (loss scaling, accumulation, shard share). A method
        # whose loss is too big for one graph calls it once per part and returns `backpropagated`.
        self.backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
        # Empties the engine's optimizer state (moments), for a method that puts its weights back
        # to the source mid-task (SAR's recovery).
        self.restart_optimizer: Callable[[], None] = lambda: None
        # Where random draws come from; the engine sets per-image streams for each step (dusa_cli/draws.py).
        self.draws: Draws = Draws()
        self.configure_model()

    @classmethod
    def caveats(cls, config: MethodConfig) -> list[str]:
        """How these options depart from the method as its paper defines it: each is printed as a
        warning before a run starts."""
        return []

    def configure_model(self) -> None:
        """Default: a frozen model in eval mode."""
        self.model.eval()
        self.model.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        """Every network the method runs (moved to the device by the engine)."""
        return {"model": self.model}

    def to(self, device: torch.device) -> TTAMethod:
        for module in self.modules().values():
            module.to(device)
        return self

    def place(self, devices: list[torch.device]) -> TTAMethod:
        """Put the networks on the run's devices: all on the first unless a method splits a model."""
        return self.to(devices[0])

    def compilable(self) -> dict[str, list[nn.Module]]:
        """What `compile` can compile, by the names of `run.compile`."""
        return {"model": [self.model]}

    def compile(self, parts: Collection[str], mode: str = "default") -> None:
        """torch.compile the named networks in place: parameter names, and so the optimizer and
        the state dicts, stay as they are. Call after `place` (a split prior exists only then)."""
        networks = self.compilable()
        unknown = sorted(set(parts) - networks.keys())
        if unknown:
            raise ConfigError(
                f"run.compile: method {self.name} has no {', '.join(unknown)} to compile (it has: {', '.join(networks)})"
            )
        for part in parts:
            for network in networks[part]:
                network.compile(mode=mode)
        self.captures_cudagraphs = bool(parts) and mode in CUDAGRAPH_MODES

    def use_channels_last(self) -> None:
        """Every network's 4-D weights in channels-last memory format (the engine converts the
        inputs): cuDNN's faster NHWC convolution kernels under autocast."""
        for module in self.modules().values():
            module.to(memory_format=torch.channels_last)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (none for gradient-free methods)."""
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the engine after each optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a reset restores (the engine adds optimizer, scaler and RNG)."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_parameters(model: nn.Module, layers: tuple[type[nn.Module], ...] = NORM_LAYERS) -> list[nn.Parameter]:
    """Affine parameters of BatchNorm, LayerNorm (incl. timm's LayerNorm2d) and GroupNorm layers."""
    return [
        param
        for module in model.modules()
        if isinstance(module, layers)
        for param in (module.weight, module.bias)
        if param is not None
    ]


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm normalise with the current test batch's statistics (Tent/BN-adapt).

    The model stays in eval mode otherwise, so stochastic layers (dropout, drop-path 0.5 in
    ConvNeXt-L) stay off. Running statistics are dropped, as the official Tent does.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.train()
        module.track_running_stats = False
        module.running_mean = None
        module.running_var = None
    return norms


class UpdateTotals:
    """Per-sample values a method sums over an update's micro-batches, with their count, read in
    `after_step` summed over every process. That is the place for the collective: every process
    calls `after_step`, while one without images in a micro-batch never calls `forward`."""

    def __init__(self, width: int):
        self.width = width
        self.sums: torch.Tensor | None = None  # the values' sums, then their count

    def add(self, values: torch.Tensor) -> None:
        """This process's samples of a micro-batch: (N, width)."""
        if self.sums is None:
            self.sums = values.new_zeros(self.width + 1)
        self.sums[:-1] += values.sum(dim=0)
        self.sums[-1] += len(values)

    def take(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """The sums and the count over every process's samples since the last take."""
        sums = self.sums if self.sums is not None else torch.zeros(self.width + 1, device=device)
        self.sums = None
        all_reduce_(sums)
        return sums[:-1], float(sums[-1])

    def clear(self) -> None:
        self.sums = None
