"""Generative priors: class-conditional diffusion/flow transformers (DiT, REPA's SiT), their
noise paths and latent encoders, built by preset name from local files only; and the
text-conditioned Stable Diffusion 3 prior for segmentation."""

import dusa_cli._compat  # noqa: F401  (torchvision shim before diffusers/transformers)
from dusa_cli.priors.paths import DDPMPath, LinearFlowPath, NoisePath, SD3FlowPath, create_path
from dusa_cli.priors.prior import GenerativePrior, create_prior
from dusa_cli.priors.prompts import PromptEmbeddings, load_prompt_embeddings
from dusa_cli.priors.registry import available_priors, create_prior_transformer, get_preset
from dusa_cli.priors.sd3 import SD3Prior
from dusa_cli.priors.transformer import DiffusionTransformer, TransformerConfig
from dusa_cli.priors.vae import load_vae

__all__ = [
    "DDPMPath",
    "DiffusionTransformer",
    "GenerativePrior",
    "LinearFlowPath",
    "NoisePath",
    "PromptEmbeddings",
    "SD3FlowPath",
    "SD3Prior",
    "TransformerConfig",
    "available_priors",
    "create_path",
    "create_prior",
    "create_prior_transformer",
    "get_preset",
    "load_prompt_embeddings",
    "load_vae",
]
