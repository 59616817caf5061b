"""Tent (Wang et al., ICLR'21): minimise the prediction entropy over the affine parameters of
the normalisation layers.

Generalised beyond the official BatchNorm-only code (docs/research/peers.md §A.3): LayerNorm and
GroupNorm affine parameters are adapted too, since ConvNeXt and ViT have no BatchNorm
(docs/research/dusa_official.md §2). BatchNorm layers use test-batch statistics. Segmentation: the
pixel-wise entropy of the logits resized to the image, as the official baseline (§3.7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, TTAMethod, norm_parameters, use_batch_statistics


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax, computed in fp32 for stability under autocast."""
    logits = logits.float()
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


@register_method
class Tent(TTAMethod):
    name = "tent"

    def configure_model(self) -> None:
        super().configure_model()
        use_batch_statistics(self.model)
        for param in norm_parameters(self.model):
            param.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> StepOutput:
        logits = self.model(images)
        scored = logits
        if logits.dim() == 4:  # segmentation: stride-4 logits, scored at every image pixel
            scored = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return StepOutput(logits=logits.detach(), loss=softmax_entropy(scored).mean())
