"""The hand-written online adaptation loop over (corruption, severity) tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from dusa_cli.config.schema import ExperimentConfig
from dusa_cli.data.datasets import open_task
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.runtime import (
    peak_memory,
    reset_peak_memory,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
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
    """Counts kept on the device; read back once per progress update."""

    device: torch.device
    top1: torch.Tensor = field(init=False)
    top5: torch.Tensor = field(init=False)
    loss: torch.Tensor = field(init=False)
    count: int = 0
    loss_count: int = 0

    def __post_init__(self) -> None:
        self.top1, self.top5, self.loss = (torch.zeros((), device=self.device) for _ in range(3))

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None) -> None:
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.count += labels.numel()
        if loss is not None:
            self.loss += loss.detach().float()
            self.loss_count += 1

    def accuracy(self) -> float:
        return self.top1.item() / max(self.count, 1)

    def record(self) -> dict[str, Any]:
        top1 = self.top1.item() / self.count
        return {
            "num_samples": self.count,
            "top1": top1,
            "top5": self.top5.item() / self.count,
            "error": 1.0 - top1,
            "mean_loss": self.loss.item() / self.loss_count if self.loss_count else None,
        }


def run_task(
    adapter: OnlineAdapter, loader: DataLoader, device: torch.device, progress: Progress
) -> dict[str, Any]:
    metrics = OnlineMetrics(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).float().div_(255)
        labels = labels.to(device, non_blocking=True)
        output = adapter.step(images)
        metrics.update(output.logits, labels, output.loss)
        progress.advance(labels.numel(), metrics.accuracy())
    adapter.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    memory, memory_kind = peak_memory(device)
    return metrics.record() | {
        "wall_time_s": wall,
        "images_per_s": metrics.count / wall if wall > 0 else None,
        "peak_memory_gib": memory,
        "memory_kind": memory_kind,
    }


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
    progress = progress or NoProgress()
    device = resolve_device(config.run.device)
    seed = config.run.seed
    seed_everything(seed)
    model = create_classifier(config.model)
    method = get_method(config.method.name)(model, config.method).to(device)
    adapter = OnlineAdapter(method, config.optim, config.run.precision, device)
    initial = _to_cpu(adapter.state_dict())
    tasks = [(c, s) for c in config.data.corruptions for s in config.data.severities]
    # Open every task first: a missing corruption folder fails before any compute is spent.
    datasets = [
        open_task(config.data.root, c, s, num_ex=config.data.num_ex, seed=seed) for c, s in tasks
    ]
    store = ResultsStore.open(config.run.output, config, collect_environment(device), resume)
    done = store.finished()
    continual = config.run.setting == "continual"
    if continual and done:
        saved = store.load_state()
        store.adopt_records(saved["records"])
        done = store.finished()
        adapter.load_state_dict(saved["adapter"])
        set_rng_state(saved["rng"])
    for index, ((corruption, severity), dataset) in enumerate(zip(tasks, datasets)):
        if task_id(corruption, severity) in done:
            continue
        if not continual:  # fully TTA: every task starts from the source model (§1.7)
            adapter.load_state_dict(initial)
            seed_everything(seed)
        loader = DataLoader(
            dataset,
            batch_size=config.data.batch_size,
            shuffle=config.data.shuffle,
            num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda",
            # Reset runs replay one RNG stream per task, as the official code re-seeds (§1.7).
            generator=torch.Generator().manual_seed(seed if not continual else seed + index),
        )
        progress.start_task(task_id(corruption, severity), len(dataset))
        record = run_task(adapter, loader, device, progress)
        progress.end_task()
        record = {"corruption": corruption, "severity": severity} | record
        if continual:  # state first, carrying the records, so a kill between the writes loses nothing
            records = store.results["tasks"] + [record]
            store.save_state({"adapter": adapter.state_dict(), "rng": rng_state(), "records": records})
        store.record_task(record)
    store.complete(summarize(store.results["tasks"]))
    return store


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
