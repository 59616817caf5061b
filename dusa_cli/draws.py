"""Where a method's random draws come from.

`Draws` uses torch's global stream, in micro-batch order. `ImageDraws` gives every image its own
stream, keyed by the run's seed, the task and the image's position in the task's (seeded) order,
so an image's noise and sampled classes are the same whatever the micro-batch size, the
accumulation or the number of processes (issue 6: "the same sampled classes given the seed").
A draw shared by a micro-batch (a `timestep_range` timestep) comes from the micro-batch's stream,
keyed by its first image's position: every process's shard of it draws the same value.
"""

from __future__ import annotations

import zlib

import torch

MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): different inputs, unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 29
    return state >> 1


def task_key(seed: int, task: str) -> int:
    """A task's key from the run's seed and its name, not its place in the run's task list: a
    task run alone draws what it draws inside the full list (as the official code re-seeds)."""
    return mix(seed, zlib.crc32(task.encode()))


def micro_batch_key(task: int, first_image: int) -> int:
    """The key of a task's micro-batch that starts at image `first_image` (an image's own key is
    `mix(task, position)`: three values, not two, give an unrelated stream)."""
    return mix(task, first_image, 1)


def sample_without_replacement(weights: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`torch.multinomial(weights, count, replacement=False, generator=generator)`: torch's own
    algorithm (the `count` largest of weights / Exp(1) draws), so the same classes from the same
    stream, without its input checks, which read two values back to the host: a GPU wait per
    call, per image with ImageDraws (the weights here are softmax outputs, valid by construction)."""
    race = weights / torch.empty_like(weights).exponential_(1, generator=generator)
    return race.argmax(dim=-1, keepdim=True) if count == 1 else race.topk(count, dim=-1).indices


class Draws:
    """Torch's global stream (or `generator`): draws depend on how images are batched."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """Standard-normal noise shaped like `like` (B, ...)."""
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def multinomial(self, probabilities: torch.Tensor, count: int) -> torch.Tensor:
        """`count` distinct classes per row of (B, C) probabilities."""
        return sample_without_replacement(probabilities, count, self.generator)

    def permutation(self, count: int, device: torch.device) -> torch.Tensor:
        """A random order of 0..count-1 (one image's choice among its classes)."""
        return torch.randperm(count, generator=self.generator, device=device)

    def uniform(self, device: torch.device) -> torch.Tensor:
        """One U[0, 1) number for the whole micro-batch, as a 0-d tensor on `device` (no host wait)."""
        return torch.rand((), generator=self.generator, device=device)


class ImageDraws(Draws):
    """One stream per image, from its key, and one for the micro-batch (`batch_key`: the same for
    every process's shard of it); each draw of a step uses a fresh sub-stream, so the order of
    draws within a step matters but the batching does not."""

    def __init__(self, keys: list[int], batch_key: int):
        super().__init__()
        self.keys = keys
        self.batch_key = batch_key
        self.calls = 0
        self.generators: dict[torch.device, torch.Generator] = {}

    def _seeded(self, key: int, device: torch.device) -> torch.Generator:
        """The device's generator, seeded for `key`'s sub-stream of the current draw."""
        generator = self.generators.get(device)
        if generator is None:
            generator = self.generators[device] = torch.Generator(device=device)
        return generator.manual_seed(mix(key, self.calls))

    def _per_image(self, device: torch.device):
        self.calls += 1
        for key in self.keys:
            yield self._seeded(key, device)

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        self._check(like.shape[0])
        return torch.stack(
            [torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype) for g in self._per_image(like.device)]
        )

    def multinomial(self, probabilities: torch.Tensor, count: int) -> torch.Tensor:
        self._check(probabilities.shape[0])
        generators = self._per_image(probabilities.device)
        return torch.stack(
            [sample_without_replacement(row, count, g) for row, g in zip(probabilities, generators)]
        )

    def permutation(self, count: int, device: torch.device) -> torch.Tensor:
        self._check(1)
        return torch.randperm(count, generator=next(self._per_image(device)), device=device)

    def uniform(self, device: torch.device) -> torch.Tensor:
        self.calls += 1
        return torch.rand((), generator=self._seeded(self.batch_key, device), device=device)

    def _check(self, batch: int) -> None:
        if batch != len(self.keys):
            raise ValueError(f"{batch} images but {len(self.keys)} keys")
