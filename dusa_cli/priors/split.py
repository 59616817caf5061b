"""Model parallelism for the SD3 transformer: contiguous runs of its blocks on several devices
(one process, one device computing at a time), with the diffusers forward left untouched.

Forward pre-hooks move each module's tensor inputs onto its device; `.to()` is differentiable,
so autograd carries the gradients back across devices, and the hooks also fire inside diffusers'
gradient checkpointing (it checkpoints `block.__call__`)."""

from __future__ import annotations

from functools import partial
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from dusa_cli.errors import ConfigError


def module_bytes(module: nn.Module) -> int:
    return sum(tensor.nbytes for tensor in (*module.parameters(), *module.buffers()))


# A parameter that trains holds its weights, its gradient and Adam's two moments.
TRAINING_COPIES = 4


def training_bytes(module: nn.Module) -> int:
    """What a module keeps on its device while adapting: trainable parameters four times over,
    frozen ones and buffers once (activations come on top, roughly in proportion)."""
    parameters = sum(p.nbytes * (TRAINING_COPIES if p.requires_grad else 1) for p in module.parameters())
    return parameters + sum(buffer.nbytes for buffer in module.buffers())


def balance_blocks(block_bytes: list[int], num_devices: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Start index of each device's contiguous run of blocks, minimising the largest per-device
    total, where device 0 also carries `first_extra` bytes and the last device `last_extra`.
    Every device gets at least one block unless there are more devices than blocks."""
    if num_devices < 1:
        raise ConfigError(f"model-parallel placement needs at least one device, got {num_devices}")
    num_blocks = len(block_bytes)
    min_run = 1 if num_blocks >= num_devices else 0
    prefix = [0, *accumulate(block_bytes)]

    def load(device: int, start: int, end: int) -> int:
        extra = (first_extra if device == 0 else 0) + (last_extra if device == num_devices - 1 else 0)
        return prefix[end] - prefix[start] + extra

    # best[d][end]: the smallest possible maximum load when devices 0..d hold blocks [0, end);
    # start[d][end]: where device d's run begins in that optimum; on ties the latest start, so
    # that earlier devices fill first and only trailing devices can end up empty.
    infinity = float("inf")
    best = [[infinity] * (num_blocks + 1) for _ in range(num_devices)]
    start = [[0] * (num_blocks + 1) for _ in range(num_devices)]
    for end in range(min_run, num_blocks + 1):
        best[0][end] = load(0, 0, end)
    for device in range(1, num_devices):
        for end in range(num_blocks + 1):
            for begin in range(end - min_run + 1):
                value = max(best[device - 1][begin], load(device, begin, end))
                if value <= best[device][end]:
                    best[device][end], start[device][end] = value, begin

    starts, end = [0] * num_devices, num_blocks
    for device in range(num_devices - 1, 0, -1):
        starts[device] = end = start[device][end]
    return starts


def check_split(starts: list[int], num_blocks: int, num_devices: int) -> None:
    """ConfigError unless `starts` gives each device a non-empty contiguous run of blocks."""
    if (
        len(starts) != num_devices
        or starts[0] != 0
        or any(later <= earlier for earlier, later in zip(starts, starts[1:]))
        or starts[-1] >= num_blocks
    ):
        raise ConfigError(
            f"split {starts} must list one first-block index per device ({num_devices}), starting at 0 and "
            f"strictly increasing below the number of transformer blocks ({num_blocks})"
        )


def _move_inputs(
    device: torch.device, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return tuple(move(value) for value in args), {key: move(value) for key, value in kwargs.items()}


def _place(module: nn.Module, device: torch.device) -> None:
    module.to(device)
    module.register_forward_pre_hook(partial(_move_inputs, device), with_kwargs=True)


def place_transformer(
    transformer: nn.Module,
    devices: list[torch.device],
    starts: list[int] | None = None,
    first_extra: int = 0,
) -> list[torch.device]:
    """Spread a diffusers SD3Transformer2DModel over `devices`: embedders on the first, block i
    on its run's device, norm_out/proj_out on the last. Runs are balanced by the bytes each part
    holds while adapting (`training_bytes`: set requires_grad first; device 0 also holds
    `first_extra`: VAE, prompt cache, segmenter) unless `starts` is given. Returns the device of
    each block. Call once per transformer (every call adds hooks)."""
    blocks = transformer.transformer_blocks
    embedders = (transformer.pos_embed, transformer.time_text_embed, transformer.context_embedder)
    outputs = (transformer.norm_out, transformer.proj_out)
    if starts is None:
        starts = balance_blocks(
            [training_bytes(block) for block in blocks],
            len(devices),
            first_extra=first_extra + sum(training_bytes(module) for module in embedders),
            last_extra=sum(training_bytes(module) for module in outputs),
        )
    else:
        check_split(starts, len(blocks), len(devices))

    # The embedders consume the caller's inputs, which live on devices[0]: no hooks needed.
    for module in embedders:
        module.to(devices[0])
    ends = [*starts[1:], len(blocks)]
    block_devices = [device for device, begin, end in zip(devices, starts, ends) for _ in range(begin, end)]
    for block, device in zip(blocks, block_devices):
        _place(block, device)
    for module in outputs:
        _place(module, devices[-1])
    return block_devices
