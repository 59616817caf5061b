"""EATA (Niu et al., ICML'22): entropy minimisation on reliable, non-redundant samples, weighted
by their confidence, with a Fisher-weighted pull towards the source weights against forgetting
(docs/research/dusa_official.md §2, the DUSA repository's `eata.py` baseline).

Per batch, over the affine parameters of the norm layers (as Tent):
- reliable: a sample whose prediction entropy H is below E0 = 0.4·ln C (2.763 for ImageNet);
- non-redundant: of those, one whose softmax has a cosine similarity below 0.05 to the moving
  average (0.9) of the predictions kept so far;
- loss: the mean over the kept samples of H·exp(E0 − H), plus α·Σ F·(θ − θ_source)² (α 2000) when
  `fisher_data` names clean source images (2000 of them: the DUSA repository's ImageNet val).
  Without them the method is ETA, EATA without the anchor, and a run warns.
A batch that keeps no sample does not update, as the official code.

Differences from the official code:
- The Fisher images are resized (short side 256) and centre-cropped to 224, ImageNet-C's own
  geometry; the DUSA repository crops 224 out of the full-size image with the resize commented
  out (§2). `fisher_center_crop: false` reads them as stored (digits-C's clean split). They are a
  fixed subset of the folder (the one `data.num_ex` draws), and the Fisher is estimated in the
  adapted model's mode (eval, BatchNorm on batch statistics), where the official runs it in train
  mode, drop-path 0.5 on ConvNeXt-L included.
- Several processes: each averages the loss over its own shard's kept samples; the moving
  average of predictions takes every process's kept ones at each update, so replicas agree.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from dusa_cli.config.schema import LocalPath, MethodConfig
from dusa_cli.data.datasets import ImageFolderTask, fixed_subset, read_stored
from dusa_cli.data.imagenet_c import load_center_crop
from dusa_cli.errors import DusaError
from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, UpdateTotals
from dusa_cli.methods.tent import Tent, softmax_entropy


def entropy_margin(factor: float, num_classes: int) -> float:
    """E0 = factor·ln C: the entropy under which a prediction counts as reliable (EATA, SAR)."""
    return factor * math.log(num_classes)


class ReliableSamplesConfig(MethodConfig):
    """The options of a method that learns from reliable samples only (EATA, SAR)."""

    entropy_margin: float = Field(
        default=0.4, gt=0, description="reliable samples have an entropy below this × ln(classes) (E0)"
    )


class EataConfig(ReliableSamplesConfig):
    redundancy_margin: float = Field(
        default=0.05,
        ge=0,
        description="a reliable sample whose softmax has a cosine similarity of this or more to the moving "
        "average of the kept predictions is redundant and skipped",
    )
    prediction_ema: float = Field(
        default=0.9, ge=0, lt=1, description="moving average of the kept predictions: ema·average + (1 − ema)·new mean"
    )
    fisher_data: LocalPath | None = Field(
        default=None,
        description="clean source images, <class>/<image> (ImageNet's val set), whose Fisher information "
        "weighs the anchor to the source weights; none: no anchor (ETA)",
    )
    fisher_samples: int = Field(default=2000, ge=1, description="images of fisher_data used (a fixed subset)")
    fisher_batch_size: int = Field(default=64, ge=1, description="images per Fisher gradient")
    fisher_alpha: float = Field(default=2000.0, ge=0, description="weight of the Fisher anchor")
    fisher_center_crop: bool = Field(
        default=True,
        description="resize fisher_data's images (short side 256) and centre-crop 224, as ImageNet-C was made; "
        "false: as stored",
    )


@register_method
class Eata(Tent):
    name = "eata"
    Config = EataConfig
    tasks = frozenset({"cls"})
    config: EataConfig

    def __init__(self, model: nn.Module, config: EataConfig):
        super().__init__(model, config)
        self.margin = entropy_margin(config.entropy_margin, model.num_classes)
        self.mean_probs: torch.Tensor | None = None  # the moving average of kept predictions
        self.kept = UpdateTotals(model.num_classes)  # this update's kept predictions
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @classmethod
    def caveats(cls, config: EataConfig) -> list[str]:
        if config.fisher_data is not None:
            return []
        return [
            "method eata without method.fisher_data is ETA: no Fisher-weighted anchor to the source weights "
            "(EATA's comes from clean source images: 2000 of ImageNet's val set in the DUSA repository)"
        ]

    def place(self, devices: list[torch.device]) -> Eata:
        super().place(devices)
        if self.config.fisher_data is not None:  # on the device: 2000 forward-backward passes
            self.estimate_fisher(devices[0])
        return self

    def estimate_fisher(self, device: torch.device) -> None:
        """Mean over batches of the squared gradient of the cross-entropy to the model's own
        predictions, per adapted parameter; the anchor is the source value."""
        config = self.config
        read = load_center_crop if config.fisher_center_crop else read_stored
        images = fixed_subset(ImageFolderTask(config.fisher_data, read), config.fisher_samples)
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.fisher = {name: torch.zeros_like(p) for name, p in params.items()}
        batches = 0
        try:
            for batch, _ in DataLoader(images, batch_size=config.fisher_batch_size):
                logits = self.model(batch.to(device).float().div_(255))
                loss = F.cross_entropy(logits, logits.argmax(dim=1))
                for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if grad is not None:
                        self.fisher[name].add_(grad.square())
                batches += 1
        except RuntimeError as error:
            if "stack expects each tensor to be equal size" not in str(error):
                raise
            raise DusaError(
                f"method.fisher_data: the images in {config.fisher_data} differ in size; set method.fisher_center_crop: true"
            ) from None
        self.fisher = {name: value / batches for name, value in self.fisher.items()}
        self.anchor = {name: p.detach().clone() for name, p in params.items()}

    def forward(self, images: torch.Tensor) -> StepOutput:
        logits = self.model(images)
        entropy = softmax_entropy(logits)
        probs = logits.detach().float().softmax(dim=1)
        kept = entropy.detach() < self.margin
        if self.mean_probs is not None:
            kept &= F.cosine_similarity(self.mean_probs[None], probs, dim=1).abs() < self.config.redundancy_margin
        self.kept.add(probs[kept])
        if not kept.any():
            return StepOutput(logits=logits.detach())
        chosen = entropy[kept]
        loss = (chosen * torch.exp(self.margin - chosen.detach())).mean()
        return StepOutput(logits=logits.detach(), loss=loss + self.anchor_loss())

    def anchor_loss(self) -> torch.Tensor | float:
        params = dict(self.model.named_parameters())
        return self.config.fisher_alpha * sum(
            ((fisher * (params[name] - self.anchor[name]).square()).sum() for name, fisher in self.fisher.items()), 0.0
        )

    def after_step(self) -> None:
        """The moving average of predictions takes the mean of this update's kept ones (every
        process's); a process that kept none still joins the sum."""
        totals, count = self.kept.take(next(self.model.parameters()).device)
        if count == 0:
            return
        mean = totals / count
        ema = self.config.prediction_ema
        self.mean_probs = mean if self.mean_probs is None else ema * self.mean_probs + (1 - ema) * mean

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"mean_probs": self.mean_probs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mean_probs = state["mean_probs"]
        self.mean_probs = None if mean_probs is None else mean_probs.to(next(self.model.parameters()).device)
        self.kept.clear()
