"""Online predict-then-adapt steps: precision, loss scaling and gradient accumulation."""

from __future__ import annotations

from typing import Any

import torch

from dusa_cli.collectives import all_reduce_gradients
from dusa_cli.config.schema import OptimConfig
from dusa_cli.draws import Draws
from dusa_cli.engine.runtime import autocast
from dusa_cli.methods import StepOutput, TTAMethod


def build_optimizer(params: list[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    # The fused kernels exist for CUDA tensors only; elsewhere the flag falls back to foreach.
    fused = config.fused and all(p.is_cuda for p in params)
    return optimizer(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused or None)


class OnlineAdapter:
    """Each micro-batch is predicted by the forward pass that also yields the loss; the optimizer
    steps once every `accumulation` micro-batches (docs/research/dusa_official.md §1.6).

    With several processes each one steps on its shard of every micro-batch (or `skip`s an empty
    one), and the gradients are summed over the processes before the optimizer steps.
    """

    def __init__(
        self, method: TTAMethod, optim: OptimConfig, precision: str, device: torch.device, channels_last: bool = False
    ):
        self.method = method
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.accumulation = optim.accumulation
        self.params = method.parameters()
        self.optimizer = build_optimizer(self.params, optim) if self.params else None
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=precision == "fp16" and self.optimizer is not None
        )
        self.pending = 0
        self.loss_factor = 1.0
        self.profiler: Any = None  # a torch.profiler stepped after every micro-batch (run.profile)
        method.backward = self.backward
        method.restart_optimizer = self.restart_optimizer

    def step(self, images: torch.Tensor, share: float = 1.0, draws: Draws | None = None) -> StepOutput:
        """`share`: the images' fraction of the whole micro-batch (1 in a single process). A
        method's loss is a mean over its images, so the share-weighted losses of the shards sum
        to the loss of the whole micro-batch, uneven shards included. `draws`: the images' own
        random streams (default: torch's global stream)."""
        self.loss_factor = share / self.accumulation
        self.method.draws = draws or Draws()
        if self.method.captures_cudagraphs:
            # Each micro-batch is a new iteration for the graphs (torch's cudagraph trees): the
            # previous one's outputs, already consumed, may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            self._own_gradients()
        images = images.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.precision):
            output = self.method.forward(images)
        if output.loss is not None and not output.backpropagated:
            self.backward(output.loss)
        self._count_micro_batch()
        if self.profiler is not None:
            self.profiler.step()
        return output

    def _own_gradients(self) -> None:
        """Gradient buffers of our own before an update's first backward. Otherwise autograd
        keeps a graph's gradient output as `.grad`, in memory that the next micro-batch's replay
        overwrites: wrong accumulated gradients, or an error (pytorch#96693, #169545). A parameter
        that then gets no gradient steps with a zero one (eager runs leave it alone)."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate (a part of) this micro-batch's loss outside autocast, scaled for fp16.
        Every part goes through the same scale, so parts sent back separately (segmentation
        windows) add up to the gradient of their sum (the official code scales only the last
        window, §3.5)."""
        if self.optimizer is None or not loss.requires_grad:
            return
        with torch.autocast(self.device.type, enabled=False):
            self.scaler.scale(loss * self.loss_factor).backward()

    def restart_optimizer(self) -> None:
        """The optimizer's state as built: no moments, no step count."""
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def skip(self) -> None:
        """A micro-batch with no image for this process: it still takes part in the update."""
        self._count_micro_batch()

    def _count_micro_batch(self) -> None:
        # Counted whether or not this process had a loss, so every process steps together.
        if self.optimizer is None:
            return
        self.pending += 1
        if self.pending == self.accumulation:
            self.flush()

    def flush(self) -> None:
        """Apply accumulated gradients. Called at each task's end too, so a partial
        accumulation never leaks into the next task (the official code's quirk, §1.7)."""
        if self.pending == 0 or self.optimizer is None:
            return
        all_reduce_gradients(self.params)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"method": self.method.state_dict(), "scaler": self.scaler.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.scaler.load_state_dict(state["scaler"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
