"""What the loop needs from a task (classification, segmentation): its model, its test sets,
how one test set runs online and how finished sets summarise. The loop knows no task's details."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dusa_cli.collectives import all_reduce_
from dusa_cli.config.schema import DataConfig, ModelConfig
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.runtime import peak_memory, reset_peak_memory, synchronize


class Progress(Protocol):
    """`score` is read only when shown: reading a count kept on the GPU waits for the GPU. With
    several processes it is rank 0's share of the images; `end_task` gets the task's score over
    all of them."""

    def start_task(self, name: str, total: int) -> None: ...
    def advance(self, images: int, score: Callable[[], float]) -> None: ...
    def end_task(self, score: float) -> None: ...


class NoProgress:
    def start_task(self, name: str, total: int) -> None: ...
    def advance(self, images: int, score: Callable[[], float]) -> None: ...
    def end_task(self, score: float) -> None: ...


@dataclass(frozen=True)
class TaskKind:
    create_model: Callable[[ModelConfig], nn.Module]
    open_dataset: Callable[[DataConfig, str, int, int], Dataset]  # (data, corruption, severity, model's classes)
    find_data: Callable[[Path, str, int], Path | None]  # (root, corruption, severity) → where its images lie, if anywhere
    data_layout: str  # where find_data looks, in words (for the error naming what is missing)
    # (adapter, loader, data, devices, progress, task key: the images' random streams derive from it)
    run: Callable[[OnlineAdapter, DataLoader, DataConfig, list[torch.device], Progress, int], dict[str, Any]]
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]
    score: str  # the task record's key that progress shows (top1, miou)
    multi_process: bool  # data parallelism over processes (else model parallelism at most)


def start_timing(devices: list[torch.device]) -> float:
    """A task's clock and every device's peak-memory counter start here."""
    for device in devices:
        reset_peak_memory(device)
    return time.perf_counter()


def timing_record(num_samples: int, start: float, devices: list[torch.device]) -> dict[str, Any]:
    """Once the devices' queued work is done: throughput since `start`, and the peak memory of the
    device (over processes and split devices) that used most."""
    synchronize(devices)
    wall = time.perf_counter() - start
    peaks = [peak_memory(device) for device in devices]
    memory, memory_kind = max(peaks)
    peak = all_reduce_(torch.tensor(memory, dtype=torch.float64, device=devices[0]), "max").item()
    return {
        "wall_time_s": wall,
        "images_per_s": num_samples / wall if wall > 0 else None,
        "peak_memory_gib": peak,
        "memory_kind": memory_kind,
    }


CURVE_POINTS = 256  # a task's online curve keeps at most this many evenly spaced points


def online_curve(
    images: Sequence[int], score: str, running: Sequence[float], losses: Sequence[float] | None
) -> dict[str, list[Any]]:
    """A task's online curve from per-micro-batch values: after each of at most CURVE_POINTS
    evenly spaced micro-batches, the images seen so far, the running score over them (what the
    progress bar shows) and the mean loss of the micro-batches since the previous point."""
    count = len(images)
    points = min(count, CURVE_POINTS)
    ends = [count * (index + 1) // points - 1 for index in range(points)]
    curve: dict[str, list[Any]] = {"images": [images[end] for end in ends], score: [running[end] for end in ends]}
    if losses is not None:
        starts = [0, *(end + 1 for end in ends[:-1])]
        curve["loss"] = [sum(losses[a : b + 1]) / (b + 1 - a) for a, b in zip(starts, ends)]
    return curve


def summarize(tasks: list[dict[str, Any]], **means: str) -> dict[str, Any]:
    """The run's summary: each `name=key` the mean of the tasks' `key`, then counts and timing."""
    images = sum(t["num_samples"] for t in tasks)
    wall = sum(t["wall_time_s"] for t in tasks)
    return {name: sum(t[key] for t in tasks) / len(tasks) for name, key in means.items()} | {
        "num_tasks": len(tasks),
        "num_samples": images,
        "wall_time_s": wall,
        "images_per_s": images / wall if wall > 0 else None,
        "peak_memory_gib": max(t["peak_memory_gib"] for t in tasks),
    }
