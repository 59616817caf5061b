"""A tiny random-initialised SegFormer of the real transformers class, saved as a local directory."""

from pathlib import Path

import torch

import dusa_cli._compat  # noqa: F401  (torchvision shim before transformers)


def write_tiny_segformer(root: Path, num_labels: int = 150, seed: int = 0) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 16, 16],
        num_attention_heads=[1, 1, 1, 1],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=16,
        num_labels=num_labels,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(root)
    return root
