"""The DUSA objective, shared by classification and segmentation: candidate classes, their
mixture weights, and the loss between the weighted mixture of conditional predictions and the
noise path's target (research/dusa_official.md §1.4, §8).

The mixture Σ_y p(y|x)·pred(x_t, t, y) follows ∇log p(x) = Σ_y p(y|x) ∇log p(x|y): the
classifier gets its gradient only through the weights, the prior only through its predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class LossWeights(BaseModel):
    """`mse` is the paper's loss; the seed-000 variant is `norm_l2: 1, cosine: 1, mse: 0`."""

    model_config = ConfigDict(extra="forbid")
    mse: float = Field(default=1.0, ge=0)
    norm_l2: float = Field(default=0.0, ge=0)
    cosine: float = Field(default=0.0, ge=0)


@dataclass
class Candidates:
    classes: torch.Tensor  # (B, K) long: k top classes, then m sampled ones
    weights: torch.Tensor  # (B, K) softmax over the selected scores; carries the classifier's gradient


def select_candidates(
    logits: torch.Tensor,
    *,
    topk: int = 4,
    extra: int = 2,
    temperature: float = 1.0,
    normalize_logits: bool = True,
    extra_sampling: Literal["multinomial", "uniform"] = "multinomial",
    generator: torch.Generator | None = None,
) -> Candidates:
    """Top-k classes plus `extra` classes drawn without replacement from the rest (§1.4 steps 2-5).

    Scores are the L2-normalised logits (the "logit norm" of §1.9; off for the `no_lc`
    ablation). The extra classes are drawn from softmax(raw logits / T) restricted to the
    non-top-k classes (the official "replace_ori"), or uniformly (ablation L6). The weights
    are a softmax of the scores over the K selected classes: with unit-norm logits they are
    always fairly flat (≤ ≈ 0.36 for K = 6), which is the official behaviour.
    """
    logits = logits.float()
    scores = F.normalize(logits, p=2, dim=-1) if normalize_logits else logits
    top = scores.topk(topk, dim=-1).indices
    classes = top
    if extra > 0:
        rest = logits.detach() / temperature
        if extra_sampling == "uniform":
            rest = torch.zeros_like(rest)
        rest = rest.scatter(-1, top, float("-inf"))  # never draw a top-k class
        drawn = torch.multinomial(rest.softmax(dim=-1), extra, replacement=False, generator=generator)
        classes = torch.cat([top, drawn], dim=-1)
    weights = scores.gather(-1, classes).softmax(dim=-1)
    return Candidates(classes=classes, weights=weights)


def mix(predictions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · pred_k for predictions (B, K, ...) and weights (B, K, ...) broadcastable."""
    while weights.dim() < predictions.dim():
        weights = weights.unsqueeze(-1)
    return (weights * predictions).sum(dim=1)


def prediction_loss(prediction: torch.Tensor, target: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Weighted sum of the configured terms, computed in fp32.

    - mse: mean squared error over every element (the official `F.mse_loss`).
    - norm_l2: per image, the L2 norm of the error divided by √D (a root-mean-square error),
      averaged over images; same scale as the target's entries.
    - cosine: per image, 1 − cos(prediction, target) over the flattened tensor, averaged.
    """
    prediction, target = prediction.float(), target.float()
    loss = prediction.new_zeros(())
    if weights.mse:
        loss = loss + weights.mse * F.mse_loss(prediction, target)
    if weights.norm_l2:
        error = (prediction - target).flatten(1)
        loss = loss + weights.norm_l2 * (error.norm(dim=1) / error.shape[1] ** 0.5).mean()
    if weights.cosine:
        cosine = F.cosine_similarity(prediction.flatten(1), target.flatten(1), dim=1)
        loss = loss + weights.cosine * (1 - cosine).mean()
    return loss
