"""Stable Diffusion 3 as the generative prior of DUSA segmentation: the frozen 16-channel VAE,
the text-conditioned MMDiT (diffusers SD3Transformer2DModel), per-class prompt embeddings and the
rectified-flow path, with the transformer optionally split over several devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.priors.checkpointing import Checkpointing, checkpoint_only, checkpointed_blocks
from dusa_cli.priors.paths import SD3FlowPath
from dusa_cli.priors.prompts import CLIP_LENGTH, PromptEmbeddings, load_prompt_embeddings
from dusa_cli.priors.split import module_bytes, place_transformer
from dusa_cli.priors.vae import SD_VAE_CONFIG, encoder_only

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (docs/research/peers.md §D).
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}

# The SD3 16-channel AutoencoderKL (vae/config.json of the same repository): the SD VAE's
# architecture with 16 latent channels, a shift and no quant convolutions.
SD3_VAE: dict[str, Any] = SD_VAE_CONFIG | {
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}



def random_prompt_embeddings(
    num_prompts: int, clip_dim: int = 2048, pooled_dim: int = 2048, generator: torch.Generator | None = None
) -> PromptEmbeddings:
    """Stand-in CLIP embeddings (no T5) of SD3-medium's sizes, for benchmarks without encoders."""
    clip = torch.randn(num_prompts, CLIP_LENGTH, clip_dim, generator=generator)
    return PromptEmbeddings(clip, torch.randn(num_prompts, pooled_dim, generator=generator))


def _mark_class_batch_dynamic(transformer: nn.Module) -> None:
    """The blocks' batch holds one row per class of the window, a number that changes from window
    to window (1 to method.classes_threshold). Dynamo would compile each block for the first
    window's number, then again with a dynamic batch at the next one: minutes on a GPU. The
    embedders' outputs, which the blocks take in, are marked dynamic in their batch from the
    first call, so a compiled block compiles once (a single-class window still gets its own
    graph: Dynamo specialises sizes 0 and 1). Without compilation the marks do nothing."""

    def mark(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        # diffusers makes pos_embed's output contiguous; already so, it stays this tensor, mark and all.
        output = output.contiguous()
        torch._dynamo.maybe_mark_dynamic(output, 0)
        return output

    for module in (transformer.pos_embed, transformer.time_text_embed, transformer.context_embedder):
        module.register_forward_hook(mark)


def _check_devices(devices: list[torch.device]) -> list[torch.device]:
    if not devices:
        raise ConfigError("the SD3 prior needs at least one device")
    return [torch.device(device) for device in devices]


def _subfolder(directory: Path, name: str) -> Path:
    folder = directory / name
    if not folder.is_dir():
        raise DusaError(f"SD3 folder {folder} is missing (expected the diffusers layout of stable-diffusion-3)")
    return folder


def _load_diffusers(model_class: type, folder: Path) -> nn.Module:
    try:
        # low_cpu_mem_usage: no random initialisation of the 2 B parameters before the weights load (vae.py)
        model = model_class.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=True)
    except Exception as error:  # OSError, ValueError, SafetensorError, …: whatever the files' fault
        raise DusaError(f"cannot load {folder}: {error}".replace("\n", " ")) from error
    return model.float()  # fp32 whatever the stored dtype; autocast decides the compute precision


class SD3Prior(nn.Module):
    """Always in eval mode, like GenerativePrior: `train()` is a no-op, so no dropout ever."""

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        prompts: PromptEmbeddings,
        *,
        devices: list[torch.device],
        split: list[int] | None = None,
        max_sequence_length: int = 256,
        gradient_checkpointing: Checkpointing = False,
        trainable: bool = True,
        reserved_first: int = 0,
    ):
        """`trainable`: whether the transformer will adapt (its Adam state then weighs in the
        split); `reserved_first`: bytes other models keep on devices[0] (the segmenter);
        `gradient_checkpointing`: true, false or the number of leading blocks recomputed."""
        super().__init__()
        config = transformer.config
        if prompts.pooled.shape[-1] != config.pooled_projection_dim:
            raise DusaError(
                f"pooled prompt embeddings have {prompts.pooled.shape[-1]} channels but the transformer "
                f"expects {config.pooled_projection_dim} (text encoders and transformer do not belong together)"
            )
        self.devices = _check_devices(devices)
        self.vae = encoder_only(vae).to(self.devices[0]).eval().requires_grad_(False)
        self.prompts = prompts.to(self.devices[0])
        self.path = SD3FlowPath()
        # Where T5 is not used the pipeline still appends this many zero tokens (peers.md §D).
        self.t5_length = prompts.t5.shape[1] if prompts.t5 is not None else max_sequence_length
        # Every transformer tensor adapts (DUSA-seg trains its whole diffusion model,
        # dusa_official.md §3.6); the fixed sin-cos position table is already a buffer in
        # diffusers' PatchEmbed, so there is nothing to freeze.
        self.transformer = transformer.requires_grad_(trainable)
        self.block_devices = place_transformer(
            transformer, self.devices, split, first_extra=module_bytes(self.vae) + prompts.nbytes + reserved_first
        )
        _mark_class_batch_dynamic(transformer)
        count = checkpointed_blocks(gradient_checkpointing, len(transformer.transformer_blocks))
        if count:
            transformer.enable_gradient_checkpointing(checkpoint_only(transformer.transformer_blocks[:count]))
        super().train(False)

    def train(self, mode: bool = True) -> SD3Prior:
        return super().train(False)

    @classmethod
    def from_pretrained(
        cls,
        directory: Path,
        *,
        prompts: list[str],
        devices: list[torch.device],
        use_t5: bool = False,
        max_sequence_length: int = 256,
        cache_dir: Path | None = None,
        **placement: Any,
    ) -> SD3Prior:
        """A local diffusers SD3 folder (transformer/, vae/, text encoders, scheduler/), in fp32.
        `placement`: the constructor's split, gradient_checkpointing, trainable, reserved_first."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        devices = _check_devices(devices)
        directory = Path(directory)
        if not directory.is_dir():
            raise DusaError(f"SD3 directory {directory} does not exist")
        transformer_folder, vae_folder = _subfolder(directory, "transformer"), _subfolder(directory, "vae")
        # Prompts first: the text encoders are freed before the transformer is loaded.
        embeddings = load_prompt_embeddings(
            directory,
            prompts,
            use_t5=use_t5,
            max_sequence_length=max_sequence_length,
            cache_dir=cache_dir,
            device=devices[0],
        )
        return cls(
            _load_diffusers(SD3Transformer2DModel, transformer_folder),
            _load_diffusers(AutoencoderKL, vae_folder),
            embeddings,
            devices=devices,
            max_sequence_length=max_sequence_length,
            **placement,
        )

    @classmethod
    def from_config(
        cls, transformer_config: dict[str, Any], vae_config: dict[str, Any], prompts: PromptEmbeddings, **options: Any
    ) -> SD3Prior:
        """Randomly initialised models of the given architectures (benchmarks); `options` as the
        constructor's (devices, split, gradient_checkpointing, trainable, reserved_first)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        with torch.device(options["devices"][0]):  # initialised where it runs: 2 B parameters are slow on a CPU
            transformer, vae = SD3Transformer2DModel(**transformer_config), AutoencoderKL(**vae_config)
        return cls(transformer, vae, prompts, **options)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling × transformer patch size."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * self.transformer.config.patch_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) → latents (posterior mean − shift_factor) · scaling_factor,
        in fp32 whatever the autocast (noise and x_t are formed in fp32). The mean, not a sample,
        as the official DUSA (dusa_official.md §3.2)."""
        multiple = self.pixel_multiple
        if images.shape[-2] % multiple or images.shape[-1] % multiple:
            raise ConfigError(
                f"SD3 needs image windows whose sides are multiples of {multiple} px, got {tuple(images.shape[-2:])}"
            )
        config = self.vae.config
        mean = self.vae.encode(images.to(self.devices[0], torch.float32) * 2 - 1).latent_dist.mean
        return (mean.float() - config.shift_factor) * config.scaling_factor

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Velocity (ε − x0) for noisy latents (N, 16, h, w) at noise levels σ (N,), each
        conditioned on the prompt of its class (N,); returned on devices[0]."""
        device = self.devices[0]
        config = self.transformer.config
        encoder_states, pooled = self.prompts.conditioning(classes, config.joint_attention_dim, self.t5_length)
        (velocity,) = self.transformer(
            hidden_states=noisy.to(device),
            encoder_hidden_states=encoder_states,
            pooled_projections=pooled,
            timestep=self.path.model_time(sigma).to(device),
            return_dict=False,
        )
        return velocity.to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.transformer.parameters())
