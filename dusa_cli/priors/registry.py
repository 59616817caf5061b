"""Named prior presets (timm-style) and strict checkpoint loading with a readable mismatch report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from dusa_cli.config.schema import format_validation_error
from dusa_cli.errors import ConfigError, DusaError, did_you_mean
from dusa_cli.models.checkpoint import load_strict, read_state_dict
from dusa_cli.priors.transformer import DiffusionTransformer, TransformerConfig


@dataclass(frozen=True)
class PriorPreset:
    config: TransformerConfig
    path: str  # the noise path the weights were trained on (dusa_cli.priors.paths.PATHS)
    packaged: str | None = None  # weights file shipped in dusa_cli/assets (never downloaded)


def _latent_256(hidden_size: int, depth: int, num_heads: int, **kwargs: Any) -> TransformerConfig:
    """SD-VAE latents of 256-px images: 4×32×32, patch 2 → 256 tokens (dusa_official.md §1.2)."""
    return TransformerConfig(
        input_size=32, patch_size=2, in_channels=4, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
        **kwargs,
    )


def _repa_sit(hidden_size: int, depth: int, num_heads: int, encoder_depth: int) -> PriorPreset:
    # REPA: velocity output (no learned sigma), one projector to DINOv2-B's 768 (peers.md §C).
    config = _latent_256(hidden_size, depth, num_heads, encoder_depth=encoder_depth, projector_dims=(768,))
    return PriorPreset(config, path="linear")


_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)

_PRESETS: dict[str, PriorPreset] = {
    # XL numbers and encoder_depth 8 of the released REPA model: peers.md §C. L/B/S use the
    # DiT/SiT family's hidden/depth/heads (DiT paper, Table 1) and encoder_depth 8/4/4 as in the
    # REPA paper [both unverified in the research notes]; encoder_depth changes no weight and
    # nothing at test time.
    "sit_xl_2": _repa_sit(1152, 28, 16, encoder_depth=8),
    "sit_l_2": _repa_sit(1024, 24, 16, encoder_depth=8),
    "sit_b_2": _repa_sit(768, 12, 12, encoder_depth=4),
    "sit_s_2": _repa_sit(384, 12, 6, encoder_depth=4),
    # DUSA's prior: DiT-XL/2 at 256 px with learned sigma (8 output channels), DDPM (§1.2).
    "dit_xl_2_256": PriorPreset(_latent_256(1152, 28, 16, learn_sigma=True), path="ddpm"),
    # Random tiny models for tests and smoke runs.
    "sit_tiny": PriorPreset(
        TransformerConfig(**_TINY, encoder_depth=1, projector_dims=(16,), projector_width=32), path="linear"
    ),
    "dit_tiny": PriorPreset(TransformerConfig(**_TINY, learn_sigma=True), path="ddpm"),
    # Pixel-space prior for the embedded digits benchmark: 32×32 RGB, patch 4 → 64 tokens.
    "sit_digits": PriorPreset(
        TransformerConfig(
            input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=6, num_heads=4, num_classes=10
        ),
        path="linear",
        packaged="sit_digits.safetensors",  # written by `dusa pretrain digits-prior`
    ),
}


def available_priors() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> PriorPreset:
    if name not in _PRESETS:
        raise ConfigError(f"unknown prior '{name}'{did_you_mean(name, _PRESETS)} (available: {', '.join(_PRESETS)})")
    return _PRESETS[name]


def packaged_weights(name: str) -> Path:
    """Where the preset's packaged weights file lives (it may not have been trained yet)."""
    preset = get_preset(name)
    if preset.packaged is None:
        shipped = [other for other, p in _PRESETS.items() if p.packaged]
        raise ConfigError(
            f"prior {name} ships no weights (packaged: {', '.join(shipped)}): pass --prior-checkpoint FILE (local "
            "weights), or for a smoke run method.prior_pretrained=false with method.prior_random_init=true"
        )
    return Path(str(resources.files("dusa_cli") / "assets" / preset.packaged))


def create_prior_transformer(name: str, checkpoint: Path | None = None, **overrides: Any) -> DiffusionTransformer:
    """The preset's transformer, config fields overridden by keyword, weights loaded strictly
    from a local file (flat, or wrapped with `ema` preferred over `model`)."""
    config = get_preset(name).config
    try:
        config = TransformerConfig(**{**config.model_dump(), **overrides})
    except ValidationError as error:
        raise ConfigError(f"prior {name}: {format_validation_error(error, TransformerConfig)}") from None
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    # Every tensor is set below, by DiT's own init or by the checkpoint: the layers' default init
    # would only be overwritten (DiT-XL/2 builds in 2.2 s without it, 5-6 s with it, on 2 cores).
    # Built where tensors are made by default: the CPU, or the meta device under
    # `with torch.device("meta")` (shapes only).
    device = torch.get_default_device()
    with torch.device("meta"):
        model = DiffusionTransformer(config)
    model.to_empty(device=device)
    if state is None:
        model.initialize_weights()
        return model
    try:
        load_strict(model, state, f"checkpoint {checkpoint}", target=name)
    except DusaError as error:
        raise DusaError(_explain_mismatch(state, model, name, checkpoint, error)) from None
    return model


def _explain_mismatch(
    state: dict[str, torch.Tensor], model: DiffusionTransformer, name: str, checkpoint: Path, error: DusaError
) -> str:
    """Architecture numbers that both the file and the preset imply and that differ, when there
    are any, else the key-level report; plus the presets the file would fit. (A number that only
    one side implies comes from tensors the other lacks: the key-level report names them.)"""
    found, expected = describe_state_dict(state), describe_state_dict(model.state_dict())
    differences = [
        f"{key} {found[key]} in the file vs {expected[key]}"
        for key in expected
        if key in found and found[key] != expected[key]
    ]
    fits = [other for other in _PRESETS if other != name and _fits(state, other)]
    hint = f" (the file fits {', '.join(fits)})" if fits else ""
    if differences:
        return f"checkpoint {checkpoint} does not fit {name}: {', '.join(differences)}{hint}"
    return f"{error}{hint}"


def describe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture numbers a DiT/SiT state dict implies, read off tensor shapes."""
    info: dict[str, Any] = {}
    patch = state.get("x_embedder.proj.weight")
    if patch is not None and patch.ndim == 4:
        info.update(hidden_size=patch.shape[0], in_channels=patch.shape[1], patch_size=patch.shape[2])
    if "pos_embed" in state:
        info["tokens"] = state["pos_embed"].shape[-2]
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    info["depth"] = len(blocks)
    if "blocks.0.mlp.fc1.weight" in state:
        info["mlp_width"] = state["blocks.0.mlp.fc1.weight"].shape[0]
    info["qk_norm"] = "blocks.0.attn.q_norm.weight" in state
    if "y_embedder.embedding_table.weight" in state:
        info["label_rows"] = state["y_embedder.embedding_table.weight"].shape[0]
    final = state.get("final_layer.linear.weight")
    if final is not None and "patch_size" in info:
        info["out_channels"] = final.shape[0] // info["patch_size"] ** 2
    projectors = sorted({int(m.group(1)) for key in state if (m := re.match(r"projectors\.(\d+)\.4\.weight", key))})
    info["projector_dims"] = tuple(state[f"projectors.{i}.4.weight"].shape[0] for i in projectors)
    return info


def _fits(state: dict[str, torch.Tensor], name: str) -> bool:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        expected = DiffusionTransformer(_PRESETS[name].config).state_dict()
    return expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in expected)
