"""Classification: online top-1/top-5 over a test set in micro-batches, sharded over processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dusa_cli.collectives import all_reduce_
from dusa_cli.config.schema import DataConfig, ModelConfig
from dusa_cli.data.datasets import TASK_LAYOUT, check_labels, open_task, task_source
from dusa_cli.draws import ImageDraws, micro_batch_key, mix
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.distributed import ShardedBatches
from dusa_cli.engine.tasks import Progress, TaskKind, online_curve, start_timing, summarize, timing_record
from dusa_cli.errors import ConfigError
from dusa_cli.models.classifier import NormalizedClassifier, create_classifier


@dataclass
class OnlineMetrics:
    """Counts kept on the device; read back once per progress update. With several processes
    each counts its own shards (the progress shows rank 0's) and `record` sums them. Each
    micro-batch's hits and loss are kept too (on the device) for the task's online curve."""

    device: torch.device
    top1: torch.Tensor = field(init=False)
    top5: torch.Tensor = field(init=False)
    top20: torch.Tensor = field(init=False)  # the DUSA configs' evaluator reports top-1/5/20 (research §1.10)
    count: int = 0
    loss_batches: float = 0.0  # micro-batches with a loss; a shard counts as its share of one
    sizes: list[int] = field(default_factory=list)  # each micro-batch's images over all processes
    batch_hits: list[torch.Tensor] = field(default_factory=list)  # this process's top-1 hits in each
    batch_losses: list[torch.Tensor] = field(default_factory=list)  # each one's share-weighted loss

    def __post_init__(self) -> None:
        self.top1, self.top5, self.top20 = (torch.zeros((), device=self.device) for _ in range(3))

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None, share: float, size: int) -> None:
        """This process's shard of a micro-batch of `size` images (`share` of it)."""
        ranked = logits.topk(min(20, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        self.top1 += hits[:, 0].sum()
        self.top5 += hits[:, :5].any(dim=1).sum()
        self.top20 += hits.any(dim=1).sum()
        self.count += labels.numel()
        self.sizes.append(size)
        self.batch_hits.append(hits[:, 0].sum())
        weighted = torch.zeros((), device=self.device)
        if loss is not None:  # a shard's mean loss weighted by its share: the shards sum to the batch's
            weighted = loss.detach().float() * share
            self.loss_batches += share
        self.batch_losses.append(weighted)

    def skip(self, size: int) -> None:
        """A micro-batch of `size` images with no shard on this process: nothing to count here,
        but every process keeps one entry per micro-batch, so their curves add up."""
        self.sizes.append(size)
        self.batch_hits.append(torch.zeros((), device=self.device))
        self.batch_losses.append(torch.zeros((), device=self.device))

    def accuracy(self) -> float:
        return self.top1.item() / max(self.count, 1)

    def record(self) -> dict[str, Any]:
        """The task's metrics and online curve over every process's shards."""
        counts = torch.tensor([self.count, self.loss_batches], dtype=torch.float64, device=self.device)
        totals = all_reduce_(torch.cat([torch.stack([self.top1, self.top5, self.top20]).double(), counts]))
        hits, top5, top20, count, loss_batches = totals.tolist()
        batches = all_reduce_(torch.stack([torch.stack(self.batch_hits), torch.stack(self.batch_losses)]).double())
        batch_hits, batch_losses = batches.tolist()
        images = list(accumulate(self.sizes))
        running = [correct / seen for correct, seen in zip(accumulate(batch_hits), images)]
        top1 = hits / count
        return {
            "num_samples": round(count),
            "top1": top1,
            "top5": top5 / count,
            "top20": top20 / count,
            "error": 1.0 - top1,
            "mean_loss": sum(batch_losses) / loss_batches if loss_batches else None,
            "curve": online_curve(images, "online_top1", running, batch_losses if loss_batches else None),
        }


def run_task(
    adapter: OnlineAdapter,
    loader: DataLoader,
    data: DataConfig,
    devices: list[torch.device],
    progress: Progress,
    task_key: int,
) -> dict[str, Any]:
    device = devices[0]
    batches: ShardedBatches = loader.batch_sampler  # type: ignore[assignment]
    metrics = OnlineMetrics(device)
    start = start_timing(devices)
    position = 0  # of the micro-batch's first image in the task's order
    for shard, size in zip(loader, batches.global_sizes()):
        if shard is None:
            adapter.skip()
            metrics.skip(size)
        else:
            images, labels = shard
            images = images.to(device, non_blocking=True).float().div_(255)
            labels = labels.to(device, non_blocking=True)
            share = labels.numel() / size
            first = position + batches.shard_start(size)
            draws = ImageDraws([mix(task_key, first + index) for index in range(labels.numel())], micro_batch_key(task_key, position))
            output = adapter.step(images, share, draws)
            metrics.update(output.logits, labels, output.loss, share, size)
        position += size
        progress.advance(size, metrics.accuracy)
    adapter.flush()
    record = metrics.record()
    return record | timing_record(record["num_samples"], start, devices)


def create_trained_classifier(config: ModelConfig) -> NormalizedClassifier:
    """A run adapts a trained model: random weights only where the config asks for them (an
    ImageNet preset run without --checkpoint scored 0 % and exited 0 before)."""
    if config.checkpoint is None and not config.pretrained and not config.random_init:
        raise ConfigError(
            f"model '{config.name}' has no weights: pass --checkpoint PATH (local weights), set "
            "model.pretrained=true (weights packaged on disk) or model.random_init=true (untrained)"
        )
    return create_classifier(config)


def open_classification_task(data: DataConfig, corruption: str, severity: int, num_classes: int) -> Dataset:
    task = open_task(data.root, corruption, severity, num_ex=data.num_ex)
    check_labels(task, num_classes)
    return task


CLASSIFICATION = TaskKind(
    create_model=create_trained_classifier,
    open_dataset=open_classification_task,
    find_data=task_source,
    data_layout=TASK_LAYOUT,
    run=run_task,
    summarize=partial(summarize, mean_top1="top1", mean_error="error"),
    score="top1",
    multi_process=True,
)
