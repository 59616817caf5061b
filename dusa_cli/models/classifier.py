"""timm classifiers by name, local weights only, with input normalisation folded into the model."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import torch
from torch import nn

from dusa_cli.config.schema import ModelConfig
from dusa_cli.errors import ConfigError, DusaError, did_you_mean, listed
from dusa_cli.models import digits_resnet  # noqa: F401  (registers the digits model with timm)
from dusa_cli.models.checkpoint import load_strict, read_state_dict
from dusa_cli.models.segmenter import SEGMENTERS


class NormalizedClassifier(nn.Module):
    """Takes images in [0, 1] at native size (ImageNet-C files are already 224 px: no resize or
    crop, docs/research/peers.md §E.2) and normalises them with the model's own mean/std."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.backbone.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


def create_classifier(config: ModelConfig) -> NormalizedClassifier:
    import timm

    if config.name in SEGMENTERS:
        raise ConfigError(f"'{config.name}' is a segmentation model: run it with task seg (--task seg, or dusa adapt-seg)")
    if not timm.is_model(config.name):
        architecture = config.name.split(".")[0]
        # Names containing the typed one, those starting with it first (resnet5 → resnet50, ...),
        # else the closest spellings.
        containing = sorted(timm.list_models(f"*{architecture[:12]}*"), key=lambda name: (not name.startswith(architecture), len(name)))
        close = containing[:5] or difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model '{config.name}'{hint}")
    try:
        timm.models.get_pretrained_cfg(config.name)
    except RuntimeError:  # an unknown tag: "Invalid pretrained tag (x) for arch."
        architecture, _, tag = config.name.partition(".")
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{architecture}.*")]
        raise ConfigError(
            f"model '{config.name}': {architecture} has no weights tagged '{tag}'{did_you_mean(tag, tags)} (its tags: {listed(tags, 6) or 'none'})"
        ) from None
    kwargs = {"num_classes": config.num_classes} if config.num_classes is not None else {}
    if config.pretrained and config.checkpoint is None:
        backbone = _create_with_packaged_weights(timm, config.name, kwargs)
    else:
        backbone = timm.create_model(config.name, pretrained=False, **kwargs)
        if config.checkpoint is not None:
            state = _in_timm_layout(backbone, read_state_dict(config.checkpoint))
            load_strict(backbone, state, f"checkpoint {config.checkpoint}")
    cfg = backbone.pretrained_cfg
    return NormalizedClassifier(backbone, tuple(cfg["mean"]), tuple(cfg["std"]))


def _in_timm_layout(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as their authors released them (FB's convnext_large_1k_224_ema.pth names its layers
    `downsample_layers.*`, `stages.N.M.dwconv`, ...) renamed to timm's by the model family's own
    `checkpoint_filter_fn`, the one timm applies to its pretrained files. A state that already
    fits, or a family without a filter, is left as it is for `load_strict` to judge."""
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None or state.keys() == backbone.state_dict().keys():
        return state
    try:
        return filter_fn(state, backbone)
    except (KeyError, RuntimeError, ValueError):  # not that family's release either: report the names as given
        return state


def _create_with_packaged_weights(timm, name: str, kwargs: dict) -> nn.Module:
    """`pretrained: true` is honoured only for weights that lie on disk (pretrained_cfg.file)."""
    cfg = timm.models.get_pretrained_cfg(name)
    local = getattr(cfg, "file", None) if cfg is not None else None
    if not local:
        raise ConfigError(
            f"model '{name}' has no local weights; dusa never downloads: pass --checkpoint PATH"
        )
    if not Path(local).is_file():
        raise DusaError(f"packaged weights for '{name}' are missing: {local}")
    return timm.create_model(name, pretrained=True, **kwargs)
