"""A generative prior for test-time adaptation: frozen encoder + noise path + class-conditional
transformer, with the operations a diffusion-guided TTA method needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dusa_cli.errors import ConfigError
from dusa_cli.priors.checkpointing import Checkpointing, checkpointed_blocks
from dusa_cli.priors.paths import NoisePath, create_path
from dusa_cli.priors.registry import create_prior_transformer, get_preset
from dusa_cli.priors.transformer import DiffusionTransformer
from dusa_cli.priors.vae import LatentEncoder, load_vae

# Never adapted: the label table (DUSA freezes `y_embedder`; dusa_official.md §1.6), REPA's
# projectors (unused at test time) and the fixed sin-cos `pos_embed`. The official code
# un-freezes pos_embed as a side effect of `requires_grad_(True)` on the whole DiT (§1.6 [A]);
# dusa keeps it fixed, as upstream DiT/SiT intend.
FROZEN_PREFIXES = ("y_embedder.", "projectors.", "pos_embed")


def is_adaptable(name: str) -> bool:
    return not name.startswith(FROZEN_PREFIXES)


class GenerativePrior(nn.Module):
    """Always in eval mode: `train()` is a no-op so that a caller switching a whole wrapper to
    train mode cannot change the prior's behaviour (DUSA keeps everything in eval, §1.6)."""

    def __init__(self, transformer: DiffusionTransformer, path: NoisePath, encoder: LatentEncoder):
        super().__init__()
        self.transformer = transformer
        self.encoder = encoder
        self.path = path
        for name, parameter in transformer.named_parameters():
            if not is_adaptable(name):
                parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> GenerativePrior:
        return super().train(False)

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def null_class(self) -> int:
        if not self.transformer.config.has_null_class:
            raise ConfigError("this prior has no null class (class_dropout_prob is 0)")
        return self.num_classes

    @property
    def pixel_size(self) -> int:
        return self.transformer.config.input_size * self.encoder.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) → clean latents z0 in fp32 whatever the autocast, so the
        noise and x_t are formed in fp32 (the official q_sample computes in fp32 too, but under
        fp16 autocast from an fp16 latent and fp16 noise). Resized bilinearly with
        align_corners=True to the prior's pixel size as the official preprocessor (§1.3)."""
        size = self.pixel_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
        return self.encoder(images * 2 - 1).float()

    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """Label-table rows for `labels` (any shape) → (*labels.shape, hidden), detached."""
        return self.transformer.y_embedder.embedding_table.weight[labels].detach()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | float, class_embedding: torch.Tensor) -> torch.Tensor:
        """The prediction of the path's target (ε or velocity), in_channels channels: DiT's
        learned-variance channels are dropped (DUSA uses the first 4 of 8, §1.4 step 9)."""
        time = self.path.model_time(t).to(x_t.device)
        return self.transformer(x_t, time, class_embedding=class_embedding)[:, : self.in_channels]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.transformer.named_parameters() if is_adaptable(name)]


def create_prior(
    name: str,
    checkpoint: Path | None = None,
    vae: str | Path = "none",
    path: str | None = None,
    gradient_checkpointing: Checkpointing = False,
    **overrides: Any,
) -> GenerativePrior:
    """Preset transformer (+ local weights), encoder (`none` = pixel space) and noise path
    (default: the one the preset was trained on); `gradient_checkpointing`: true, false or the
    number of leading blocks recomputed in backward."""
    transformer = create_prior_transformer(name, checkpoint, **overrides)
    transformer.checkpointed_blocks = checkpointed_blocks(gradient_checkpointing, transformer.config.depth)
    encoder = load_vae(vae)
    if encoder.channels != transformer.config.in_channels:
        raise ConfigError(
            f"prior {name} models {transformer.config.in_channels}-channel inputs but vae '{vae}' gives "
            f"{encoder.channels} channels (latent priors need the SD VAE, pixel-space priors 'none')"
        )
    return GenerativePrior(transformer, create_path(path or get_preset(name).path), encoder)
