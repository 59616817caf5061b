"""Data parallelism over processes: one per GPU, launched by `--gpus` or by torchrun.

Every process holds a full replica of the method's networks and takes a contiguous shard of
each online micro-batch, in the single-process order. Gradients are summed by hand once per
update (dusa_cli.collectives.all_reduce_gradients says why not DistributedDataParallel), online
counts are summed at the end of each task, and only rank 0 writes results or shows progress.

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) nothing
here starts a process group and every collective is a no-op, so one process runs unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler
from torch.utils.data.dataloader import default_collate

from dusa_cli.collectives import ReportedElsewhere, first_line
from dusa_cli.engine.runtime import resolve_device
from dusa_cli.errors import ConfigError, DusaError, Interrupted
from dusa_cli.stopping import STOP_SIGNALS, handling

TIMEOUT_VARIABLE = "DUSA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    device: torch.device
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def process_seed(self, seed: int) -> int:
        """Rank 0 keeps the single-process stream; the others draw their own (the same stream on
        every rank would give the images of different shards the same noise)."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got '{text}'")
    return datetime.timedelta(seconds=seconds)


def _process_device(spec: str, rank: int, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK on CUDA machines (auto or cuda), the CPU otherwise or when asked."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise ConfigError(
            f"run.device '{spec}' names one device, but each of several processes uses "
            "cuda:LOCAL_RANK: set run.device to auto, cuda or cpu"
        )
    resolve_device("cuda")  # CUDA present at all
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"rank {rank} has LOCAL_RANK {local_rank} but this node has "
            f"{torch.cuda.device_count()} GPUs: start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_spec: str) -> Iterator[World]:
    """The run's World; under torchrun (or `--gpus`) a process group for its lifetime: NCCL on
    CUDA, gloo on the CPU, with a timeout so a lost process ends the run instead of hanging it."""
    if not launched_by_torchrun():
        yield World(resolve_device(device_spec))
        return
    try:
        rank, size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    device = _process_device(device_spec, rank, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = _timeout()
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, ValueError) as error:
        raise DusaError(f"rank {rank} could not join the process group: {first_line(error)}") from None
    yield World(device, rank, size)
    # Left out on errors: tearing down with a lost peer could block; the process exits anyway.
    dist.destroy_process_group()


class ShardedBatches(Sampler[list[int]]):
    """The single-process batches (the same index sampler, so the same seeded order), each cut
    into contiguous per-rank shards; a shard is empty when a batch has fewer images than ranks."""

    def __init__(self, batches: BatchSampler, world: World):
        self.batches = batches
        self.world = world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.shard_start(len(batch)) : self.shard_start(len(batch), self.world.rank + 1)]

    def shard_start(self, size: int, rank: int | None = None) -> int:
        """Where this process's (or `rank`'s) shard starts in a micro-batch of `size` images."""
        rank = self.world.rank if rank is None else rank
        return size * rank // self.world.size

    def __len__(self) -> int:
        return len(self.batches)

    def global_sizes(self) -> list[int]:
        """Images in each full micro-batch, without drawing the shuffle."""
        total, batch = len(self.batches.sampler), self.batches.batch_size  # type: ignore[arg-type]
        return [min(batch, total - start) for start in range(0, total, batch)]


def collate_shard(items: list[Any]) -> Any:
    """default_collate, and None for an empty shard."""
    return default_collate(items) if items else None


def parse_gpus(text: str) -> list[int]:
    """`--gpus 0,1,2,3`: distinct indices of GPUs this machine has."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdecimal() for part in parts):
        raise ConfigError(f"--gpus takes a comma list of GPU indices such as 0,1,2,3, got '{text}'")
    gpus = [int(part) for part in parts]
    repeated = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
    if repeated:
        raise ConfigError(f"--gpus lists GPU {', '.join(map(str, repeated))} more than once")
    if launched_by_torchrun():
        raise ConfigError("--gpus starts its own processes: leave it out under torchrun")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpus {text}: CUDA is not available on this machine (torch {torch.__version__})")
    count = torch.cuda.device_count()
    missing = [gpu for gpu in gpus if gpu >= count]
    if missing:
        raise ConfigError(f"--gpus {text}: no GPU {missing[0]} (this machine has {count}: 0..{count - 1})")
    return gpus


def launch(gpus: list[int], worker: Callable[..., None], args: tuple[Any, ...], outcome: Callable[[], str]) -> None:
    """Run `worker(*args)` in one process per listed GPU, with the variables torchrun would set
    (so the engine takes the same path), and wait for all of them. The first process to fail
    stops the others. A process killed or stopped by a signal is the report (the others fail on
    its loss); a process that failed on its own has printed its one-line error.

    A stop (Ctrl-C, SIGTERM, SIGHUP) is reported here, ending with `outcome()` (what the run
    kept), and the workers stop silently: when one exits, torch SIGTERMs the others, which could
    cut rank 0 off before its line."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(gpu) for gpu in range(max(gpus) + 1)]
    os.environ.update(
        CUDA_VISIBLE_DEVICES=",".join(names[gpu] for gpu in gpus),  # local rank r → the r-th listed GPU
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(len(gpus)),
        LOCAL_WORLD_SIZE=str(len(gpus)),
    )
    # As torchrun does: processes that each take every core slow one another down.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(gpus))))
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # no line per stopped worker
    context = torch.multiprocessing.start_processes(
        _launched, args=(os.getpid(), worker, args), nprocs=len(gpus), join=False, start_method="spawn"
    )
    stops: list[int] = []

    def forward(number: int, _frame: Any) -> None:
        stops.append(number)
        if number != signal.SIGINT:  # Ctrl-C reaches every worker from the terminal
            for pid in context.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, number)

    ended: dict[int, int] = {}  # exit codes of the processes that had ended when one failed
    try:
        with handling(forward):
            while True:
                # Read every exit code before torch's join stops the others: a killed process and
                # rank 0 failing on the lost peer can end together, and join reports them in rank order.
                multiprocessing.connection.wait(list(context.sentinels))
                ended = {index: process.exitcode for index, process in enumerate(context.processes) if process.exitcode}
                if context.join():
                    break
    except torch.multiprocessing.ProcessExitedException as failure:
        if stops:
            raise Interrupted(stops[0], outcome()) from None
        ended.setdefault(failure.error_index, failure.exit_code)
        for index, code in ended.items():
            if code < 0:
                cause = f"killed by {_signal_name(-code)}"
            elif code - 128 in STOP_SIGNALS:  # sent to that worker alone, which stopped silently
                cause = f"stopped by {_signal_name(code - 128)}"
            else:
                continue
            raise DusaError(f"the process on GPU {gpus[index]} was {cause}; the others were stopped; {outcome()}") from None
        raise ReportedElsewhere(failure.exit_code) from None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal
        return f"signal {number}"


def _launched(index: int, parent: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    _stop_with(parent)
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(index)
    worker(*args)


def _stop_with(parent: int) -> None:
    """On Linux, SIGTERM this process when the launcher dies, even by SIGKILL (which it cannot
    forward). torch asks for SIGINT, which the processes of a run started in the background ignore."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call
        sys.exit(128 + signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
