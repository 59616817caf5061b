"""Tent (Wang et al., ICLR'21): minimise the prediction entropy over the affine parameters of
the normalisation layers.

Generalised beyond the official BatchNorm-only code (research/peers.md §A.3): LayerNorm and
GroupNorm affine parameters are adapted too, since ConvNeXt and ViT have no BatchNorm
(research/dusa_official.md §2). BatchNorm layers use test-batch statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, TTAMethod, use_batch_statistics

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


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
        for module in self.model.modules():
            if isinstance(module, NORM_LAYERS):
                for param in (module.weight, module.bias):
                    if param is not None:
                        param.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> StepOutput:
        logits = self.model(images)
        return StepOutput(logits=logits.detach(), loss=softmax_entropy(logits).mean())
