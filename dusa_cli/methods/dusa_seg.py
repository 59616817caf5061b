"""DUSA for semantic segmentation (docs/research/dusa_official.md §3; seed 001): a text-conditioned
Stable Diffusion 3 prior, adapted at the same time, turns the segmenter's per-pixel class
probabilities into a training signal, window by window.

One step on one image: segmenter logits (stride 4) → for each 512² window along the long side:
the window's latent noised once at σ, its classes (per-pixel top-5 union, capped at 20), one
velocity prediction per class, the per-pixel mixture's MSE to the velocity target. Each window's
loss is back-propagated as soon as it is built, so the prior holds one window's graph at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from dusa_cli.config.schema import LocalPath
from dusa_cli.data.segmentation import ADE20K_CLASSES
from dusa_cli.errors import ConfigError
from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput
from dusa_cli.methods.guided import GuidedConfig, GuidedMethod, ModelUpdate, draw_timestep
from dusa_cli.objective import Window, masked_mixture_loss, sample_window, select_pixel_classes, sliding_windows
from dusa_cli.priors.sd3 import SD3Prior
from dusa_cli.priors.split import training_bytes


def default_prompt_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dusa" / "prompts"


class DusaSegConfig(GuidedConfig):
    prior: LocalPath | None = Field(
        default=None,
        description="local Stable Diffusion 3 directory (diffusers layout: transformer/, vae/, "
        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; text_encoder_3/ for T5)",
    )
    topk: int = Field(default=5, ge=1, description="classes per pixel whose union forms a window's classes")
    classes_threshold: int = Field(default=20, ge=1, description="at most this many classes per window")
    temperature: float = Field(default=1.0, gt=0, description="of the per-pixel softmax weights")
    window: int = Field(default=512, ge=16, description="window side in pixels of the resized image")
    stride: int = Field(default=171, ge=1, description="window start spacing along the long side (official 171)")
    prompt_template: str = Field(default="a photo of a {}", description="filled with each class name")
    class_names: Literal["ade20k", "model"] | list[str] = Field(
        default="ade20k", description="ade20k: the 150 ADE20K names; model: the segmenter's id2label; or a list"
    )
    use_t5: bool = Field(default=False, description="encode prompts with T5 too (else zeros, SD3's memory saving)")
    t5_length: int = Field(default=256, ge=1, le=512, description="T5 tokens (or zero tokens without T5)")
    prompt_cache: LocalPath | None = Field(
        default=None, description="folder of encoded-prompt files; default $XDG_CACHE_HOME/dusa/prompts"
    )
    update_segmenter: ModelUpdate = Field(
        default="all", description="all (official), norm-layer affine parameters only, or none"
    )
    segmenter_fp32: bool = Field(default=True, description="segmenter outside autocast, as the official code")
    segmenter_checkpointing: bool = Field(
        default=False, description="recompute the segmenter's encoder layers in backward (the official code does)"
    )
    split: list[int] | None = Field(
        default=None, description="first transformer block of each split device (default: balanced by memory)"
    )

    @field_validator("prompt_template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("prompt_template needs exactly one {} for the class name")
        return value


@register_method
class DusaSeg(GuidedMethod):
    name = "dusa_seg"
    Config = DusaSegConfig
    tasks = frozenset({"seg"})
    config: DusaSegConfig
    prior: SD3Prior

    def __init__(self, model: torch.nn.Module, config: DusaSegConfig):
        if config.prior is None:
            raise ConfigError("dusa_seg needs method.prior (--prior DIR): a local Stable Diffusion 3 directory")
        super().__init__(model, config)

    def configure_model(self) -> None:
        super().configure_model()  # frozen, eval mode: no dropout
        # The official segmentation runner puts BatchNorm (SegFormer's decode head has one) on the
        # image's statistics only when it updates norm layers alone; a full update keeps the
        # running statistics (segmentation/core/runner/aux_tta_logits_fp16.py, config_tta_model).
        which = self.config.update_segmenter
        self.adapt_model(which, batch_statistics=which == "norm")
        if self.config.segmenter_checkpointing:
            self.model.checkpoint_layers()

    def place(self, devices: list[torch.device]) -> DusaSeg:
        """The segmenter goes to the first device; the prior is loaded straight onto its split."""
        self.model.to(devices[0])
        prior = SD3Prior.from_pretrained(
            self.config.prior,
            prompts=[self.config.prompt_template.format(name) for name in self.class_names()],
            devices=devices,
            split=self.config.split,
            use_t5=self.config.use_t5,
            max_sequence_length=self.config.t5_length,
            cache_dir=self.config.prompt_cache or default_prompt_cache(),
            gradient_checkpointing=self.config.gradient_checkpointing,
            trainable=self.config.update_prior,
            reserved_first=training_bytes(self.model),  # the segmenter and its optimizer state
        )
        return self.adopt_prior(prior)

    def class_names(self) -> list[str]:
        names = self.config.class_names
        if names == "ade20k":
            names = list(ADE20K_CLASSES)
        elif names == "model":
            labels = self.model.network.config.id2label
            names = [labels[index] for index in range(len(labels))]
        if len(names) != self.model.num_classes:
            raise ConfigError(
                f"method.class_names has {len(names)} names but the segmenter predicts {self.model.num_classes} classes"
            )
        return names

    def compilable(self) -> dict[str, list[torch.nn.Module]]:
        # Block by block: a split transformer moves its activations between devices at block
        # boundaries, and diffusers checkpoints per block.
        return {"model": [self.model], "prior": [*self.prior.transformer.transformer_blocks, self.prior.vae.encoder]}

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return self.run_model(images, self.config.segmenter_fp32)

    def forward(self, images: torch.Tensor) -> StepOutput:
        logits = self.segment(images)
        # Windows back-propagate one at a time into this leaf; the segmenter then gets the sum of
        # their gradients in one pass, so neither the prior's graphs nor the segmenter's are kept twice.
        probe = logits.detach().requires_grad_(logits.requires_grad)
        height, width = images.shape[-2:]
        size = min(self.config.window, height, width)
        size -= size % self.prior.pixel_multiple
        windows = sliding_windows(height, width, size, self.config.stride)
        total = logits.new_zeros(())
        for window in windows:
            loss = self.window_loss(images, probe[0], window) / len(windows)
            self.backward(loss)
            total += loss.detach()
        if probe.grad is not None:
            with torch.autocast(images.device.type, enabled=False):
                logits.backward(probe.grad)
        return StepOutput(logits=logits.detach(), loss=total, backpropagated=True)

    def window_loss(self, images: torch.Tensor, logits: torch.Tensor, window: Window) -> torch.Tensor:
        """The DUSA loss of one window (§3.3-§3.5) for one image's logits (C, h, w)."""
        crop = images[..., window.top : window.top + window.size, window.left : window.left + window.size]
        latents = self.prior.encode(crop)
        grid = latents.shape[-1]
        # L2-normalised over classes first, then read at each latent pixel's centre (§3.3 step 1).
        scores = sample_window(torch.nn.functional.normalize(logits, dim=0), images.shape[-2:], window, grid)
        candidates = select_pixel_classes(
            scores, topk=self.config.topk, cap=self.config.classes_threshold, temperature=self.config.temperature,
            draws=self.draws,
        )
        noise = self.draws.normal(latents)  # one draw per window, shared by its classes
        count = candidates.classes.numel()
        sigma = draw_timestep(self.config, self.prior.path, count, latents.device, self.draws)
        noisy = self.prior.path.add_noise(latents, noise, sigma[:1]).expand(count, -1, -1, -1)
        predictions = self.prior.predict(noisy, sigma, candidates.classes)
        target = self.prior.path.target(latents, noise)[0]
        return masked_mixture_loss(predictions, candidates.weights, candidates.mask, target)
