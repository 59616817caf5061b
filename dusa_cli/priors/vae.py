"""Frozen encoders from images in [-1, 1] to the space a prior works in: the SD VAE's latents
for DiT/SiT, or the pixels themselves for pixel-space priors. Local files only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dusa_cli.errors import DusaError
from dusa_cli.models.checkpoint import load_strict, read_state_dict

# DiT and REPA's SiT were both trained on SD-VAE latents scaled by 0.18215, no shift
# (docs/research/dusa_official.md §1.2, docs/research/peers.md §C). The scale belongs to how the prior was
# trained, so it is fixed here rather than read from whichever VAE config is given.
SD_VAE_SCALE = 0.18215

# Architecture of stabilityai/sd-vae-ft-ema / -ft-mse, to build the model for a bare weights file.
SD_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}

# A random VAE of the same family that is quick on CPU (2× downsampling), for tests.
TINY_VAE_CONFIG: dict = {
    **SD_VAE_CONFIG,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class LatentEncoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) → (B, channels, H/downsample, W/downsample)."""

    channels: int
    downsample: int


class PixelSpace(LatentEncoder):
    """`vae: none`: the prior models the [-1, 1] pixels directly, no scaling."""

    channels = 3
    downsample = 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def encoder_only(vae: nn.Module) -> nn.Module:
    """A diffusers AutoencoderKL without its decoder: DUSA only encodes, and the decoder is over
    half of an SD VAE's weights (about 200 MB in fp32 on the first device)."""
    del vae.decoder, vae.post_quant_conv
    return vae


class VAEEncoder(LatentEncoder):
    """Posterior mean × 0.18215, no sampling, as the official DUSA code (dusa_official.md §1.2)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = encoder_only(vae).eval().requires_grad_(False)
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * SD_VAE_SCALE


def load_vae(spec: str | Path) -> LatentEncoder:
    """`none`, a local diffusers directory (a VAE or a pipeline with a vae/ folder), or one
    diffusers-format weights file loaded strictly into the SD-VAE architecture."""
    if str(spec) == "none":
        return PixelSpace()
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.is_dir():
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        try:  # low_cpu_mem_usage (needs accelerate): weights go straight into a model built on the
            # meta device, with no random initialisation first: faster, half the host memory
            vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=True)
        except (OSError, ValueError) as error:
            raise DusaError(f"cannot load the VAE directory {path}: {error}".replace("\n", " ")) from error
        return VAEEncoder(vae)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        load_strict(vae, read_state_dict(path), f"VAE weights {path} (SD-VAE architecture)")
        return VAEEncoder(vae)
    raise DusaError(
        f"VAE {spec} is not 'none', a diffusers directory or a weights file ({', '.join(WEIGHT_SUFFIXES)})"
        + ("" if path.exists() else ": no such path")
    )
