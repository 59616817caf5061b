"""The hand-written online adaptation loop over (corruption, severity) tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from dusa_cli.config.schema import DataConfig, ExperimentConfig
from dusa_cli.data.datasets import open_task
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.distributed import (
    ShardedBatches,
    World,
    agree,
    all_reduce_,
    broadcast_from_main,
    collate_shard,
    gather_to_main,
    process_group,
)
from dusa_cli.engine.runtime import (
    peak_memory,
    reset_peak_memory,
    rng_state,
    seed_everything,
    set_rng_state,
)
from dusa_cli.errors import DusaError
from dusa_cli.methods import get_method
from dusa_cli.models.classifier import create_classifier
from dusa_cli.results.environment import collect_environment
from dusa_cli.results.store import ResultsStore, task_id


class Progress(Protocol):
    def start_task(self, name: str, total: int) -> None: ...
    def advance(self, images: int, accuracy: float) -> None: ...
    def end_task(self) -> None: ...


class NoProgress:
    def start_task(self, name: str, total: int) -> None: ...
    def advance(self, images: int, accuracy: float) -> None: ...
    def end_task(self) -> None: ...


@dataclass
class OnlineMetrics:
    """Counts kept on the device; read back once per progress update. With several processes
    each counts its own shards (the progress shows rank 0's) and `record` sums them."""

    device: torch.device
    top1: torch.Tensor = field(init=False)
    top5: torch.Tensor = field(init=False)
    loss: torch.Tensor = field(init=False)
    count: int = 0
    loss_batches: float = 0.0  # micro-batches with a loss; a shard counts as its share of one

    def __post_init__(self) -> None:
        self.top1, self.top5, self.loss = (torch.zeros((), device=self.device) for _ in range(3))

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None, share: float = 1.0
    ) -> None:
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.count += labels.numel()
        if loss is not None:  # a shard's mean loss weighted by its share: the shards sum to the batch's
            self.loss += loss.detach().float() * share
            self.loss_batches += share

    def accuracy(self) -> float:
        return self.top1.item() / max(self.count, 1)

    def record(self) -> dict[str, Any]:
        """The task's metrics over every process's shards."""
        counts = torch.tensor([self.count, self.loss_batches], dtype=torch.float64, device=self.device)
        totals = all_reduce_(torch.cat([torch.stack([self.top1, self.top5, self.loss]).double(), counts]))
        hits, top5, loss, count, loss_batches = totals.tolist()
        top1 = hits / count
        return {
            "num_samples": round(count),
            "top1": top1,
            "top5": top5 / count,
            "error": 1.0 - top1,
            "mean_loss": loss / loss_batches if loss_batches else None,
        }


def run_task(
    adapter: OnlineAdapter, loader: DataLoader, device: torch.device, progress: Progress
) -> dict[str, Any]:
    batches: ShardedBatches = loader.batch_sampler  # type: ignore[assignment]
    metrics = OnlineMetrics(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for shard, size in zip(loader, batches.global_sizes()):
        if shard is None:
            adapter.skip()
        else:
            images, labels = shard
            images = images.to(device, non_blocking=True).float().div_(255)
            labels = labels.to(device, non_blocking=True)
            share = labels.numel() / size
            output = adapter.step(images, share)
            metrics.update(output.logits, labels, output.loss, share)
        progress.advance(size, metrics.accuracy())
    adapter.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    record = metrics.record()
    memory, memory_kind = peak_memory(device)
    peak = all_reduce_(torch.tensor(memory, dtype=torch.float64, device=device), "max").item()
    return record | {
        "wall_time_s": wall,
        "images_per_s": record["num_samples"] / wall if wall > 0 else None,
        "peak_memory_gib": peak,  # of the process that used the most
        "memory_kind": memory_kind,
    }


def task_loader(dataset: Dataset, data: DataConfig, world: World, seed: int) -> DataLoader:
    """The single-process batches in the single-process (seeded) order, cut into this process's
    shards: the whole batches in a single process."""
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if data.shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatches(BatchSampler(order, data.batch_size, drop_last=False), world),
        collate_fn=collate_shard,
        num_workers=data.num_workers,
        pin_memory=world.device.type == "cuda",
        generator=generator,
    )


def _to_cpu(state: Any) -> Any:
    """A detached CPU copy, so snapshots neither alias live tensors nor hold GPU memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(value) for value in state)
    return state


def run_experiment(
    config: ExperimentConfig, *, resume: bool = False, progress: Progress | None = None
) -> ResultsStore:
    """One process, or one of several under torchrun / `--gpus` (rank 0 alone writes and shows
    progress). Returns the run's results store (an unwritten copy on ranks other than 0)."""
    with process_group(config.run.device) as world:
        shown = progress if progress is not None and world.is_main else NoProgress()
        return _run(config, world, resume, shown)


def _run(config: ExperimentConfig, world: World, resume: bool, progress: Progress) -> ResultsStore:
    device, seed = world.device, config.run.seed
    continual = config.run.setting == "continual"
    tasks = [(c, s) for c in config.data.corruptions for s in config.data.severities]

    def setup() -> tuple[OnlineAdapter, list[Dataset]]:
        seed_everything(seed)  # the same on every process, so the replicas start identical
        model = create_classifier(config.model)
        method = get_method(config.method.name)(model, config.method).to(device)
        adapter = OnlineAdapter(method, config.optim, config.run.precision, device)
        # Open every task first: a missing corruption folder fails before any compute is spent.
        datasets = [
            open_task(config.data.root, c, s, num_ex=config.data.num_ex, seed=seed) for c, s in tasks
        ]
        return adapter, datasets

    adapter, datasets = agree(setup)
    initial = _to_cpu(adapter.state_dict())
    if not world.is_main:  # its own random stream from here; rank 0 goes on with the single-process one
        seed_everything(world.process_seed(seed))
    store = _open_store(config, world, resume)
    done = store.finished()
    if continual and done and len(done) < len(tasks):  # a finished run needs no state back
        agree(lambda: _restore(store, adapter, world))
        done = store.finished()
    for index, ((corruption, severity), dataset) in enumerate(zip(tasks, datasets)):
        if task_id(corruption, severity) in done:
            continue
        if not continual:  # fully TTA: every task starts from the source model (§1.7)
            adapter.load_state_dict(initial)
            seed_everything(world.process_seed(seed))
        # Reset runs replay one RNG stream per task, as the official code re-seeds (§1.7).
        loader = task_loader(dataset, config.data, world, seed if not continual else seed + index)
        progress.start_task(task_id(corruption, severity), len(dataset))
        record = run_task(adapter, loader, device, progress)
        progress.end_task()
        record = {"corruption": corruption, "severity": severity} | record
        if continual:  # state first, carrying the records, so a kill between the writes loses nothing
            records = store.results["tasks"] + [record]
            rng = gather_to_main(rng_state())  # one stream per process
            store.save_state({"adapter": adapter.state_dict(), "rng": rng, "records": records})
        store.record_task(record)
    store.complete(summarize(store.results["tasks"]))
    return store


def _open_store(config: ExperimentConfig, world: World, resume: bool) -> ResultsStore:
    """Rank 0 owns the results directory; the others keep an unwritten copy of its results."""

    def open_on_main() -> ResultsStore | None:
        if not world.is_main:
            return None
        environment = collect_environment(world.device) | {"world_size": world.size}
        return ResultsStore.open(config.run.output, config, environment, resume)

    store = agree(open_on_main)
    results = broadcast_from_main(store.results if store else None)
    return store or ResultsStore(config.run.output, results, writable=False)


def _restore(store: ResultsStore, adapter: OnlineAdapter, world: World) -> None:
    """A continual run's state after its last finished task (every process reads state.pt)."""
    saved = store.load_state()
    # A list by rank; one bare state in files written before multi-process runs.
    streams = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if len(streams) != world.size:
        raise DusaError(
            f"cannot resume {store.root} with {world.size} process(es): it ran with {len(streams)}, "
            "and each process keeps its own random stream"
        )
    store.adopt_records(saved["records"])
    adapter.load_state_dict(saved["adapter"])
    set_rng_state(streams[world.rank])


def summarize(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    images = sum(t["num_samples"] for t in tasks)
    wall = sum(t["wall_time_s"] for t in tasks)
    return {
        "mean_top1": sum(t["top1"] for t in tasks) / len(tasks),
        "mean_error": sum(t["error"] for t in tasks) / len(tasks),
        "num_tasks": len(tasks),
        "num_samples": images,
        "wall_time_s": wall,
        "images_per_s": images / wall if wall > 0 else None,
        "peak_memory_gib": max(t["peak_memory_gib"] for t in tasks),
    }
