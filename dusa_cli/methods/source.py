"""Source: the unadapted model, the reference every method is compared with."""

from __future__ import annotations

import torch

from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, TTAMethod


@register_method
class Source(TTAMethod):
    name = "source"
    trains = False

    def forward(self, images: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            return StepOutput(logits=self.model(images))
