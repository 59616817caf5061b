"""One class-conditional latent transformer with adaLN-Zero blocks, covering DiT and REPA's SiT.

The two released families differ only in configuration (docs/research/peers.md §C,
docs/research/dusa_official.md §1.2): DiT predicts ε and a learned variance (2× the input channels),
SiT predicts a velocity (1× the input channels) and carries REPA's projector MLPs. Module and
parameter names reproduce the upstream module trees so released checkpoints load strictly; the
code itself is written from the descriptions, not copied.

Time conditioning is the same sinusoidal embedder for both: DiT is fed integer steps in
[0, 1000), SiT continuous t in [0, 1]; the noise path (`dusa_cli.priors.paths`) picks the scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

# Upstream DiT/SiT constants (docs/research/peers.md §C): 256 sinusoidal frequencies, max period 1e4,
# non-affine LayerNorms with eps 1e-6, REPA projector width 2048.
FREQUENCY_SIZE = 256
MAX_PERIOD = 10_000
NORM_EPS = 1e-6
PROJECTOR_WIDTH = 2048


class TransformerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: PositiveInt  # latent (or pixel) side length the model sees
    patch_size: PositiveInt
    in_channels: PositiveInt
    hidden_size: PositiveInt
    depth: PositiveInt
    num_heads: PositiveInt
    mlp_ratio: float = Field(default=4.0, gt=0)
    num_classes: PositiveInt = 1000
    # Only decides whether the label table has a null row (index num_classes): labels are never
    # dropped here, see DiffusionTransformer.forward.
    class_dropout_prob: float = Field(default=0.1, ge=0, lt=1)
    learn_sigma: bool = False  # DiT: ε plus a variance channel per input channel
    qk_norm: bool = False
    # REPA: block whose output the projectors read in training; recorded, not used at test time.
    encoder_depth: int = Field(default=0, ge=0)
    projector_dims: tuple[PositiveInt, ...] = ()  # REPA: one projector MLP per target-encoder width
    projector_width: PositiveInt = PROJECTOR_WIDTH

    @model_validator(mode="after")
    def _consistent(self) -> TransformerConfig:
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:  # 2-D sin-cos table: sin and cos for each of the two axes
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of 4")
        if self.projector_dims and not 1 <= self.encoder_depth <= self.depth:
            problems.append(f"encoder_depth {self.encoder_depth} is outside 1..depth {self.depth}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0


def timestep_embedding(t: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 256): [cos | sin] of t·exp(−ln(1e4)·i/128), i < 128 — DiT/SiT order (peers.md §C)."""
    half = FREQUENCY_SIZE // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D table (T, hidden): first half encodes a token's column, second half its row,
    each as [sin | cos] over hidden/4 frequencies 1e4^(−k/(hidden/4)); tokens row-major (MAE/DiT)."""
    quarter = hidden_size // 4
    omega = 1.0 / MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def axis(positions: torch.Tensor) -> torch.Tensor:
        args = positions.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_embedding(t)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """The label table; row num_classes is the null class when the config has one."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(config.num_classes + config.has_null_class, config.hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        # REPA builds timm's Attention, whose qk-norm was an affine LayerNorm (default eps);
        # Identity contributes no keys, as in the released checkpoint (qk_norm False).
        self.q_norm = nn.LayerNorm(head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if config.qk_norm else nn.Identity()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def adaln_modulation(hidden_size: int, chunks: int) -> nn.Sequential:
    # Index 1 is the Linear, matching the `adaLN_modulation.1.*` checkpoint keys.
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class Block(nn.Module):
    """adaLN-Zero: shift/scale/gate for attention and MLP all come from the conditioning vector."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(config)
        self.adaLN_modulation = adaln_modulation(config.hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(config.hidden_size, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = adaln_modulation(config.hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def projector(hidden_size: int, width: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, z_dim)
    )


class DiffusionTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.checkpointed_blocks = 0  # leading blocks recomputed in backward (priors/checkpointing.py)
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config)
        # Fixed sin-cos table, stored as a frozen Parameter (not a buffer) so the key exists in
        # the checkpoint exactly as upstream has it.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        # REPA's alignment heads: needed for strict loading of the released file, never run at
        # test time (they only serve REPA's training loss).
        self.projectors = nn.ModuleList(
            projector(config.hidden_size, config.projector_width, dim) for dim in config.projector_dims
        )
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers so
        every block starts as the identity (adaLN-Zero). It sets every parameter, so a model
        built on the meta device and emptied onto a real one needs nothing else."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:  # qk-norm
                module.reset_parameters()
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.config.hidden_size, self.config.grid_size)[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for modulation in [block.adaLN_modulation for block in self.blocks] + [self.final_layer.adaLN_modulation]:
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p·p·C) → (B, C, H, W); the last dim is ordered (row-in-patch, col-in-patch, C)."""
        p, grid, channels = self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid * p, grid * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        class_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction (B, out_channels, H, W) for noisy input x at model time t.

        Condition on labels `y` or on pre-gathered label-table rows `class_embedding` (B, hidden),
        exactly one of them. Unlike upstream there is no label dropout at all: test-time
        adaptation back-propagates through the prior, and a module left in train mode must not
        swap 10 % of the conditions for the null class (peers.md §C caveat).
        """
        if (y is None) == (class_embedding is None):
            raise ValueError("pass exactly one of y or class_embedding")
        if class_embedding is None:
            class_embedding = self.y_embedder(y)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c = self.t_embedder(t) + class_embedding
        h = self.x_embedder(x) + self.pos_embed
        for index, block in enumerate(self.blocks):
            if index < self.checkpointed_blocks and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
