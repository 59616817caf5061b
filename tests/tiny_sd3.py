"""A tiny, randomly initialised Stable Diffusion 3 folder in the diffusers layout, made of the
real diffusers/transformers classes and saved with `save_pretrained`, for offline tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

import dusa_cli._compat  # noqa: F401  (torchvision shim before diffusers/transformers)

IMAGE_SIZE = 32  # pixels; the VAE downsamples 8×, so latents are 4×4 (2×2 transformer patches)
LATENT_SIZE = IMAGE_SIZE // 8
SHIFT = 3.0

TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # > 12 + 16 CLIP channels, so the zero padding is exercised
    "caption_projection_dim": 16,  # = heads × head dim, as in SD3
    "pooled_projection_dim": 16,  # = 6 + 10, the two CLIP projections
    "pos_embed_max_size": 8,  # patches per side: latents up to 16×16
}

VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# (hidden size, projection size) of the two CLIP text encoders: different, so that their order
# in the concatenation matters.
CLIPS = {"text_encoder": (12, 6), "text_encoder_2": (16, 10)}


def _write_clip_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary without merges: every byte symbol, alone and as a word
    end. Returns its size."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # As in the released folders: the pipeline reads CLIP's context length from here.
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return len(tokens)


def _write_t5_tokenizer(folder: Path) -> int:
    """A unigram T5 vocabulary of lowercase letters, with and without the word-start marker."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(letter, -3.0) for letter in string.ascii_lowercase]
    pieces += [("▁" + letter, -3.5) for letter in string.ascii_lowercase]
    T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(folder)
    return len(pieces)


def write_tiny_sd3(root: Path, *, t5: bool = False, seed: int = 0) -> Path:
    """Write the folder under `root` and return it (IMAGE_SIZE images, LATENT_SIZE latents)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = Path(root)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER)
        # Perturb every weight: a zero-initialised output layer or modulation would make the
        # output zero or the blocks the identity and hide wrong inputs.
        with torch.no_grad():
            for parameter in transformer.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        transformer.save_pretrained(root / "transformer")
        AutoencoderKL(**VAE).save_pretrained(root / "vae")

        for index, (encoder, (hidden, projection)) in enumerate(CLIPS.items()):
            vocab_size = _write_clip_tokenizer(root / ("tokenizer" if index == 0 else "tokenizer_2"))
            config = CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                projection_dim=projection,
                num_hidden_layers=3,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
            )
            CLIPTextModelWithProjection(config).save_pretrained(root / encoder)

        if t5:
            vocab_size = _write_t5_tokenizer(root / "tokenizer_3")
            config = T5Config(
                vocab_size=vocab_size,
                d_model=TRANSFORMER["joint_attention_dim"],
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
            )
            T5EncoderModel(config).save_pretrained(root / "text_encoder_3")

    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT}
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root
