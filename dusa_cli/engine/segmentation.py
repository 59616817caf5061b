"""Segmentation: one image per online step, resized for the segmenter, scored at its original
resolution (mIoU, per-class IoU, pixel accuracy; docs/research/dusa_official.md §3.2, §3.6)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dusa_cli.config.schema import DataConfig, SegDataConfig
from dusa_cli.data.segmentation import SEG_TASK_LAYOUT, open_seg_task, seg_task_images
from dusa_cli.draws import ImageDraws, micro_batch_key, mix
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.errors import DusaError
from dusa_cli.engine.tasks import Progress, TaskKind, online_curve, start_timing, summarize, timing_record
from dusa_cli.models.segmenter import create_segmenter
from dusa_cli.results.seg_metrics import SegmentationScore


def resized_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmseg's Resize(scale=(max_long_side, short_side), keep_ratio=True): the largest scale at
    which the short side is at most `short_side` and the long side at most `max_long_side`."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare_image(image: torch.Tensor, data: SegDataConfig, min_side: int = 1) -> torch.Tensor:
    """uint8 (1, 3, H, W) on the device → float [0, 1] at the segmenter's input size (bilinear)."""
    size = resized_size(*image.shape[-2:], data.short_side, data.max_long_side)
    if min(size) < min_side:
        raise DusaError(
            f"a {image.shape[-2]}×{image.shape[-1]} image resized to {size[0]}×{size[1]} is below the "
            f"segmenter's smallest input side, {min_side} px (raise data.short_side or data.max_long_side)"
        )
    return F.interpolate(image.float().div_(255), size=size, mode="bilinear", align_corners=False)


def predict_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class per pixel at the original resolution: logits upsampled bilinearly, then argmax."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def run_task(
    adapter: OnlineAdapter,
    loader: DataLoader,
    data: DataConfig,
    devices: list[torch.device],
    progress: Progress,
    task_key: int,
) -> dict[str, Any]:
    assert isinstance(data, SegDataConfig)
    device = devices[0]
    score = SegmentationScore(num_classes=adapter.method.model.num_classes)
    losses: list[torch.Tensor] = []
    running: list[float] = []  # mIoU so far after each image (the confusion matrix is on the CPU)
    count = 0
    start = start_timing(devices)
    for images, labels in loader:
        draws = ImageDraws([mix(task_key, count)], micro_batch_key(task_key, count))  # a micro-batch: one image
        image = prepare_image(images.to(device, non_blocking=True), data, adapter.method.model.min_side)
        output = adapter.step(image, draws=draws)
        score.update(predict_labels(output.logits, labels.shape[-2:]), labels)
        if output.loss is not None:
            losses.append(output.loss.detach().float())
        count += 1
        running.append(score.compute()["miou"])
        progress.advance(1, lambda: running[-1])
    adapter.flush()
    record = {"num_samples": count} | score.compute()
    image_losses = torch.stack(losses).tolist() if losses else []
    record["mean_loss"] = sum(image_losses) / len(image_losses) if image_losses else None
    curve_losses = image_losses if len(image_losses) == count else None  # a loss for every image, or none
    record["curve"] = online_curve(list(range(1, count + 1)), "online_miou", running, curve_losses)
    return record | timing_record(count, start, devices)


SEGMENTATION = TaskKind(
    create_model=create_segmenter,
    open_dataset=lambda data, corruption, severity, num_classes: open_seg_task(
        data.root, corruption, severity, annotations=data.annotations, num_ex=data.num_ex
    ),
    find_data=seg_task_images,
    data_layout=SEG_TASK_LAYOUT,
    run=run_task,
    summarize=partial(summarize, mean_miou="miou", mean_pixel_accuracy="pixel_accuracy"),
    score="miou",
    multi_process=False,
)
