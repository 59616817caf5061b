"""SegFormer (transformers) from a local directory, with input normalisation folded into the model."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from dusa_cli.config.schema import ModelConfig
from dusa_cli.data.files import require_directory
from dusa_cli.errors import ConfigError, DusaError, did_you_mean

SEGMENTERS = ("segformer",)
# The mean/std of every NVIDIA SegFormer checkpoint and of mmseg's (docs/research/peers.md §E.1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """Images in [0, 1] (B, 3, H, W) → class logits (B, C, ⌈H/4⌉, ⌈W/4⌉), SegFormer's stride-4
    output. Resizing is the engine's (short side 512, docs/research/dusa_official.md §3.2)."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_labels)

    @property
    def min_side(self) -> int:
        """The smallest input side every stage accepts: each stage's spatial-reduction conv
        (kernel = stride = sr_ratio, no padding) needs sr_ratio pixels at the stage's stride
        (32 for every released SegFormer)."""
        config = self.network.config
        stride, side = 1, 1
        for patch_stride, sr_ratio in zip(config.strides, config.sr_ratios):
            stride *= patch_stride
            side = max(side, stride * sr_ratio)
        return side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=(images - self.mean) / self.std).logits

    def checkpoint_layers(self) -> None:
        """Recompute each transformer layer of the encoder in backward (the official code
        checkpoints the MiT backbone, docs/research/dusa_official.md §3.6). transformers' own switch
        acts in train mode only, which would also turn on drop-path; this works in eval mode."""
        from torch.utils.checkpoint import checkpoint
        from transformers.models.segformer.modeling_segformer import SegformerLayer

        for layer in self.network.modules():
            if isinstance(layer, SegformerLayer):
                layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def _normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's own preprocessor mean/std when it ships one, else ImageNet's."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DusaError(f"cannot read {path}: {exc}") from exc
    return tuple(processor.get("image_mean", IMAGENET_MEAN)), tuple(processor.get("image_std", IMAGENET_STD))


def create_segmenter(config: ModelConfig) -> Segmenter:
    from transformers import SegformerForSemanticSegmentation

    if config.name not in SEGMENTERS:
        raise ConfigError(f"unknown segmenter '{config.name}'{did_you_mean(config.name, SEGMENTERS)} (available: {', '.join(SEGMENTERS)})")
    directory = config.checkpoint
    if directory is None:
        raise ConfigError(
            "segformer needs model.checkpoint (--checkpoint DIR): a local transformers SegFormer directory, "
            "e.g. a copy of nvidia/segformer-b5-finetuned-ade-640-640"
        )
    require_directory(directory, "SegFormer directory")
    if not (directory / "config.json").is_file():
        raise DusaError(f"{directory} is not a transformers model directory (no config.json)")
    try:
        network = SegformerForSemanticSegmentation.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DusaError(f"cannot load SegFormer from {directory}: {exc}") from exc
    if config.num_classes is not None and config.num_classes != network.config.num_labels:
        raise ConfigError(
            f"model.num_classes is {config.num_classes} but {directory} predicts {network.config.num_labels}"
        )
    mean, std = _normalisation(directory)
    return Segmenter(network, mean, std)
