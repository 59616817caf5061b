"""`dusa bench cls`: the DUSA classification update at the paper's shapes with random weights,
timed for two recipes in the same process so their ratio is measured side by side.

- official: the released code's recipe (docs/research/dusa_official.md §1.6): fp16 autocast with a
  GradScaler, classifier in fp32, micro-batch 8 × 8 accumulation, eager, plain Adam.
- fast: bf16 autocast throughout (fp32 master weights and Adam states), micro-batch 16 × 4,
  `torch.compile` on the prior's transformer and VAE encoder, fused Adam on CUDA.

Both run the same objective (same k, m, t, 64 images per update). FLOPs per image are counted
once with torch's FlopCounterMode on an eager forward+backward (5.18 TFLOP at the paper's shapes,
as the team's anchor in docs/BENCHMARKS.md), so TFLOP/s = FLOPs × images/s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from dusa_cli.bench.timing import (
    Say, caption, compiled_graphs, file_stem, not_run, ratio, release_compiled_and_memory, run_recipes, time_updates,
)
from dusa_cli.config.schema import CompileMode, ModelConfig, OptimConfig
from dusa_cli.draws import ImageDraws, micro_batch_key, mix
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.profiling import profile_update
from dusa_cli.engine.runtime import peak_memory, peak_reserved, seed_everything
from dusa_cli.errors import ConfigError
from dusa_cli.methods import get_method
from dusa_cli.models.classifier import create_classifier
from dusa_cli.priors.checkpointing import Checkpointing, describe, parse_checkpointing
from dusa_cli.results.environment import device_name

# The bf16 matrix-product rate the team measured on one H100 (docs/BENCHMARKS.md, the team's anchors); the
# H200 has the same compute die and clocks. Other devices have no measured peak: no fraction.
MEASURED_BF16_PEAK_TFLOPS = {"H100": 798.0, "H200": 798.0}


def bf16_peak_tflops(name: str) -> float | None:
    """The measured bf16 matrix-product rate of the device called `name`, if there is one."""
    return next((peak for model, peak in MEASURED_BF16_PEAK_TFLOPS.items() if model in name), None)


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str
    classifier_fp32: bool
    micro_batch: int
    accumulation: int
    compile_prior: bool
    fused_adam: bool
    compile_classifier: bool = False
    # The prior's blocks recomputed in backward (true: all, N: the first N): room for larger micro-batches.
    gradient_checkpointing: Checkpointing = False
    channels_last: bool = False  # classifier, VAE and images in NHWC (run.channels_last)
    compile_mode: str = "default"  # run.compile_mode: reduce-overhead / max-autotune record CUDA graphs

    def compiled(self) -> list[str]:
        """The recipe's `run.compile` list."""
        return [part for part, on in (("prior", self.compile_prior), ("model", self.compile_classifier)) if on]

    def with_micro_batch(self, micro_batch: int, images_per_update: int = 64) -> Recipe:
        if images_per_update % micro_batch:
            raise ConfigError(f"--micro-batch must divide the {images_per_update} images of an update, got {micro_batch}")
        return replace(self, micro_batch=micro_batch, accumulation=images_per_update // micro_batch)


# `--variant` levers, spelled as the fast recipe's flags, with the short label a variant's name uses.
LEVERS = {
    "micro-batch": "mb", "checkpointing": "ckpt", "compile-classifier": "ccls", "channels-last": "nhwc",
    "compile-mode": "mode",
}  # fmt: skip
_TRUTH = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_variant(text: str) -> dict[str, str]:
    """`micro-batch=32,checkpointing=8` → {"micro-batch": "32", "checkpointing": "8"}."""
    levers = {}
    for item in text.split(","):
        lever, _, value = (part.strip() for part in item.partition("="))
        if lever not in LEVERS or not value:
            raise ConfigError(f"--variant takes LEVER=VALUE pairs with levers {', '.join(LEVERS)}; got '{item}'")
        if lever in levers:
            raise ConfigError(f"--variant '{text}' sets {lever} twice")
        levers[lever] = value
    return levers


def vary(base: Recipe, levers: dict[str, str], name: str | None = None) -> Recipe:
    """`base` with `levers` (values as the flags spell them) changed, named after them
    (`fast mb=32 ckpt=8`) unless `name` is given."""
    recipe = base
    for lever, value in levers.items():
        if lever == "micro-batch":
            if not value.isdecimal() or not int(value):
                raise ConfigError(f"micro-batch takes a positive number, got '{value}'")
            recipe = recipe.with_micro_batch(int(value))
        elif lever == "checkpointing":
            recipe = replace(recipe, gradient_checkpointing=parse_checkpointing(value))
        elif lever == "compile-mode":
            if value not in get_args(CompileMode):
                raise ConfigError(f"compile-mode takes one of {', '.join(get_args(CompileMode))}, got '{value}'")
            recipe = replace(recipe, compile_mode=value)
        else:
            if value.lower() not in _TRUTH:
                raise ConfigError(f"{lever} takes true or false, got '{value}'")
            field = "compile_classifier" if lever == "compile-classifier" else "channels_last"
            recipe = replace(recipe, **{field: _TRUTH[value.lower()]})
    labels = [f"{LEVERS[lever]}={value}" for lever, value in levers.items()]
    return replace(recipe, name=name or " ".join([base.name, *labels]))


OFFICIAL = Recipe("official", "fp16", True, 8, 8, compile_prior=False, fused_adam=False)
FAST = Recipe("fast", "bf16", False, 16, 4, compile_prior=True, fused_adam=True)
# The numerical reference of the trajectory check: everything in fp32, eager.
FP32 = Recipe("fp32", "fp32", True, 8, 8, compile_prior=False, fused_adam=False)


@dataclass(frozen=True)
class Shapes:
    classifier: str
    num_classes: int
    prior: str
    image_size: int


PAPER = Shapes("convnext_large", 1000, "dit_xl_2_256", 224)
TINY = Shapes("convnext_atto", 10, "dit_tiny", 32)
# The prior families of seed 000 / issue 6, each at the paper's size and tiny: DiT-XL/2 (DDPM,
# ε) and REPA's SiT-XL/2 (linear flow, velocity; the same 675 M transformer without the σ head).
PRIORS = {"dit": ("dit_xl_2_256", "dit_tiny"), "sit": ("sit_xl_2", "sit_tiny")}


def bench_shapes(tiny: bool, prior: str = "dit") -> Shapes:
    return replace(TINY if tiny else PAPER, prior=PRIORS[prior][tiny])


def _random_vae(directory: Path, tiny: bool) -> Path:
    from diffusers import AutoencoderKL

    from dusa_cli.priors.vae import SD_VAE_CONFIG, TINY_VAE_CONFIG

    seed_everything(0)  # the same random VAE in every run: figures and trajectories repeat
    AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD_VAE_CONFIG)).save_pretrained(directory)
    return directory


def _build(shapes: Shapes, recipe: Recipe, vae: Path, device: torch.device) -> OnlineAdapter:
    seed_everything(0)
    classifier = create_classifier(ModelConfig(name=shapes.classifier, num_classes=shapes.num_classes))
    dusa = get_method("dusa")
    config = dusa.Config(
        name="dusa", prior=shapes.prior, prior_random_init=True, vae=str(vae), topk=4, extra=2,
        classifier_fp32=recipe.classifier_fp32, gradient_checkpointing=recipe.gradient_checkpointing,
    )  # fmt: skip
    method = dusa(classifier, config)
    _like_trained(method.prior.transformer)
    method = method.to(device)
    if recipe.channels_last:  # as the engine does (engine/loop.py)
        method.use_channels_last()
    method.compile(recipe.compiled(), recipe.compile_mode)
    optim = OptimConfig(name="adam", lr=1e-5, accumulation=recipe.accumulation, fused=recipe.fused_adam)
    return OnlineAdapter(method, optim, recipe.precision, device, recipe.channels_last)


def _like_trained(transformer: nn.Module) -> None:
    """Random weights with no zero layer. DiT's init zeroes the adaLN modulations and the output
    layer (adaLN-Zero), so the prior would predict exactly 0 whatever its input: the loss would
    not depend on the precision (the trajectory check could not fail) and the classifier would
    get no gradient through the prior. Trained weights are not zero: each all-zero parameter
    gets N(0, 0.02²) instead, the same draws for every recipe."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in transformer.parameters():
            if not parameter.any():
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def _images(count: int, shapes: Shapes, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (count, 3, shapes.image_size, shapes.image_size), generator=generator)
    return images.to(device).float().div_(255)


def flops_per_image(adapter: OnlineAdapter, image: torch.Tensor) -> float:
    """Forward + backward FLOPs of DUSA's step on one (1, 3, H, W) image (no optimizer step). The
    count runs eager and in fp32, so one image: a micro-batch of them could run out of memory
    where the recipe itself fits. Eager by force: Dynamo skips a frame that runs under the
    counter's mode and remembers the skip, so compiled networks would stay eager for the whole
    recipe. The work per image does not depend on the batch (k + m prior calls per image, no
    batch statistics in these networks). Checkpointed blocks are not recomputed here: a row's
    TFLOP/s counts the model's work, as for every recipe."""
    transformer = adapter.method.prior.transformer
    recomputed, transformer.checkpointed_blocks = transformer.checkpointed_blocks, 0
    try:
        with torch.compiler.set_stance("force_eager"), counting_flops() as counter:
            adapter.method.forward(image).loss.backward()
    finally:
        transformer.checkpointed_blocks = recomputed
    for module in adapter.method.modules().values():
        module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def counting_flops():
    """torch's FlopCounterMode, which also counts the attention kernel that SDPA runs on a CPU:
    torch has formulas for the CUDA kernels only, and without one DiT-XL/2's attention (0.18 of
    the 5.18 TFLOP per image at the paper's shapes) would be missing from a CPU count."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    return FlopCounterMode(display=False, custom_mapping=cpu_attention)


def _draws(recipe: Recipe, micro_batch_index: int, first_image: int) -> ImageDraws:
    """Per-image random streams, as the engine draws them: every recipe samples the same noise
    and classes for the same image positions, whatever its micro-batch size (dusa_cli/draws.py)."""
    first = first_image + micro_batch_index * recipe.micro_batch
    return ImageDraws([mix(0, first + offset) for offset in range(recipe.micro_batch)], micro_batch_key(0, first))


def run_recipe(
    recipe: Recipe,
    shapes: Shapes,
    *,
    updates: int,
    warmup: int,
    device: torch.device,
    vae: Path,
    profile: Path | None = None,
    say: Say = lambda text: None,
) -> dict[str, Any]:
    """Timed updates of one recipe; with `profile` (a folder) one more update under the profiler."""
    say("building the models")
    graphs_before = compiled_graphs()
    adapter = _build(shapes, recipe, vae, device)
    batch = _images(recipe.micro_batch, shapes, device)
    say("counting FLOPs")
    flops = flops_per_image(adapter, batch[:1])

    def update() -> None:
        for index in range(recipe.accumulation):
            adapter.step(batch, draws=_draws(recipe, index, 0))

    seconds = time_updates(update, warmup=warmup, updates=updates, devices=[device], say=say)
    graphs = compiled_graphs() - graphs_before
    images_per_s = updates * recipe.accumulation * recipe.micro_batch / seconds
    memory, memory_kind = peak_memory(device)
    tflops = flops * images_per_s / 1e12
    peak = bf16_peak_tflops(device_name(device))
    if profile:
        say("profiled update")
    profiled = {"profile": profile_update(update, [device], profile / file_stem(recipe.name))} if profile else {}
    return asdict(recipe) | profiled | {
        "images_per_update": recipe.micro_batch * recipe.accumulation,
        "updates": updates,
        "seconds": seconds,
        "images_per_s": images_per_s,
        "tflop_per_image": flops / 1e12,
        "tflops": tflops,
        "bf16_peak_tflops": peak,
        "fraction_of_bf16_peak": tflops / peak if peak else None,
        "peak_memory_gib": memory,
        "memory_kind": memory_kind,
        "peak_reserved_gib": peak_reserved(device),
        "compiled_graphs": graphs,
    }


def bench_cls(
    *,
    tiny: bool,
    updates: int,
    warmup: int,
    device: torch.device,
    prior: str = "dit",
    recipes: tuple[Recipe, ...] = (OFFICIAL, FAST),
    on_result: Callable[[dict[str, Any]], None] | None = None,
    profile: Path | None = None,
    say: Say | None = None,
) -> dict[str, Any]:
    """The recipes one after the other in one process on the same device; `ratio` = fast /
    official images/s; `prior`: a PRIORS family. `on_result`, `say`: see `run_recipes`; `profile`:
    a folder for one profiled update per recipe (engine/profiling.py)."""
    shapes = bench_shapes(tiny, prior)
    if device.type != "cuda":
        # torch.compile needs minutes and a C++ toolchain on a CPU, fused Adam needs CUDA: the CPU
        # run keeps the code path alive in eager mode, and its rows say so.
        recipes = tuple(replace(r, compile_prior=False, compile_classifier=False, fused_adam=False) for r in recipes)
    def result_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "shapes": asdict(shapes),
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "warmup": warmup,
            "recipes": rows,
            "ratio_fast_over_official": ratio(rows, "images_per_s", "fast", "official"),
        }

    with tempfile.TemporaryDirectory() as scratch:
        vae = _random_vae(Path(scratch) / "vae", tiny)

        def run(recipe: Recipe, told: Say) -> dict[str, Any]:
            return run_recipe(recipe, shapes, updates=updates, warmup=warmup, device=device, vae=vae, profile=profile, say=told)

        return run_recipes(recipes, run, result_of, on_result, say)


def run_trajectory(
    recipe: Recipe, shapes: Shapes, *, updates: int, device: torch.device, vae: Path, say: Say = lambda text: None
) -> dict[str, Any]:
    """`updates` DUSA updates on fresh images each (the same images and draws for every recipe):
    the mean loss of each update and the online prediction of every image."""
    say(f"{recipe.name}: building the models")
    adapter = _build(shapes, recipe, vae, device)
    images_per_update = recipe.micro_batch * recipe.accumulation
    losses, predictions = [], []
    for update in range(updates):
        say(f"{recipe.name}: update {update + 1}/{updates}")
        generator = torch.Generator().manual_seed(update)
        size = (images_per_update, 3, shapes.image_size, shapes.image_size)
        images = torch.randint(0, 256, size, generator=generator).to(device).float().div_(255)
        update_loss = 0.0
        for index, batch in enumerate(images.split(recipe.micro_batch)):
            output = adapter.step(batch, draws=_draws(recipe, index, update * images_per_update))
            update_loss += output.loss.item() / recipe.accumulation
            predictions.append(output.logits.argmax(dim=1).cpu())
        losses.append(update_loss)
    return {"name": recipe.name, "losses": losses, "predictions": torch.cat(predictions)}


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matrix products and convolutions as full fp32 while the block runs: cuDNN runs fp32
    convolutions in TF32 by default (10-bit mantissa), which a numerical reference must not."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def compare_trajectories(
    *,
    tiny: bool,
    updates: int,
    device: torch.device,
    prior: str = "dit",
    reference: Recipe = FP32,
    candidate: Recipe = FAST,
    say: Say = lambda text: None,
) -> dict[str, Any]:
    """The fast recipe against an fp32 run over the same `updates` (issue 6's numerical check):
    per-update losses, their largest relative deviation, and how often the online predictions agree."""
    shapes = bench_shapes(tiny, prior)
    if device.type != "cuda":
        candidate = replace(candidate, compile_prior=False, compile_classifier=False, fused_adam=False)
    with tempfile.TemporaryDirectory() as scratch:
        vae = _random_vae(Path(scratch) / "vae", tiny)
        runs = []
        for recipe in (reference, candidate):
            with ieee_fp32() if recipe.precision == "fp32" else nullcontext():
                runs.append(run_trajectory(recipe, shapes, updates=updates, device=device, vae=vae, say=say))
            release_compiled_and_memory()  # the fp32 models and Adam state, before the candidate's
    base, other = runs
    deviations = [abs(b - a) / abs(a) for a, b in zip(base["losses"], other["losses"])]
    return {
        "shapes": asdict(shapes),
        "device_name": device_name(device),
        "updates": updates,
        "reference": {"recipe": asdict(reference), "losses": base["losses"]},
        "candidate": {"recipe": asdict(candidate), "losses": other["losses"]},
        "max_relative_loss_deviation": max(deviations),
        "prediction_agreement": (base["predictions"] == other["predictions"]).float().mean().item(),
    }


def trajectory_to_rich(result: dict[str, Any]):
    from rich.table import Table

    reference, candidate = result["reference"], result["candidate"]
    table = Table(
        title=f"DUSA loss over {result['updates']} updates: {candidate['recipe']['name']} vs {reference['recipe']['name']}, "
        f"{result['shapes']['classifier']} + {result['shapes']['prior']}, {result['device_name']}",
        header_style="bold",
    )
    for column in ("update", reference["recipe"]["name"], candidate["recipe"]["name"], "relative deviation"):
        table.add_column(column, justify="right")
    for index, (a, b) in enumerate(zip(reference["losses"], candidate["losses"]), start=1):
        table.add_row(str(index), f"{a:.5f}", f"{b:.5f}", _percent(abs(b - a) / abs(a)))
    table.caption = (
        f"largest deviation {_percent(result['max_relative_loss_deviation'])}; "
        f"online predictions agree on {result['prediction_agreement']:.1%} of the images"
    )
    return table


def _percent(fraction: float) -> str:
    """Three significant digits: a bf16 deviation is often far below 0.01 %."""
    return f"{100 * fraction:.3g}%"


def compiled_label(row: dict[str, Any]) -> str:
    """'prior+classifier', 'prior (reduce-overhead)', 'no', ...: the compile column of a recipe."""
    parts = "+".join(name for name, on in (("prior", row["compile_prior"]), ("classifier", row["compile_classifier"])) if on)
    if not parts:
        return "no"
    if row.get("compiled_graphs") == 0:  # asked for, and nothing compiled: the figures are eager ones
        return f"{parts}: ran eager"
    return parts if row["compile_mode"] == "default" else f"{parts} ({row['compile_mode']})"


def to_rich(result: dict[str, Any]):
    from rich.table import Table

    shapes = result["shapes"]
    table = Table(
        title=f"DUSA update, {shapes['classifier']} + {shapes['prior']}, k=4 m=2, 64 images/update, {result['device_name']}",
        header_style="bold",
    )
    for column in ("recipe", "precision", "micro×acc", "compiled", "ckpt", "NHWC", "img/s", "TFLOP/s", "% peak", "peak GiB"):
        table.add_column(column, justify="left" if column == "recipe" else "right", no_wrap=column == "recipe")
    for row in result["recipes"]:
        recipe = [
            row["name"],
            row["precision"] + ("/fp32" if row["classifier_fp32"] else ""),
            f"{row['micro_batch']} × {row['accumulation']}",
            compiled_label(row),
            describe(row["gradient_checkpointing"]),
            "yes" if row["channels_last"] else "no",
        ]
        if why := not_run(row):
            table.add_row(*recipe, why, "", "", "")
            continue
        table.add_row(
            *recipe,
            f"{row['images_per_s']:.1f}",
            f"{row['tflops']:.3g}",
            "–" if row["fraction_of_bf16_peak"] is None else f"{100 * row['fraction_of_bf16_peak']:.1f}",
            f"{row['peak_memory_gib']:.1f}",
        )
    speedups = [
        f"{row['name']} / official = {value:.2f}×"
        for row in result["recipes"]
        if row["name"] != "official" and (value := ratio(result["recipes"], "images_per_s", row["name"], "official"))
    ]
    table.caption = caption(speedups, result)
    return table
