"""Tent (Wang et al., ICLR'21): minimise the prediction entropy over the affine parameters of
the normalisation layers.

Generalised beyond the official BatchNorm-only code (research/peers.md §A.3): LayerNorm and
GroupNorm affine parameters are adapted too, since ConvNeXt and ViT have no BatchNorm
(research/dusa_official.md §2). BatchNorm layers use test-batch statistics.
"""

from __future__ import annotations

import torch

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
        return StepOutput(logits=logits.detach(), loss=softmax_entropy(logits).mean())
