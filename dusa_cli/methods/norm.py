"""Norm (BN-adapt): BatchNorm layers normalise with test-batch statistics; nothing is trained.

Models without BatchNorm (ConvNeXt, ViT: LayerNorm only) are unchanged by this method.
"""

from __future__ import annotations

from dusa_cli.methods import register_method
from dusa_cli.methods.base import use_batch_statistics
from dusa_cli.methods.source import Source


@register_method
class Norm(Source):
    """The source model's forward, with BatchNorm on the test batch's statistics."""

    name = "norm"

    def configure_model(self) -> None:
        super().configure_model()
        use_batch_statistics(self.model)
