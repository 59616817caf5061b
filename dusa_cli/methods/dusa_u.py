"""DUSA-U (docs/research/dusa_official.md §1.8): the prior adapts on its unconditional (null-class)
prediction, the classifier on the mixture of detached conditional predictions.

loss = MSE(pred(x_t, ∅), target) [prior only] + loss(Σ_k w_k·sg(pred_k), target) [classifier only].
One prior forward+backward on B samples plus B·K forward-only passes, instead of B·K
forward+backward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dusa_cli.methods import register_method
from dusa_cli.methods.dusa import Dusa
from dusa_cli.objective import mix, prediction_loss


@register_method
class DusaU(Dusa):
    name = "dusa_u"

    def loss(
        self, noisy: torch.Tensor, t: torch.Tensor, target: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        null = torch.full((noisy.shape[0],), self.prior.null_class, device=noisy.device, dtype=torch.long)
        unconditional = self.prior.predict(noisy, t, self.prior.class_embeddings(null)).float()
        with torch.no_grad():
            predictions = self.conditional_predictions(noisy, t, classes)
        return F.mse_loss(unconditional, target.float()) + prediction_loss(
            mix(predictions, weights), target, self.config.loss_weights
        )
