"""Segmentation scores: mIoU, per-class IoU and pixel accuracy, as MMSeg's IoUMetric gives them.

The official DUSA code scores each corruption with MMSeg's IoUMetric at the original resolution
(dusa_official.md §3.6): per class IoU = intersection / union over all pixels of the task, and
mIoU the NaN-mean over classes, where a class with an empty union (in neither prediction nor
ground truth) is NaN and so left out; a class only predicted counts with IoU 0. Everything derives
from one confusion matrix, counted by torchmetrics. torchmetrics' own JaccardIndex scores absent classes
as 0 instead of leaving them out, hence the IoU arithmetic here.
"""

from __future__ import annotations

from typing import Any

import torch

import dusa_cli._compat  # noqa: F401  (torchvision shim before torchmetrics)
from dusa_cli.data.segmentation import IGNORE_INDEX, NUM_CLASSES
from dusa_cli.errors import DusaError


class SegmentationScore:
    """Accumulates a confusion matrix (rows: ground truth, columns: prediction) over a task."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted class indices and ground truth of equal shape (any batch layout)."""
        if pred.shape != target.shape:
            raise DusaError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        target = target.to(pred.device)
        scored = target != self.ignore_index
        for name, values in (("prediction", pred[scored]), ("label", target[scored])):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
                raise DusaError(f"{name} holds classes outside 0..{self.num_classes - 1}")
        # Counted where the prediction lives (the GPU); only the C×C matrix comes back.
        counts = multiclass_confusion_matrix(
            pred.long(), target.long(), self.num_classes, ignore_index=self.ignore_index, validate_args=False
        )
        self.confusion += counts.cpu()

    def compute(self) -> dict[str, Any]:
        """`miou` and `pixel_accuracy` as fractions (NaN before any scored pixel), and
        `per_class_iou` with None for a class in neither prediction nor ground truth."""
        confusion = self.confusion.double()
        intersection = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        iou = intersection / union  # 0/0 → NaN for absent classes
        present = union > 0
        labelled = confusion.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "per_class_iou": [float(value) if ok else None for value, ok in zip(iou, present)],
            "pixel_accuracy": float(intersection.sum() / labelled) if labelled else float("nan"),
        }
