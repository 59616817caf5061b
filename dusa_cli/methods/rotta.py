"""RoTTA (Yuan et al., CVPR'23): robust BatchNorm, a category-balanced memory bank of confident
and recent test images, and a student trained on that bank against its EMA teacher, fresher
images weighing more (docs/research/dusa_official.md §2, the DUSA repository's `rotta.py` baseline).

Per batch:
1. the teacher predicts the batch (the prediction scored); every image then enters the bank
   with the teacher's class as its label and the prediction's entropy as its uncertainty;
2. the student sees a strongly augmented view of the bank (CoTTA's augmentations), the teacher
   the bank itself; loss: the mean soft cross-entropy of the student to the teacher, each image
   weighted by its timeliness e^−a / (1 + e^−a), a = its age / the bank's capacity;
3. after the step the teacher moves to ema·teacher + (1 − ema)·student (ν = 0.001).

The bank (CSTU, capacity 64 = the batch): a class holds at most capacity / C images. A new image
enters when its class is below that share and the bank has room; otherwise it takes the place of
the image with the highest score λt·σ(age / capacity) + λu·H / ln C (its own class's images when
its class has its share, the largest classes' otherwise) if that score is above the new
image's own (age 0). Every image in the bank ages by one at each arrival.

Robust BatchNorm (RBN): each BatchNorm normalises with statistics that follow the stream. In the
update they become (1 − α)·statistics + α·the bank's batch statistics (α 0.05), kept for the
next; in prediction the kept ones are used. The affine parameters of RBN, LayerNorm and
GroupNorm are adapted (ConvNeXt-L, ViT-B/16 and ResNet50-GN have no BatchNorm: RBN is for
BatchNorm networks such as the digits ResNet).

Differences from the official code:
- Only the RBN layers switch to training behaviour in the update; the official puts student and
  teacher in train mode, drop-path 0.5 on ConvNeXt-L included (§2).
- The augmentations run on the [0, 1] images they were designed for and draw from torch's
  global stream (cotta.py says how they differ).
- One update per batch: the official updates every 64 images, at its batch size of 64 every
  batch. The update is on the bank, not on the batch's images, so `optim.accumulation` is 1.
- Several processes: each keeps a bank of its own shards, and the update sums their losses
  weighted by shard size; not the single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from dusa_cli.config.schema import MethodConfig
from dusa_cli.methods import register_method
from dusa_cli.methods.base import NORM_LAYERS, StepOutput, TTAMethod, norm_parameters
from dusa_cli.methods.cotta import augmented_view, ema_update, frozen_copy, soft_cross_entropy
from dusa_cli.methods.tent import softmax_entropy


class RottaConfig(MethodConfig):
    memory_size: int = Field(default=64, ge=1, description="images in the category-balanced memory bank (CSTU)")
    lambda_t: float = Field(default=1.0, ge=0, description="weight of a banked image's age in its eviction score")
    lambda_u: float = Field(
        default=1.0, ge=0, description="weight of a banked image's uncertainty (entropy / ln classes) in its eviction score"
    )
    ema: float = Field(default=0.999, ge=0, le=1, description="teacher = ema·teacher + (1 − ema)·student")
    bn_momentum: float = Field(
        default=0.05, ge=0, le=1, description="robust BatchNorm: statistics = (1 − this)·statistics + this·the bank's"
    )


class RobustBatchNorm(nn.Module):
    """A BatchNorm whose running statistics are a moving average over the update batches and
    are used to normalise in training behaviour too (with the batch's share differentiable)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, momentum: float):
        super().__init__()
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("robust BatchNorm starts from the source's running statistics; this BatchNorm has none")
        self.momentum, self.eps = momentum, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = self.running_mean, self.running_var
        if self.training:
            batch_var, batch_mean = torch.var_mean(x.float(), dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.momentum) * mean + self.momentum * batch_mean
            var = (1 - self.momentum) * var + self.momentum * batch_var
            self.running_mean.copy_(mean.detach())
            self.running_var.copy_(var.detach())
        normalised = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised.to(x.dtype)


def use_robust_batch_norm(model: nn.Module, momentum: float) -> None:
    """Replace every BatchNorm of `model` by a RobustBatchNorm with its weights and statistics."""
    batch_norms = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]
    for parent, name, child in batch_norms:
        setattr(parent, name, RobustBatchNorm(child, momentum).train(child.training))


@dataclass
class Banked:
    image: torch.Tensor
    uncertainty: float  # the entropy of its prediction when it arrived
    age: int = 0  # arrivals since its own


class MemoryBank:
    """Category-balanced sampling with timeliness and uncertainty (CSTU)."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float, lambda_u: float):
        self.capacity, self.num_classes = capacity, num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.classes: list[list[Banked]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.classes)

    def score(self, age: int, uncertainty: float) -> float:
        """Higher: older or less certain, the first to leave."""
        timeliness = 1 / (1 + math.exp(-age / self.capacity))
        return self.lambda_t * timeliness + self.lambda_u * uncertainty / math.log(self.num_classes)

    def add(self, image: torch.Tensor, label: int, uncertainty: float) -> None:
        if self._make_room(label, self.score(0, uncertainty)):
            self.classes[label].append(Banked(image.clone(), uncertainty))  # a clone frees the batch
        for entries in self.classes:
            for entry in entries:
                entry.age += 1

    def _make_room(self, label: int, score: float) -> bool:
        """Whether an image of class `label` scoring `score` may enter, after evicting one if need be."""
        if len(self.classes[label]) >= self.capacity / self.num_classes:
            return self._evict([label], score)
        if len(self) < self.capacity:
            return True
        largest = max(len(entries) for entries in self.classes)
        return self._evict([c for c, entries in enumerate(self.classes) if len(entries) == largest], score)

    def _evict(self, classes: list[int], score: float) -> bool:
        """Drop the highest-scoring image of `classes` (the last of equals, as the official) if
        it scores above `score`."""
        candidates = [
            (self.score(entry.age, entry.uncertainty), c, index)
            for c in classes
            for index, entry in enumerate(self.classes[c])
        ]
        worst, c, index = max(reversed(candidates), key=lambda candidate: candidate[0])
        if worst <= score:
            return False
        del self.classes[c][index]
        return True

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The banked images, class by class, and their ages in capacities."""
        entries = [entry for entries in self.classes for entry in entries]
        images = torch.stack([entry.image for entry in entries])
        return images, images.new_tensor([entry.age / self.capacity for entry in entries], dtype=torch.float32)

    def state_dict(self) -> dict[str, list[Any]]:
        entries = [(label, entry) for label, entries in enumerate(self.classes) for entry in entries]
        state: dict[str, list[Any]] = {"label": [label for label, _ in entries]}
        return state | {field: [getattr(entry, field) for _, entry in entries] for field in ("image", "uncertainty", "age")}

    def load_state_dict(self, state: dict[str, list[Any]], device: torch.device) -> None:
        self.classes = [[] for _ in range(self.num_classes)]
        for image, label, uncertainty, age in zip(state["image"], state["label"], state["uncertainty"], state["age"]):
            self.classes[label].append(Banked(image.to(device), uncertainty, age))


@register_method
class Rotta(TTAMethod):
    name = "rotta"
    Config = RottaConfig
    tasks = frozenset({"cls"})
    accumulates = False
    config: RottaConfig

    def __init__(self, model: nn.Module, config: RottaConfig):
        super().__init__(model, config)
        self.teacher = frozen_copy(self.model)
        self.bank = MemoryBank(config.memory_size, model.num_classes, config.lambda_t, config.lambda_u)
        self.robust_norms = [m for net in (self.model, self.teacher) for m in net.modules() if isinstance(m, RobustBatchNorm)]

    def configure_model(self) -> None:
        super().configure_model()
        use_robust_batch_norm(self.model, self.config.bn_momentum)
        for param in norm_parameters(self.model, (*NORM_LAYERS, RobustBatchNorm)):
            param.requires_grad_(True)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    @contextmanager
    def updating(self) -> Iterator[None]:
        """RBN layers in training behaviour: they take the bank's statistics into theirs."""
        for norm in self.robust_norms:
            norm.train()
        try:
            yield
        finally:
            for norm in self.robust_norms:
                norm.eval()

    def forward(self, images: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            logits = self.teacher(images).float()
        for image, label, uncertainty in zip(images, logits.argmax(dim=1).tolist(), softmax_entropy(logits).tolist()):
            self.bank.add(image, label, uncertainty)
        banked, ages = self.bank.contents()
        with self.updating():
            with torch.no_grad():
                targets = self.teacher(banked).float()
            predictions = self.model(augmented_view(banked)).float()
        timeliness = torch.sigmoid(-ages)  # e^−a / (1 + e^−a)
        return StepOutput(logits=logits, loss=(soft_cross_entropy(predictions, targets) * timeliness).mean())

    def after_step(self) -> None:
        ema_update(self.teacher, self.model, self.config.ema)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "teacher": self.teacher.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"], next(self.model.parameters()).device)
