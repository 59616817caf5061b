"""Norm (BN-adapt): BatchNorm layers normalise with test-batch statistics; nothing is trained.

Models without BatchNorm (ConvNeXt, ViT: LayerNorm only) are unchanged by this method.
"""

from __future__ import annotations

import torch

from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, TTAMethod, use_batch_statistics


@register_method
class Norm(TTAMethod):
    name = "norm"
    trains = False

    def configure_model(self) -> None:
        super().configure_model()
        use_batch_statistics(self.model)

    def forward(self, images: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            return StepOutput(logits=self.model(images))
