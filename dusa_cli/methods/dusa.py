"""DUSA (Li et al., NeurIPS 2024): a class-conditional diffusion or flow prior, adapted at the
same time, turns the classifier's own predictions into a training signal through the mixture
of conditional scores (docs/research/dusa_official.md §1.4, §8).

One step: classifier logits (fp32) → k top + m sampled candidate classes and their weights →
the image's latent noised once at a fixed timestep → one batched prior call over B·K →
loss between the weighted mixture of predictions and the path's target (ε or velocity).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from dusa_cli.config.schema import LocalPath
from dusa_cli.errors import ConfigError
from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput
from dusa_cli.methods.guided import GuidedConfig, GuidedMethod, ModelUpdate, draw_timestep
from dusa_cli.objective import LossWeights, mix, prediction_loss, select_candidates
from dusa_cli.priors import GenerativePrior, create_prior
from dusa_cli.priors.registry import packaged_weights


class DusaConfig(GuidedConfig):
    prior: str = Field(default="dit_xl_2_256", description="prior preset (dusa_cli.priors registry)")
    prior_checkpoint: LocalPath | None = Field(default=None, description="local weights of the prior")
    prior_pretrained: bool = Field(
        default=False, description="use the weights shipped in the package for this preset (sit_digits)"
    )
    prior_random_init: bool = Field(
        default=False,
        description="run the prior untrained (random weights), e.g. a benchmark; otherwise a run needs "
        "prior_checkpoint or prior_pretrained",
    )
    vae: Literal["none"] | LocalPath = Field(default="none", description="'none' (pixel space) or a local VAE directory/file")
    topk: int = Field(default=4, ge=1)
    extra: int = Field(default=2, ge=0, description="m classes sampled beyond the top-k")
    temperature: float = Field(default=1.0, gt=0, description="of the extra-class sampling")
    extra_sampling: Literal["multinomial", "uniform"] = "multinomial"
    normalize_logits: bool = Field(default=True, description="L2-normalise logits (off: the no_lc ablation)")
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    update_classifier: ModelUpdate = "all"
    classifier_fp32: bool = Field(default=True, description="classifier outside autocast, as the official code")


@register_method
class Dusa(GuidedMethod):
    name = "dusa"
    Config = DusaConfig
    tasks = frozenset({"cls"})
    config: DusaConfig
    prior: GenerativePrior

    def __init__(self, model: nn.Module, config: DusaConfig):
        checkpoint = config.prior_checkpoint
        if checkpoint is None and config.prior_pretrained:
            checkpoint = packaged_weights(config.prior)
        if checkpoint is None and not config.prior_random_init:  # as an untrained classifier is refused
            raise ConfigError(
                f"prior '{config.prior}' has no weights: pass --prior-checkpoint PATH (local weights), set "
                "method.prior_pretrained=true (weights packaged on disk) or method.prior_random_init=true (untrained)"
            )
        prior = create_prior(
            config.prior,
            checkpoint=checkpoint,
            vae=config.vae,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        _check_classes(model, prior, config)
        super().__init__(model, config)
        self.adopt_prior(prior)

    def configure_model(self) -> None:
        super().configure_model()  # frozen, eval mode: no label dropout, no drop-path
        # The official classification runner puts every BatchNorm on the batch's statistics,
        # whatever it updates (docs/research/dusa_official.md §1.6; the paper's models have none).
        self.adapt_model(self.config.update_classifier, batch_statistics=True)

    def compilable(self) -> dict[str, list[nn.Module]]:
        # The frozen encoder too: the SD VAE's convolutions are 5 % of the step's FLOPs (0.271 of 5.18 TFLOP, docs/BENCHMARKS.md).
        return {"model": [self.model], "prior": [self.prior.transformer, self.prior.encoder]}

    def timestep(self, batch: int, device: torch.device) -> torch.Tensor:
        return draw_timestep(self.config, self.prior.path, batch, device, self.draws)

    def forward(self, images: torch.Tensor) -> StepOutput:
        logits = self.run_model(images, self.config.classifier_fp32)
        candidates = select_candidates(
            logits,
            topk=self.config.topk,
            extra=self.config.extra,
            temperature=self.config.temperature,
            normalize_logits=self.config.normalize_logits,
            extra_sampling=self.config.extra_sampling,
            draws=self.draws,
        )
        latents = self.prior.encode(images)
        noise = self.draws.normal(latents)  # one draw per image, shared by its K candidates
        t = self.timestep(latents.shape[0], latents.device)
        noisy = self.prior.path.add_noise(latents, noise, t)
        target = self.prior.path.target(latents, noise)
        loss = self.loss(noisy, t, target, candidates.classes, candidates.weights)
        return StepOutput(logits=logits.detach(), loss=loss)

    def conditional_predictions(self, noisy: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """One batched prior call over the B·K (image, candidate) pairs → (B, K, C, H, W)."""
        batch, k = classes.shape
        predictions = self.prior.predict(
            noisy.repeat_interleave(k, dim=0),
            t.repeat_interleave(k, dim=0),
            self.prior.class_embeddings(classes.reshape(-1)),
        )
        return predictions.float().view(batch, k, *predictions.shape[1:])

    def loss(
        self, noisy: torch.Tensor, t: torch.Tensor, target: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The objective for noisy latents (B, C, H, W) at times t (B,), against the path's target,
        over each image's candidate classes (B, K) and their weights (B, K)."""
        predictions = self.conditional_predictions(noisy, t, classes)
        return prediction_loss(mix(predictions, weights), target, self.config.loss_weights)


def _check_classes(model: nn.Module, prior: GenerativePrior, config: DusaConfig) -> None:
    """Candidate classes index the prior's label table by the classifier's class ids: a mismatch
    would condition on the wrong rows (or past the table) without a word."""
    classes = getattr(model, "num_classes", prior.num_classes)
    if classes != prior.num_classes:
        raise ConfigError(
            f"the classifier predicts {classes} classes but prior {config.prior} is conditioned on "
            f"{prior.num_classes}: both must use the same label set"
        )
    if config.topk + config.extra > classes:
        raise ConfigError(f"topk + extra = {config.topk + config.extra} candidates, more than the {classes} classes")
