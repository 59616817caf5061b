"""`dusa bench cls|seg`: the DUSA update at the papers' shapes, recipes side by side."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dusa_cli.cli.app import app, given_flags, local_path, refuse, split_devices
from dusa_cli.errors import DusaError
from dusa_cli.stopping import outcome_on_stop, stoppable

if TYPE_CHECKING:
    import torch


bench_app = typer.Typer(help="Measure throughput and memory (figures for docs/BENCHMARKS.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


ProfileOpt = Annotated[
    Optional[Path],
    typer.Option("--profile", parser=local_path, metavar="DIR", help="After timing, one more update per recipe under torch.profiler: a trace and an operator table in DIR, the time by kind of work on screen."),
]
WarmupOpt = Annotated[int, typer.Option(min=0, metavar="N", help="Untimed updates first (compilation, autotuning).")]
FiguresOpt = Annotated[Optional[Path], typer.Option("--output", "-o", parser=local_path, metavar="FILE", help="Also write the figures as JSON.")]
StatusQuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress line (recipe and update under way).")]


class BenchFormat(str, Enum):
    table = "table"
    md = "md"


BenchFormatOpt = Annotated[BenchFormat, typer.Option("--format", "-f", help="table (terminal) or md: Markdown for docs/BENCHMARKS.md, under the command line, torch version and date.")]


class RecipeName(str, Enum):
    official = "official"
    fast = "fast"


class CompileModeName(str, Enum):  # run.compile_mode
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class BenchPrior(str, Enum):
    dit = "dit"
    sit = "sit"


@bench_app.command("cls")
@stoppable()
def bench_cls_command(
    ctx: typer.Context,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny models (ConvNeXt-atto + DiT-tiny) that run on a CPU: keeps the code path tested.")] = False,
    updates: Annotated[int, typer.Option(min=1, metavar="N", help="Timed updates per recipe (64 images each).")] = 5,
    warmup: WarmupOpt = 2,
    recipe: Annotated[Optional[list[RecipeName]], typer.Option(metavar="official|fast", help="Recipes to run, repeatable (default: both, side by side).")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")] = "auto",
    prior: Annotated[BenchPrior, typer.Option(help="The prior: DiT-XL/2 (DDPM, the paper's) or REPA's SiT-XL/2 (linear flow); tiny versions with --tiny.")] = BenchPrior.dit,
    micro_batch: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="The fast recipe's micro-batch (default 16; accumulation makes up the 64 images).")] = None,
    compile_classifier: Annotated[bool, typer.Option("--compile-classifier", help="The fast recipe also compiles the classifier.")] = False,
    compile_mode: Annotated[CompileModeName, typer.Option(metavar="MODE", help="The fast recipe's torch.compile mode: default, reduce-overhead, max-autotune (these two record CUDA graphs too) or max-autotune-no-cudagraphs.")] = CompileModeName.default,
    checkpointing: Annotated[Optional[str], typer.Option("--checkpointing", metavar="all|N", help="The fast recipe recomputes the prior's blocks in backward: all, or the first N (room for larger micro-batches).")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="The fast recipe keeps the classifier, the VAE and the images in channels-last memory format.")] = False,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", metavar="LEVERS", help="One more recipe: the fast one with these levers changed as LEVER=VALUE,… (micro-batch, checkpointing, compile-classifier, channels-last, compile-mode), e.g. micro-batch=32,checkpointing=8; repeatable, timed in the same run.")] = None,
    trajectory: Annotated[int, typer.Option(min=0, metavar="N", help="Instead of timing: N updates of the fast recipe against an fp32 run on the same images and draws (e.g. 20): the losses and predictions side by side.")] = 0,
    tolerance: Annotated[float, typer.Option(min=0, metavar="FRAC", help="With --trajectory: the largest relative loss deviation accepted, a fraction (exit 1 beyond it).")] = 0.01,
    profile: ProfileOpt = None,
    output: FiguresOpt = None,
    format: BenchFormatOpt = BenchFormat.table,
    quiet: StatusQuietOpt = False,
) -> None:
    """DUSA classification update at the paper's shapes (random weights): the official recipe and
    the fast one in the same run, images/s, TFLOP/s, fraction of the bf16 peak, peak memory."""
    if trajectory:
        refuse(given_flags(ctx, "updates", "warmup", "recipe", "variant", "profile"), "with --trajectory (it compares the fast recipe with fp32, untimed)")
    else:
        refuse(given_flags(ctx, "tolerance"), "without --trajectory")
    if recipe is not None and RecipeName.fast not in recipe and not variant:
        refuse(given_flags(ctx, "micro_batch", "compile_classifier", "compile_mode", "checkpointing", "channels_last"), "(they change the fast recipe, which --recipe leaves out)")
    _check_outputs(output, profile)
    from dusa_cli.bench.cls import FAST, OFFICIAL, bench_cls, compare_trajectories, parse_variant, to_rich, trajectory_to_rich, vary
    from dusa_cli.ui import StatusLine

    run_on = _bench_device(device, tiny, "--device cpu")

    flags = {"micro-batch": micro_batch, "checkpointing": checkpointing, "compile-classifier": compile_classifier,
             "channels-last": channels_last, "compile-mode": compile_mode.value}  # fmt: skip
    fast = vary(FAST, {lever: str(v).lower() for lever, v in flags.items() if v not in (None, False, "default")}, "fast")
    if trajectory:
        with outcome_on_stop(lambda: f"nothing was written to {output}" if output else ""), StatusLine(enabled=not quiet) as say:
            result = compare_trajectories(
                tiny=tiny, updates=trajectory, device=run_on, prior=prior.value, candidate=fast, say=say
            )  # fmt: skip
        _show_figures(trajectory_to_rich(result), result, output, format)
        if result["max_relative_loss_deviation"] > tolerance:
            raise DusaError(
                f"the fast recipe's loss deviates from fp32 by {result['max_relative_loss_deviation']:.3%}, "
                f"more than --tolerance {tolerance:.3%}"
            )
        return
    chosen = tuple(r for r in (OFFICIAL, fast) if recipe is None or RecipeName(r.name) in recipe)
    chosen += tuple(vary(fast, parse_variant(text)) for text in variant or [])
    figures = _FiguresSoFar(output, len(chosen))
    with outcome_on_stop(figures.outcome), StatusLine(enabled=not quiet) as say:
        result = bench_cls(
            tiny=tiny, updates=updates, warmup=warmup, device=run_on, prior=prior.value, recipes=chosen,
            on_result=figures.on_result(), profile=profile, say=say,
        )  # fmt: skip
    _show_figures(to_rich(result), result, output, format, profiled=profile is not None)


def _bench_device(spec: str, tiny: bool, insist: str) -> torch.device:
    """The device a bench runs on. `auto` on a machine without a GPU is refused at the paper's
    shapes, where one update takes many minutes on a CPU: `insist` (--device cpu) runs it anyway."""
    from dusa_cli.engine.runtime import resolve_device

    device = resolve_device(spec)
    if spec == "auto" and device.type == "cpu" and not tiny:
        raise DusaError(f"no GPU here: at the paper's shapes one update takes many minutes on a CPU; --tiny runs small shapes ({insist} runs the full ones anyway)")
    return device


def _check_outputs(figures: Optional[Path], profile: Optional[Path]) -> None:
    """A benchmark's --output file and --profile folder must be writable before minutes of work."""
    from dusa_cli.writing import check_writable

    if figures is not None:
        check_writable(figures)
    if profile is not None:
        check_writable(profile, directory=True)


class _FiguresSoFar:
    """With --output, the figures so far are written after every recipe (`complete`: false), so a
    benchmark that is stopped keeps what it measured; `outcome` says what a stop kept."""

    def __init__(self, output: Optional[Path], recipes: int):
        self.output, self.recipes, self.finished = output, recipes, 0

    def __call__(self, result: dict[str, Any]) -> None:
        from dusa_cli.writing import write_json_atomic

        write_json_atomic(self.output, result)
        self.finished = len(result["recipes"])

    def on_result(self) -> Optional[Callable[[dict[str, Any]], None]]:
        return None if self.output is None else self

    def outcome(self) -> str:
        if self.output is None:
            return ""
        if not self.finished:
            return f"no recipe had finished; nothing was written to {self.output}"
        return f"the figures of {self.finished} of the {self.recipes} recipes are in {self.output}"


def _show_figures(table: Any, result: dict[str, Any], output: Optional[Path], format: BenchFormat, profiled: bool = False) -> None:
    """A benchmark's table on stdout (and where its time went, when profiled, with the profiles'
    files named on stderr) and, if asked, its figures as JSON."""
    from dusa_cli.engine.profiling import profile_to_rich
    from dusa_cli.results.markdown import rich_to_markdown
    from dusa_cli.writing import write_json_atomic
    from dusa_cli.ui import info, wide_stdout

    tables = [table]
    if profiled:
        breakdown = profile_to_rich("Where one update's time goes", result["recipes"])
        breakdown.caption = None  # its paths as a caption wrap mid-name to the table's width: whole lines below
        tables.append(breakdown)
    if format is BenchFormat.md:
        sys.stdout.write("\n".join([_provenance(), *map(rich_to_markdown, tables)]))
    else:
        console = wide_stdout()
        for shown in tables:
            console.print(shown)
    if profiled:
        for row in result["recipes"]:
            if row.get("profile"):
                info(f"profile of {row['name']}: {row['profile']['trace']}, {row['profile']['ops']}")
    if output is not None:
        write_json_atomic(output, result)
        info(f"figures written to {output}")


def _provenance() -> str:
    """What a benchmark's figures need beside them in docs/BENCHMARKS.md: the exact command (the
    tables' titles name the device), torch's version and the date."""
    import datetime
    import shlex

    import torch

    return f"`{shlex.join(['dusa', *sys.argv[1:]])}` · torch {torch.__version__} · {datetime.date.today().isoformat()}\n"


class SegRecipeName(str, Enum):
    baseline = "baseline"
    fast = "fast"
    no_checkpointing = "no-checkpointing"


@bench_app.command("seg")
@stoppable()
def bench_seg_command(
    ctx: typer.Context,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny SegFormer + SD3 that run on a CPU: keeps the code path tested.")] = False,
    updates: Annotated[int, typer.Option(min=1, metavar="N", help="Timed window updates per recipe.")] = 5,
    warmup: WarmupOpt = 2,
    recipe: Annotated[Optional[list[SegRecipeName]], typer.Option(metavar="NAME", help="Recipes to run: baseline, fast or no-checkpointing; repeatable (default: baseline and fast, side by side).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", metavar="DEVICES", help="Split the transformer over these devices, e.g. 0,1 (or cpu,cpu); default: one device (auto).")] = None,
    checkpointing: Annotated[Optional[str], typer.Option("--checkpointing", metavar="all|N", help="The fast recipe recomputes all of the transformer's blocks in backward (default: all) or only the first N (less recompute, more memory).")] = None,
    profile: ProfileOpt = None,
    output: FiguresOpt = None,
    format: BenchFormatOpt = BenchFormat.table,
    quiet: StatusQuietOpt = False,
) -> None:
    """DUSA segmentation window update at the paper's shapes (random weights): seconds per 512²
    window with 20 classes and each device's peak memory, for two recipes in the same run."""
    wanted = recipe or [SegRecipeName.baseline, SegRecipeName.fast]
    if SegRecipeName.fast not in wanted:
        refuse(given_flags(ctx, "checkpointing"), "(it changes the fast recipe, which --recipe leaves out)")
    _check_outputs(output, profile)
    from dusa_cli.bench.seg import BASELINE, FAST, NO_CHECKPOINTING, bench_seg, to_rich
    from dusa_cli.ui import StatusLine

    devices = [_bench_device(spec, tiny, "--gpus cpu") for spec in (split_devices(gpus) if gpus is not None else ["auto"])]
    from dusa_cli.priors.checkpointing import parse_checkpointing

    fast = FAST if checkpointing is None else replace(FAST, gradient_checkpointing=parse_checkpointing(checkpointing))
    chosen = tuple(r for r in (BASELINE, fast, NO_CHECKPOINTING) if SegRecipeName(r.name) in wanted)
    figures = _FiguresSoFar(output, len(chosen))
    with outcome_on_stop(figures.outcome), StatusLine(enabled=not quiet) as say:
        result = bench_seg(
            tiny=tiny, updates=updates, warmup=warmup, devices=devices, recipes=chosen, on_result=figures.on_result(),
            profile=profile, say=say,
        )  # fmt: skip
    _show_figures(to_rich(result), result, output, format, profiled=profile is not None)
