"""The DUSA objective, shared by classification and segmentation: candidate classes, their
mixture weights, and the loss between the weighted mixture of conditional predictions and the
noise path's target (docs/research/dusa_official.md §1.4, §8).

The mixture Σ_y p(y|x)·pred(x_t, t, y) follows ∇log p(x) = Σ_y p(y|x) ∇log p(x|y): the
classifier gets its gradient only through the weights, the prior only through its predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from dusa_cli.config.schema import StrictModel
from dusa_cli.draws import Draws


# norm_l2's normalisation of each image's squared error e: divided by (e + c)^p, detached.
NORM_L2_POWER = 0.5
NORM_L2_OFFSET = 1e-3


class LossWeights(StrictModel):
    """`mse` is the paper's loss; the seed-000 variant is `norm_l2: 1, cosine: 1, mse: 0`."""

    mse: float = Field(default=1.0, ge=0)
    norm_l2: float = Field(default=0.0, ge=0)
    cosine: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _something_to_learn(self) -> LossWeights:
        if not (self.mse or self.norm_l2 or self.cosine):  # a zero loss: nothing would adapt
            raise ValueError("every loss weight is 0: give mse, norm_l2 or cosine a positive weight")
        return self


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
    draws: Draws | None = None,
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
        # At a very low temperature the softmax underflows to 0 for most classes, and a draw
        # without replacement then returns zero-probability classes, top-k ones included: those
        # left at 0 get the smallest positive weight, top-k classes stay impossible.
        probabilities = rest.softmax(dim=-1)
        probabilities = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).scatter(-1, top, 0.0)
        drawn = (draws or Draws()).multinomial(probabilities, extra)
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
    - norm_l2: per image, e / sg(e + c)^p with e the image's mean squared error, p 0.5 and
      c 1e-3, averaged over images: about the image's RMSE in value, its gradient the MSE's
      divided by the image's own (detached) error size, so that badly predicted images do not
      dominate the update.
    - cosine: at each position, 1 − cos(prediction, target) across channels, averaged over
      positions and images.
    Seed 000 names its loss `norm_l2_loss + cosine_loss` without defining the terms; these are
    the definitions those names carry in the flow-matching (REPA-SiT based) training code.
    """
    prediction, target = prediction.float(), target.float()
    loss = prediction.new_zeros(())
    if weights.mse:
        loss = loss + weights.mse * F.mse_loss(prediction, target)
    if weights.norm_l2:
        error = (prediction - target).square().flatten(1).mean(dim=1)
        normalized = error / (error.detach() + NORM_L2_OFFSET) ** NORM_L2_POWER
        loss = loss + weights.norm_l2 * normalized.mean()
    if weights.cosine:
        cosine = F.cosine_similarity(prediction, target, dim=1)  # (B, H, W): across channels
        loss = loss + weights.cosine * (1 - cosine).mean()
    return loss


# ---- segmentation: windows, per-pixel classes (docs/research/dusa_official.md §3.2-§3.5) ----


@dataclass(frozen=True)
class Window:
    top: int
    left: int
    size: int


def sliding_windows(height: int, width: int, size: int, stride: int) -> list[Window]:
    """One row of square windows along the image's long side (§3.2: the official height stride is
    0), started every `stride` pixels by mmseg's slide rule with the last one flush with the far
    edge. Across, the row starts at the top (or left) edge, as the official code's; with the short
    side resized to the window size (the default) it covers the image. The official code runs the
    row along the width whatever the shape, so portrait images only got their top square; here it
    follows the long side. A short side a few pixels longer than the window (the window is rounded
    to the prior's multiple, e.g. 455 px → 448) still gets one row, not a second one 7 px lower."""
    if size > min(height, width):
        raise ValueError(f"window {size} is larger than the image's short side {min(height, width)}")

    def starts(length: int) -> list[int]:
        count = max(length - size + stride - 1, 0) // stride + 1
        return [min(index * stride, length - size) for index in range(count)]

    if width >= height:
        return [Window(0, left, size) for left in starts(width)]
    return [Window(top, 0, size) for top in starts(height)]


def sample_window(values: torch.Tensor, image_size: tuple[int, int], window: Window, grid: int) -> torch.Tensor:
    """Bilinear samples of a (C, h, w) map that covers the whole image (any resolution, e.g.
    SegFormer's stride-4 logits) at the centres of a grid × grid partition of `window` → (C, grid, grid).

    The map is read the way predictions are upsampled (align_corners=False over the image), so a
    latent pixel's value comes from exactly the image region it encodes. The official code crops
    the logits with the image geometry divided by 8 although SegFormer's stride is 4, which
    weights each latent pixel with classes from elsewhere (§3.2); this does not.
    """
    height, width = image_size
    centres = (torch.arange(grid, device=values.device, dtype=torch.float32) + 0.5) * (window.size / grid)
    ys = 2 * (window.top + centres) / height - 1
    xs = 2 * (window.left + centres) / width - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([x, y], dim=-1)[None].to(values.dtype)
    return F.grid_sample(values[None], points, mode="bilinear", align_corners=False)[0]


@dataclass
class PixelCandidates:
    classes: torch.Tensor  # (K,) long, ascending: the window's selected classes
    weights: torch.Tensor  # (K, h, w) per-pixel softmax over them; carries the segmenter's gradient
    mask: torch.Tensor  # (h, w) bool: pixels that count in the loss


def select_pixel_classes(
    scores: torch.Tensor, *, topk: int = 5, cap: int = 20, temperature: float = 1.0, draws: Draws | None = None
) -> PixelCandidates:
    """The window's classes from (C, h, w) scores (§3.3): the union over pixels of each pixel's
    top-k; above `cap` classes, every class that is top-1 somewhere is kept and the rest filled at
    random from the union; if the top-1 classes alone exceed `cap`, a random `cap` of them are
    kept and the pixels whose top-1 class was dropped leave the loss. Random choices come from
    `draws` (the image's own stream in a run; torch's global one by default).
    """
    draws = draws or Draws()
    ranked = scores.detach().topk(min(topk, scores.shape[0]), dim=0).indices
    union, top1 = ranked.unique(), ranked[0].unique()
    mask = torch.ones(scores.shape[1:], dtype=torch.bool, device=scores.device)
    if union.numel() <= cap:
        classes = union
    elif top1.numel() <= cap:
        others = union[~torch.isin(union, top1)]
        fill = others[draws.permutation(others.numel(), others.device)[: cap - top1.numel()]]
        classes = torch.cat([top1, fill]).sort().values
    else:
        classes = top1[draws.permutation(top1.numel(), top1.device)[:cap]].sort().values
        mask = torch.isin(ranked[0], classes)
    weights = (scores[classes].float() / temperature).softmax(dim=0)
    return PixelCandidates(classes=classes, weights=weights, mask=mask)


def masked_mixture_loss(
    predictions: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """MSE between Σ_k w_k(h, w)·pred_k(h, w) and the target, for predictions (K, C, h, w),
    weights (K, h, w) and target (C, h, w). Masked pixels are zero in both and still count in
    the mean, as in the official loss (§3.5)."""
    mixture = (weights[:, None] * predictions.float()).sum(dim=0)
    keep = mask.to(mixture.dtype)
    return F.mse_loss(mixture * keep, target.float() * keep)
