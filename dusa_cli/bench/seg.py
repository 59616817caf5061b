"""`dusa bench seg`: one DUSA segmentation window update at the paper's shapes with random
weights — SegFormer-B5 + an SD3-medium-sized transformer (2.03 B) + the SD3 VAE encoder, one
512² window, 20 classes, bf16, AdamW over both — timed for two recipes in the same process.

- baseline: the team's anchor (docs/BENCHMARKS.md): bf16 autocast, gradient
  checkpointing of every transformer block, eager, foreach AdamW.
- fast: the same with `torch.compile` on each transformer block and fused AdamW on CUDA;
  `--checkpointing N` recomputes only its first N blocks (less recompute, more memory).

`--gpus 0,1` splits the transformer over the devices for both recipes and reports each device's
peak memory (the 2 × 24 GB target of issue 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dusa_cli.bench.timing import Say, caption, compiled_graphs, file_stem, not_run, ratio, run_recipes, time_updates
from dusa_cli.config.schema import OptimConfig
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.profiling import profile_update
from dusa_cli.engine.runtime import peak_memory, peak_reserved, seed_everything
from dusa_cli.methods import get_method
from dusa_cli.models.segmenter import Segmenter
from dusa_cli.priors.checkpointing import Checkpointing, describe
from dusa_cli.priors.sd3 import SD3_MEDIUM_TRANSFORMER, SD3_VAE, SD3Prior, random_prompt_embeddings
from dusa_cli.priors.split import training_bytes
from dusa_cli.results.environment import device_name

CLASSES = 20  # every window is filled to the cap (`classes_threshold`)


@dataclass(frozen=True)
class SegRecipe:
    name: str
    gradient_checkpointing: Checkpointing  # true: every block, N: the first N
    compile_blocks: bool
    fused_adamw: bool


BASELINE = SegRecipe("baseline", gradient_checkpointing=True, compile_blocks=False, fused_adamw=False)
FAST = SegRecipe("fast", gradient_checkpointing=True, compile_blocks=True, fused_adamw=True)
# The anchor's "does not fit in 80 GB": run on request (--recipe no-checkpointing) to confirm.
NO_CHECKPOINTING = SegRecipe("no-checkpointing", gradient_checkpointing=False, compile_blocks=False, fused_adamw=False)


@dataclass(frozen=True)
class SegShapes:
    segformer: dict[str, Any]
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_dim: int
    window: int


# nvidia/segformer-b5 (docs/research/peers.md §E.1) with ADE20K's 150 classes.
SEGFORMER_B5 = {
    "depths": [3, 6, 40, 3], "hidden_sizes": [64, 128, 320, 512], "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1], "decoder_hidden_size": 768, "num_labels": 150,
}  # fmt: skip
PAPER = SegShapes(SEGFORMER_B5, SD3_MEDIUM_TRANSFORMER, SD3_VAE, clip_dim=2048, window=512)
TINY = SegShapes(
    segformer={
        "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 16, 16], "num_attention_heads": [1, 1, 1, 1],
        "decoder_hidden_size": 16, "num_labels": 150,
    },
    transformer=SD3_MEDIUM_TRANSFORMER | {
        "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
        "caption_projection_dim": 16, "pooled_projection_dim": 16, "pos_embed_max_size": 8,
    },
    vae=SD3_VAE | {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
    clip_dim=16,
    window=32,
)  # fmt: skip


def _build(shapes: SegShapes, recipe: SegRecipe, devices: list[torch.device]) -> OnlineAdapter:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from dusa_cli.models.segmenter import IMAGENET_MEAN, IMAGENET_STD

    seed_everything(0)
    segmenter = Segmenter(SegformerForSemanticSegmentation(SegformerConfig(**shapes.segformer)), IMAGENET_MEAN, IMAGENET_STD)
    method_class = get_method("dusa_seg")
    config = method_class.Config(
        name="dusa_seg", prior="random", window=shapes.window, classes_threshold=CLASSES,
        gradient_checkpointing=recipe.gradient_checkpointing,
    )  # fmt: skip
    method = method_class(segmenter, config)
    method.model.to(devices[0])
    pooled = shapes.transformer["pooled_projection_dim"]
    prompts = random_prompt_embeddings(150, clip_dim=shapes.clip_dim, pooled_dim=pooled)
    prior = SD3Prior.from_config(
        shapes.transformer, shapes.vae, prompts, devices=devices, gradient_checkpointing=recipe.gradient_checkpointing,
        reserved_first=training_bytes(method.model),
    )  # fmt: skip
    method.adopt_prior(prior)
    method.compile(["prior"] if recipe.compile_blocks else [])  # block by block, as run.compile does
    optim = OptimConfig(name="adamw", lr=7.5e-6, fused=recipe.fused_adamw)
    return OnlineAdapter(method, optim, "bf16", devices[0])


def run_recipe(
    recipe: SegRecipe,
    shapes: SegShapes,
    *,
    updates: int,
    warmup: int,
    devices: list[torch.device],
    profile: Path | None = None,
    say: Say = lambda text: None,
) -> dict[str, Any]:
    """Timed window updates of one recipe; with `profile` (a folder) one more under the profiler."""
    say("building the models")
    graphs_before = compiled_graphs()
    adapter = _build(shapes, recipe, devices)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, shapes.window, shapes.window, generator=generator).to(devices[0])

    def update() -> None:
        adapter.step(image)

    seconds = time_updates(update, warmup=warmup, updates=updates, devices=devices, say=say) / updates
    graphs = compiled_graphs() - graphs_before
    measured = list(dict.fromkeys(devices))  # `--gpus 0,0` (the split on one GPU): that GPU's peak once
    peaks = [peak_memory(device) for device in measured]
    if profile:
        say("profiled update")
    profiled = {"profile": profile_update(update, devices, profile / file_stem(recipe.name))} if profile else {}
    return asdict(recipe) | profiled | {
        "seconds_per_window": seconds,
        "updates": updates,
        "peak_memory_devices": [str(device) for device in measured],
        "peak_memory_gib": [memory for memory, _ in peaks],
        "memory_kind": peaks[0][1],
        "peak_reserved_gib": [peak_reserved(device) for device in measured],
        "block_devices": [str(device) for device in adapter.method.prior.block_devices],
        "compiled_graphs": graphs,
    }


def bench_seg(
    *,
    tiny: bool,
    updates: int,
    warmup: int,
    devices: list[torch.device],
    recipes: tuple[SegRecipe, ...] = (BASELINE, FAST),
    on_result: Callable[[dict[str, Any]], None] | None = None,
    profile: Path | None = None,
    say: Say | None = None,
) -> dict[str, Any]:
    """The recipes one after the other on the same devices; `on_result`, `say`: see `run_recipes`;
    `profile`: a folder for one profiled window update per recipe (engine/profiling.py)."""
    shapes = TINY if tiny else PAPER
    if devices[0].type != "cuda":  # compile takes minutes on a CPU and fused AdamW needs CUDA
        recipes = tuple(replace(r, compile_blocks=False, fused_adamw=False) for r in recipes)

    def run(recipe: SegRecipe, told: Say) -> dict[str, Any]:
        return run_recipe(recipe, shapes, updates=updates, warmup=warmup, devices=devices, profile=profile, say=told)

    def result_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "shapes": "tiny" if tiny else "segformer-b5 + sd3-medium (2.03 B) + sd3 vae, 512² window",
            "classes": CLASSES,
            "devices": [str(device) for device in devices],
            "device_name": device_name(devices[0]),
            "torch": torch.__version__,
            "warmup": warmup,
            "recipes": rows,
            "speedup_fast_over_baseline": ratio(rows, "seconds_per_window", "baseline", "fast"),
        }

    return run_recipes(recipes, run, result_of, on_result, say)


def to_rich(result: dict[str, Any]):
    from rich.table import Table

    table = Table(
        title=f"DUSA segmentation window update ({result['shapes']}, {result['classes']} classes, bf16, AdamW), "
        f"{result['device_name']} × {len(result['devices'])}",
        header_style="bold",
    )
    for column in ("recipe", "checkpointing", "compiled", "s / window", "peak GiB per device"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in result["recipes"]:
        compiled = ("yes: ran eager" if row.get("compiled_graphs") == 0 else "yes") if row["compile_blocks"] else "no"
        recipe = [row["name"], describe(row["gradient_checkpointing"]), compiled]
        if why := not_run(row):
            table.add_row(*recipe, why, "")
            continue
        table.add_row(
            *recipe,
            f"{row['seconds_per_window']:.3f}",
            " / ".join(f"{memory:.1f}" for memory in row["peak_memory_gib"]),
        )
    speedup = result["speedup_fast_over_baseline"]
    table.caption = caption([] if speedup is None else [f"baseline / fast = {speedup:.2f}×"], result)
    return table
