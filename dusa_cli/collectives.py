"""What the processes of a run exchange. Every collective is a no-op without a process group
(one process runs unchanged), and one that fails because a peer died or hung ends this process
with one line. The engine and the methods (CoTTA's restore draws) use these; the process group
itself and the launcher are engine/distributed.py's."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dusa_cli.errors import DusaError

T = TypeVar("T")

BUCKET_BYTES = 64 * 2**20  # gradients per all-reduce call: few calls, bounded extra memory
LINGER_S = 30.0  # a failed rank other than 0 waits this long, so that rank 0 reports first


class ReportedElsewhere(DusaError):
    """A failure that another process prints (rank 0, or the worker that failed): this one
    exits with the same code and no message, so the user reads one line, not one per rank."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code  # type: ignore[assignment]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def first_line(error: BaseException) -> str:
    """The message's first sentence, without gloo's leading `[source/file.cc:line]`."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0] if lines else type(error).__name__


@contextlib.contextmanager
def _peers() -> Iterator[None]:
    """A collective that fails (a peer died, or hung past the timeout) ends this process with one line."""
    try:
        yield
    except RuntimeError as error:  # gloo raises RuntimeError, NCCL its DistBackendError subclass
        raise DusaError(
            f"lost contact with the other processes (one failed, was killed or timed out): {first_line(error)}"
        ) from None


def agree(step: Callable[[], T]) -> T:
    """Run `step` on every process. If it fails with a DusaError anywhere, every process stops:
    rank 0 reports the first failure (naming its rank if another), the others exit quietly."""
    try:
        value, failure = step(), None
    except DusaError as error:
        value, failure = None, error
    if not _active():
        if failure is not None:
            raise failure
        return value  # type: ignore[return-value]
    outcomes: list[tuple[str, int] | None] = [None] * dist.get_world_size()
    with _peers():
        dist.all_gather_object(outcomes, None if failure is None else (str(failure), int(failure.exit_code)))
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return value  # type: ignore[return-value]
    rank, (message, code) = failed[0]
    if dist.get_rank() != 0:
        # The launcher stops every process at the first exit: give rank 0 time to print first.
        time.sleep(LINGER_S)
        raise ReportedElsewhere(code)
    if failure is not None and rank == 0:
        raise failure
    error = DusaError(f"rank {rank}: {message}")
    error.exit_code = code  # type: ignore[assignment]
    raise error


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every process."""
    if not _active():
        return value
    holder = [value]
    with _peers():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(value: T) -> list[T] | None:
    """Every process's `value`, by rank, on rank 0 (None elsewhere)."""
    if not _active():
        return [value]
    values: list[T] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    with _peers():
        dist.gather_object(value, values, dst=0)
    return values


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) `tensor` over the processes, in place."""
    if _active():
        with _peers():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of an update over the processes, where each process has weighted its
    loss by its share of every micro-batch: the sum is then the single-process gradient of the
    full micro-batches, uneven and empty shards included.

    Not DistributedDataParallel: DDP hooks a module's forward, but DUSA's prior runs through
    `encode`/`predict`; DDP needs every process to run forward and backward on each
    micro-batch (an uneven last batch leaves a process without images); and it leaves zeros
    where no gradient flowed, which Adam treats as a step, unlike a single process. One
    bucketed all-reduce per update (after the last micro-batch's backward) keeps all three
    exact, at the cost of not overlapping communication with the backward pass.
    """
    if not _active() or not params:
        return
    produced = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    with _peers():
        dist.all_reduce(produced)
        for bucket in _buckets(grads):
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat)
            for grad, reduced in zip(bucket, flat.split([grad.numel() for grad in bucket])):
                grad.copy_(reduced.view_as(grad))
    for param, grad, used in zip(params, grads, produced.tolist()):
        param.grad = grad if used else None


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, about BUCKET_BYTES each."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size >= BUCKET_BYTES or (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket
