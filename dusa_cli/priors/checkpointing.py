"""Activation checkpointing of a prior's transformer blocks: every block, none, or only the
first N (selective checkpointing: each recomputed block frees its activations for the backward
pass at the cost of one more forward of that block, so N trades memory for recompute)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from dusa_cli.errors import ConfigError

# A method's `gradient_checkpointing` setting: true (every block), false, or how many leading blocks.
Checkpointing = bool | int


def checkpointed_blocks(setting: Checkpointing, depth: int) -> int:
    """How many leading blocks of a `depth`-block transformer `setting` recomputes."""
    count = depth if setting is True else int(setting)
    if not 0 <= count <= depth:
        raise ConfigError(f"gradient_checkpointing {setting} is outside 0..{depth}, the prior's number of blocks")
    return count


def parse_checkpointing(text: str) -> Checkpointing:
    """`all` (every block of the prior) or `N` (the first N), as the bench flags spell it."""
    if text == "all":
        return True
    if text.isdecimal():
        return int(text)
    raise ConfigError(f"checkpointing takes 'all' or a number of blocks, got '{text}'")


def describe(setting: Checkpointing) -> str:
    """'all', 'no' or the number of checkpointed blocks: for tables."""
    if isinstance(setting, bool):
        return "all" if setting else "no"
    return str(setting) if setting else "no"


def checkpoint_only(blocks: Sequence[nn.Module]) -> Callable[..., Any]:
    """A diffusers `gradient_checkpointing_func` that recomputes `blocks` and runs any other block
    plainly (diffusers' default checkpoints them all). The block's `__call__` is checkpointed, so
    its hooks (model-parallel input moves, priors/split.py) run again in the recompute."""
    chosen = {id(block) for block in blocks}

    def run(block: nn.Module, *args: Any) -> Any:
        if id(block) in chosen:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    return run
