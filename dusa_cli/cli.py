"""The `dusa` command line: parse, validate, dispatch. Work happens in engine/data/results."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dusa_cli import __version__
from dusa_cli.errors import ConfigError, DusaError, ExitCode, Interrupted
from dusa_cli.process import is_main_process, process_rank
from dusa_cli.stopping import SAVED, interrupted, outcome_on_stop, stoppable

if TYPE_CHECKING:
    import torch

    from dusa_cli.config.schema import ExperimentConfig
    from dusa_cli.methods.base import TTAMethod

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time, ever
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the progress shown is dusa's own

app = typer.Typer(
    name="dusa",
    help="Diffusion-guided test-time adaptation (DUSA) and its baselines for image classifiers "
    "and segmenters. Offline: weights and data come from local paths.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
pretrain_app = typer.Typer(help="Train the embedded benchmark's models: the digits classifier and the digits prior.", no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")


def local_path(text: str | Path) -> Path:
    """A path option's value (Typer passes a Path default through here too). An empty one
    (`-o "$OUT"` with OUT unset) is refused: Path("") would be the current directory."""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("expected a path, got an empty string")
    return Path(text)


class Setting(str, Enum):
    reset_each_shift = "reset_each_shift"
    continual = "continual"


class Metric(str, Enum):
    acc = "acc"
    err = "err"
    top5 = "top5"
    top20 = "top20"
    miou = "miou"
    pacc = "pacc"


class Task(str, Enum):
    cls = "cls"
    seg = "seg"


class Format(str, Enum):
    table = "table"
    md = "md"
    csv = "csv"


class Dataset(str, Enum):
    digits_c = "digits-c"
    imagenet_c = "imagenet-c"
    ade20k_c = "ade20k-c"


def config_option(presets: str) -> Any:
    """--config, its help naming the presets of the command's task(s)."""
    return Annotated[
        Optional[Path],
        typer.Option("--config", "-c", parser=local_path, metavar="FILE", help=f"YAML preset from {presets}. Each flag below overrides one of its keys (→ KEY); flags not given keep the preset's values."),
    ]


# Flags shared by the run commands; each overrides one key of the YAML config. Where a command
# runs one task only, its help speaks of that task's models and data alone.
ConfigOpt = config_option("configs/cls (classification) or configs/seg (segmentation)")
ModelOpt = Annotated[Optional[str], typer.Option(metavar="NAME", help="A timm classifier name (convnext_large.fb_in1k), or segformer for task seg → model.name.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(parser=local_path, metavar="PATH", help="Local weights: a .pth/.safetensors file, or a SegFormer directory → model.checkpoint (used instead of a preset's packaged weights: model.pretrained false).")]
ClassifierOpt = Annotated[Optional[str], typer.Option("--model", metavar="NAME", help="A timm classifier name (convnext_large.fb_in1k) → model.name.")]
ClassifierCheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", parser=local_path, metavar="FILE", help="Local weights: a .pth/.safetensors file → model.checkpoint (used instead of a preset's packaged weights: model.pretrained false).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", parser=local_path, metavar="DIR", help="Dataset root: the ImageNet-C layout (CORRUPTION/SEVERITY/CLASS/IMAGE, e.g. data/digits-c) or CIFAR-10-C's .npy files → data.root.")]
CorruptionOpt = Annotated[
    Optional[list[str]],
    typer.Option("--corruption", metavar="NAMES", help="Corruption name, comma list, 'all' (15), 'extra' (4) or 'all19'; repeatable → data.corruptions."),
]
SeverityOpt = Annotated[Optional[list[int]], typer.Option("--severity", metavar="1-5", help="Severity 1-5, repeatable → data.severities.")]
NumExOpt = Annotated[Optional[int], typer.Option("--num-ex", min=1, metavar="N", help="A fixed subset of N images per task (e.g. 5000), the same for every --seed → data.num_ex.")]
SettingOpt = Annotated[Optional[Setting], typer.Option(metavar="NAME", help="reset_each_shift: back to the source model at each task (a corruption at one severity); continual: adapt on across tasks → run.setting.")]
SeedOpt = Annotated[Optional[int], typer.Option(metavar="N", help="Random seed, 0 ≤ seed < 2^63 → run.seed.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", parser=local_path, metavar="DIR", help="Results directory → run.output.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override any key: --set optim.lr=1e-4 (repeatable; applied after the other flags, so it wins over them).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --output from its last finished task (the same config, by default its own config.yaml; only output, workers, tracking and profiling may change).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class CompilePart(str, Enum):  # run.compile
    model = "model"
    prior = "prior"


def compile_option(what: str, offered: str = "model|prior") -> Any:
    """--compile, its help offering the networks the command runs. (A baseline parses `prior`
    too, to refuse it with the reason: the method has no prior.)"""
    return Annotated[Optional[list[CompilePart]], typer.Option("--compile", metavar=offered, help=f"torch.compile {what} → run.compile.")]


PRIOR_PARTS = "the prior's transformer and VAE encoder (prior); repeatable"


class Tracker(str, Enum):  # run.track
    tensorboard = "tensorboard"


TrackOpt = Annotated[
    Optional[list[Tracker]],
    typer.Option("--track", metavar="tensorboard", help="Experiment tracker: tensorboard (scores and online curves in OUTPUT/tensorboard; W&B imports them with wandb sync --sync-tensorboard) → run.track."),
]
RunProfileOpt = Annotated[
    Optional[bool],
    typer.Option("--profile", help="Profile micro-batches 3-5 of the first task (torch.profiler): OUTPUT/profile/ → run.profile (--set run.profile=false turns a config's off)."),
]
GpusOpt = Annotated[
    Optional[str],
    typer.Option("--gpus", metavar="IDS", help="Data parallelism: one process per listed GPU, e.g. 0,1,2,3 (or start the command under torchrun)."),
]


def _overrides(**flags: Any) -> dict[str, Any]:
    """The config keys that the given flags override (`num_ex` → data.num_ex), with their values."""
    from dusa_cli.config.loader import FLAG_KEYS

    return {FLAG_KEYS[f"--{flag.replace('_', '-')}"]: _plain(value) for flag, value in flags.items() if value not in (None, [])}


def _plain(value: Any) -> Any:
    """A flag's value as the YAML config would hold it."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value.value if isinstance(value, Enum) else (str(value) if isinstance(value, Path) else value)


# What each run command runs: methods with or without a generative prior, for which task (None: any).
COMMANDS = {"adapt-cls": (True, "cls"), "adapt-seg": (True, "seg"), "baseline": (False, None)}


def _runs(command: str, method: type[TTAMethod]) -> bool:
    """Whether `dusa COMMAND` runs `method` (for some task): the methods it offers come from the
    registry, a new one included."""
    with_prior, task = COMMANDS[command]
    return method.uses_prior == with_prior and (task is None or task in method.tasks)


def _check_command(command: str, config: ExperimentConfig) -> None:
    from dusa_cli.config.schema import fitting_methods
    from dusa_cli.methods import get_method

    method = get_method(config.method.name)
    _check_task(command, config.task)
    if not _runs(command, method):
        there = f"adapt-{config.task}" if method.uses_prior else "baseline"
        fitting = fitting_methods(config.task, partial(_runs, command))
        raise ConfigError(f"method '{config.method.name}' runs with `dusa {there}`; `dusa {command}` runs {', '.join(fitting)}")


def _check_task(command: str, config_task: str) -> None:
    task = COMMANDS[command][1]
    if task is not None and config_task != task:
        raise ConfigError(f"`dusa {command}` runs task {task}, but the config's task is {config_task}")


def split_devices(text: str) -> list[str]:
    """`--gpus 0,1` (or `cpu,cpu`, `cuda:2,cuda:3`) for model parallelism: one device per part."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--gpus takes a comma list of GPU indices (or cpu), got '{text}'")
    return [f"cuda:{part}" if part.isdecimal() else part for part in parts]


@stoppable(SAVED)
def _run(command: str, config_path: Optional[Path], overrides: dict[str, Any], assignments: Optional[list[str]], resume: bool, quiet: bool, gpus: Optional[str]) -> None:
    from dusa_cli.config.loader import load_config, read_preset, saved_run_config

    if resume and config_path is None:  # the run's own config is where a resume starts; flags override it
        config_path, output = saved_run_config(overrides, assignments)
        if config_path is None and not overrides.keys() - {"run.output"} and not assignments:  # nothing to start from
            raise ConfigError(f"--resume: {output} holds no run (no config.yaml); name the run's directory with -o")
    if config_path is None and command == "adapt-seg":  # flags alone describe a segmentation run
        overrides = {"task": "seg", "method.name": "dusa_seg"} | overrides
    if command == "adapt-seg" and gpus is not None:  # model parallelism within one process
        assignments = [*(assignments or []), f"run.split_devices={split_devices(gpus)}"]
        gpus = None
    try:
        with outcome_on_stop(lambda: "nothing was written"):  # loading imports torch: seconds
            config = load_config(config_path, overrides, assignments, runs=partial(_runs, command))
    except ConfigError:
        if config_path is not None:  # a preset of the other task: its options fail first, the task says why
            _check_task(command, read_preset(config_path).get("task", "cls"))
        raise
    from dusa_cli.methods import get_method  # loaded by the config's validation already

    recipe_given = any(key.startswith(("optim.", "run.precision")) for key in [*overrides, *(assignments or [])])
    if config_path is None and not recipe_given and get_method(config.method.name).trains:
        warnings.warn(
            f"no --config: built-in defaults (optim {config.optim.name} lr {config.optim.lr:g}, run.precision "
            f"{config.run.precision}), not a paper's recipe (presets in configs/cls and configs/seg)", stacklevel=1,
        )
    _check_command(command, config)
    from dusa_cli.results.store import stopped_run_outcome

    outcome = partial(stopped_run_outcome, config.run.output)  # what a stop kept, in its message
    if gpus is None:
        with outcome_on_stop(outcome):
            _execute(config, resume, quiet)
        return
    if config.task != "cls":
        raise ConfigError("--gpus runs data parallelism for classification; segmentation baselines run on one device")
    from dusa_cli.engine.distributed import launch, parse_gpus

    devices = parse_gpus(gpus)  # malformed, repeated or missing GPUs first: what --gpus itself says
    if config.run.device not in ("auto", "cuda"):
        raise ConfigError(f"--gpus runs one process per GPU: run.device must be auto or cuda, not '{config.run.device}'")
    launch(devices, _worker, (config, resume, quiet), outcome)


def _execute(config: ExperimentConfig, resume: bool, quiet: bool) -> None:
    """The run in this process: alone, or one of several (then only rank 0 shows and prints)."""
    from dusa_cli.engine.loop import run_experiment
    from dusa_cli.results.report import build_table, to_rich
    from dusa_cli.ui import TaskProgress, info, stdout

    main_process = is_main_process()
    score = "mIoU" if config.task == "seg" else "acc"
    with TaskProgress(enabled=not quiet and main_process, score=score) as progress:
        store = run_experiment(config, resume=resume, progress=progress)
    if main_process:
        stdout.print(to_rich(build_table([store.results]), stdout.width))
        info(f"results: {store.root}")
        if config.run.profile:
            profile = store.root / "profile"
            if (profile / "summary.json").is_file():
                info(f"profile: {profile} (steps.trace.json.gz, steps.ops.txt, summary.json)")
            else:
                info("profile: nothing recorded (it takes micro-batches 3-5 of the first task this command runs)")


def _worker(config: ExperimentConfig, resume: bool, quiet: bool) -> None:
    """One process of a `--gpus` run (started by engine.distributed.launch, which reports a stop)."""
    _guarded(stoppable(report=False)(partial(_execute, config, resume, quiet)))  # silent: the launcher reports


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dusa {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback behind an error (also after the subcommand).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Global options (--debug is read in main(), wherever it stands)."""


@app.command("prepare-data")
@stoppable()
def prepare_data(
    ctx: typer.Context,
    dataset: Annotated[Dataset, typer.Argument(metavar="DATASET", help="digits-c: the embedded benchmark from scikit-learn's digits; imagenet-c: corrupt an ImageNet-style folder; ade20k-c: corrupt ADE20K's validation set (15 corruptions, severity 5 unless given).")],
    output: Annotated[Path, typer.Option("--output", "-o", parser=local_path, metavar="DIR", help="Directory to write: CORRUPTION/SEVERITY/CLASS/IMAGE (digits-c, imagenet-c) or CORRUPTION/SEVERITY/validation/IMAGE beside annotations/ (ade20k-c).")],
    source: Annotated[Optional[Path], typer.Option(parser=local_path, metavar="DIR", help="imagenet-c: folder of <wnid>/<image> files; ade20k-c: the ADEChallengeData2016 folder.")] = None,
    corruption: Annotated[Optional[list[str]], typer.Option("--corruption", metavar="NAMES", help="Corruptions to write: a name, comma list, 'all' (15), 'extra' (4) or 'all19'; repeatable (default: all 19; ade20k-c: the 15).")] = None,
    severity: Annotated[Optional[list[int]], typer.Option("--severity", metavar="1-5", help="Severities to write, 1-5, repeatable (default: all 5; ade20k-c: 5).")] = None,
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Seed of the corruption noise (and of digits-c's train/test split).")] = 0,
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes.")] = max(1, min(8, os.cpu_count() or 1)),
    limit_per_class: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="digits-c only: keep N test images per class (quick trials).")] = None,
    force: Annotated[bool, typer.Option("--force", help="digits-c only: when rebuilding over an earlier build, delete its files that this build does not make (other corruptions, severities or images).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a corrupted benchmark on disk, deterministic and checksummed (manifest.json).

    --output must be new, empty or an earlier build of the same dataset: imagenet-c and ade20k-c
    resume one (with the same seed), digits-c rebuilds it."""
    from dusa_cli.data.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES, check_selection
    from dusa_cli.ui import FileProgress, info

    is_ade = dataset is Dataset.ade20k_c
    # ADE20K-C is the 15 corruptions at severity 5 only (docs/research/dusa_official.md §3.8).
    corruptions, severities = check_selection(
        corruption or (CORRUPTIONS if is_ade else ALL_CORRUPTIONS), severity or ([5] if is_ade else SEVERITIES)
    )
    if dataset is Dataset.imagenet_c and source is None:
        raise ConfigError("imagenet-c needs --source DIR (an ImageNet-style <wnid>/<image> folder)")
    if is_ade and source is None:
        raise ConfigError("ade20k-c needs --source DIR (the ADEChallengeData2016 folder)")
    if dataset is not Dataset.digits_c:
        _refuse(_given(ctx, "limit_per_class", "force"), f"on {dataset.value} (digits-c only)")
    elif source is not None:
        raise ConfigError("digits-c is built from scikit-learn's digits: --source is for imagenet-c and ade20k-c")
    kept = partial(_kept_by_a_stopped_build, output, resumes=dataset is not Dataset.digits_c)
    with outcome_on_stop(kept), FileProgress(f"prepare {dataset.value}", enabled=not quiet) as progress:
        if dataset is Dataset.digits_c:
            from dusa_cli.data.digits import build_digits_c

            manifest = build_digits_c(output, seed=seed, corruptions=corruptions, severities=severities, workers=workers, limit_per_class=limit_per_class, replace=force, progress=progress)
        elif is_ade:
            from dusa_cli.data.ade20k_c import prepare_ade20k_c

            manifest = prepare_ade20k_c(source, output, corruptions=corruptions, severities=severities, seed=seed, workers=workers, progress=progress)
        else:
            from dusa_cli.data.imagenet_c import prepare_imagenet_c

            manifest = prepare_imagenet_c(source, output, corruptions=corruptions, severities=severities, seed=seed, workers=workers, progress=progress)
    info(f"wrote {manifest.written} of the {len(manifest['files'])} files in {output} (manifest.json)")


def _kept_by_a_stopped_build(output: Path, resumes: bool) -> str:
    """What a stopped `prepare-data` left: imagenet-c and ade20k-c resume an earlier build,
    digits-c makes every file again (seconds)."""
    if not output.is_dir() or not any(output.iterdir()):
        return "nothing was written"
    return f"{output} holds part of the build (the same command {'finishes it' if resumes else 'builds it again'})"


DigitsDataOpt = Annotated[Path, typer.Option("--data", parser=local_path, metavar="DIR", help="A digits-c directory (uses its train/ and clean/ splits).")]
NO_WEIGHTS = "no weights were written"  # a stopped training: the weights file is written once, at the end
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists (without it an existing file is refused, so that weights such as the packaged ones are not lost by mistake).")]
EpochsOpt = Annotated[int, typer.Option(min=1, metavar="N", help="Training epochs.")]
TrainingSeedOpt = Annotated[int, typer.Option(min=0, metavar="N", help="Random seed of the training (initialisation, batch order, random draws).")]


def _check_weights_output(output: Path, overwrite: bool) -> None:
    """Before any training: the weights file can be written (a folder never can, --overwrite or
    not: said first), and is not replaced unasked. Exit 1 either way, an output's problem."""
    from dusa_cli.writing import check_writable

    check_writable(output)
    if output.exists() and not overwrite:
        raise DusaError(f"{output} exists; pass --overwrite to replace it")


@pretrain_app.command("digits-classifier")
@stoppable(NO_WEIGHTS)
def pretrain_digits_classifier(
    output: Annotated[Path, typer.Option("--output", "-o", parser=local_path, metavar="FILE", help="Weights file to write (.safetensors). The packaged one, which the digits presets use, is dusa_cli/assets/digits_resnet.safetensors.")],
    data: DigitsDataOpt = Path("data/digits-c"),
    epochs: EpochsOpt = 30,
    seed: TrainingSeedOpt = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the small digits ResNet on the clean source split (its weights ship in the package)."""
    from dusa_cli.engine.pretrain import train_digits_classifier
    from dusa_cli.ui import info

    _check_weights_output(output, overwrite)
    accuracy = train_digits_classifier(data, output, epochs=epochs, seed=seed, show_progress=not quiet)
    info(f"clean test accuracy {accuracy:.1%}; weights written to {output}")


@pretrain_app.command("digits-prior")
@stoppable(NO_WEIGHTS)
def pretrain_digits_prior(
    output: Annotated[Path, typer.Option("--output", "-o", parser=local_path, metavar="FILE", help="Weights file to write (.safetensors). The packaged one, which the digits DUSA preset uses, is dusa_cli/assets/sit_digits.safetensors.")],
    data: DigitsDataOpt = Path("data/digits-c"),
    epochs: EpochsOpt = 200,
    seed: TrainingSeedOpt = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the class-conditional pixel-space SiT prior of the digits demo (flow matching)."""
    from dusa_cli.engine.pretrain import train_digits_prior
    from dusa_cli.ui import info

    _check_weights_output(output, overwrite)
    loss = train_digits_prior(data, output, epochs=epochs, seed=seed, show_progress=not quiet)
    info(f"clean test flow-matching loss {loss:.4f}; weights written to {output}")


@app.command()
def baseline(
    config: ConfigOpt = None,
    method: Annotated[Optional[str], typer.Option(metavar="NAME", help="source | norm | tent | eata | sar | rotta | cotta, or a method of your own without a prior (docs/DEVELOPING.md) → method.name.")] = None,
    task: Annotated[Optional[Task], typer.Option(help="cls: classification; seg: segmentation (ADE20K-C, SegFormer) → task.")] = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", parser=local_path, metavar="DIR", help="Dataset root: the ImageNet-C layout (CORRUPTION/SEVERITY/CLASS/IMAGE), CIFAR-10-C's .npy files or, with --task seg, ADE20K-C → data.root.")] = None,
    corruption: CorruptionOpt = None,
    severity: SeverityOpt = None,
    num_ex: NumExOpt = None,
    setting: SettingOpt = None,
    seed: SeedOpt = None,
    output: OutputOpt = None,
    compile_: compile_option("the classifier or segmenter (model)", offered="model") = None,
    profile: RunProfileOpt = None,
    track: TrackOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    gpus: GpusOpt = None,
) -> None:
    """Run a method without a generative prior (source, norm, tent, eata, sar, rotta, cotta) online over the corruptions (--task seg: segmentation)."""
    overrides = _overrides(method=method, task=task, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("baseline", config, overrides, set_, resume, quiet, gpus)


@app.command("adapt-cls")
def adapt_cls(
    config: config_option("configs/cls") = None,
    method: Annotated[Optional[str], typer.Option(metavar="NAME", help="dusa | dusa_u → method.name.")] = None,
    prior: Annotated[Optional[str], typer.Option(metavar="NAME", help="Prior preset (sit_xl_2, dit_xl_2_256, sit_digits, …) → method.prior.")] = None,
    prior_checkpoint: Annotated[Optional[Path], typer.Option(parser=local_path, metavar="FILE", help="Local weights of the prior → method.prior_checkpoint (used instead of a preset's packaged weights: method.prior_pretrained false).")] = None,
    vae: Annotated[Optional[str], typer.Option(metavar="PATH", help="Local diffusers VAE directory or weights file, or 'none' → method.vae.")] = None,
    model: ClassifierOpt = None,
    checkpoint: ClassifierCheckpointOpt = None,
    data: DataOpt = None,
    corruption: CorruptionOpt = None,
    severity: SeverityOpt = None,
    num_ex: NumExOpt = None,
    setting: SettingOpt = None,
    seed: SeedOpt = None,
    output: OutputOpt = None,
    compile_: compile_option(f"the classifier (model) or {PRIOR_PARTS}") = None,
    profile: RunProfileOpt = None,
    track: TrackOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    gpus: GpusOpt = None,
) -> None:
    """Adapt a classifier with DUSA (or DUSA-U) and a class-conditional diffusion/flow prior."""
    overrides = _overrides(method=method, prior=prior, prior_checkpoint=prior_checkpoint, vae=vae, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("adapt-cls", config, overrides, set_, resume, quiet, gpus)


@app.command("adapt-seg")
def adapt_seg(
    config: config_option("configs/seg") = None,
    method: Annotated[Optional[str], typer.Option(metavar="NAME", help="dusa_seg → method.name.")] = None,
    prior: Annotated[Optional[Path], typer.Option(parser=local_path, metavar="DIR", help="Local Stable Diffusion 3 directory (diffusers layout) → method.prior.")] = None,
    model: Annotated[Optional[str], typer.Option(metavar="NAME", help="Segmenter: segformer → model.name.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(parser=local_path, metavar="DIR", help="Local transformers SegFormer directory → model.checkpoint.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", parser=local_path, metavar="DIR", help="ADE20K-C root (official or images/validation/<c>_5 layout) → data.root.")] = None,
    corruption: Annotated[Optional[list[str]], typer.Option("--corruption", metavar="NAMES", help="Corruption name, comma list or 'all' (ADE20K-C's 15); repeatable → data.corruptions.")] = None,
    severity: SeverityOpt = None,
    num_ex: NumExOpt = None,
    setting: SettingOpt = None,
    seed: SeedOpt = None,
    output: OutputOpt = None,
    compile_: compile_option(f"the segmenter (model) or {PRIOR_PARTS}") = None,
    profile: RunProfileOpt = None,
    track: TrackOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    gpus: Annotated[
        Optional[str],
        typer.Option("--gpus", metavar="DEVICES", help="Model parallelism: split the SD3 transformer's blocks over these devices, e.g. 0,1 (or cpu,cpu) → run.split_devices."),
    ] = None,
) -> None:
    """Adapt a segmenter with DUSA and a Stable Diffusion 3 prior, window by window (one image per step)."""
    overrides = _overrides(method=method, prior=prior, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("adapt-seg", config, overrides, set_, resume, quiet, gpus)


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
        _refuse(_given(ctx, "updates", "warmup", "recipe", "variant", "profile"), "with --trajectory (it compares the fast recipe with fp32, untimed)")
    else:
        _refuse(_given(ctx, "tolerance"), "without --trajectory")
    if recipe is not None and RecipeName.fast not in recipe and not variant:
        _refuse(_given(ctx, "micro_batch", "compile_classifier", "compile_mode", "checkpointing", "channels_last"), "(they change the fast recipe, which --recipe leaves out)")
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


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """Those of the command's parameters `names` that the command line set, as flags (--warmup).
    (By the source's name: Typer carries its own copy of click's ParameterSource.)"""
    flags = {parameter.name: parameter.opts[0] for parameter in ctx.command.params}
    return [flags[name] for name in names if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]


def _refuse(flags: list[str], why: str) -> None:
    """A usage error naming `flags`, which do nothing `why`: silently ignored options mislead."""
    if flags:
        raise ConfigError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {why}")


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
        _refuse(_given(ctx, "checkpointing"), "(it changes the fast recipe, which --recipe leaves out)")
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


@app.command()
@stoppable()
def report(
    paths: Annotated[list[Path], typer.Argument(parser=local_path, metavar="DIR", help="Run directories or directories holding runs (searched for results.json; other tools' files are skipped with a warning).")],
    metric: Annotated[Optional[Metric], typer.Option(metavar="NAME", help="acc: top-1 accuracy; err: top-1 error; top5/top20: top-5/top-20 accuracy; miou: mean IoU; pacc: pixel accuracy (default: acc, or miou for segmentation runs).")] = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="table (terminal), md or csv.")] = Format.table,
) -> None:
    """Tables over results: rows = experiments (mean ± std over seeds), columns = corruptions + mean.

    Runs whose config.yaml differ only in run.seed or in how they ran (device, compile, workers,
    output) are seeds of one experiment; a rerun of the same seed counts once, and so does a run
    given twice. Rows of one method are labelled by the fewest settings that tell them apart, a
    key by its last part where that is unambiguous (`tent · lr=0.01`); notes under the table give
    each row's other settings in which they differ, and any model, data or setting key in which
    rows differ otherwise (not like for like). --format table puts the corruptions in columns
    when they fit the terminal's width (COLUMNS), else the narrower way round: corruptions as
    rows, a column per experiment; md and csv always put the corruptions in columns."""
    from dusa_cli.results.report import build_table, find_runs, to_csv, to_markdown, to_rich
    from dusa_cli.ui import stdout, warn

    table = build_table(find_runs(paths, skip=warn), metric.value if metric else None)
    if format is Format.table:
        stdout.print(to_rich(table, stdout.width))
    else:
        sys.stdout.write(to_markdown(table) if format is Format.md else to_csv(table))


def main() -> None:
    # --debug may come anywhere (`dusa baseline … --debug`): it is taken out before Typer parses,
    # and the environment carries it to the processes of a --gpus run.
    if "--debug" in sys.argv[1:]:
        sys.argv = [arg for arg in sys.argv if arg != "--debug"]
        os.environ["DUSA_DEBUG"] = "1"
    _guarded(_parse_and_dispatch)


def command() -> typer.core.TyperGroup:
    """The app as a Click command. Its help's second column says what each option takes, and
    Typer 0.29 fills it from the type where no metavar is set: every flag, --help too, showed
    `<bool>`, as if it took a value, and `report`'s directories `<list[Path]>`. Here a flag shows
    nothing, a choice its choices as our own metavars do (`dit|sit`, not `<dit|sit>`), and an
    argument of several values its metavar with `...` (`DIR...`). Typer's rich help also keeps a
    docstring's line breaks, which the terminal then wraps again: a command's help is joined into
    one line per paragraph."""
    root = typer.main.get_command(app)
    help_names = root.context_settings["help_option_names"]

    def plain(node: Any) -> None:
        if node.help:
            node.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in node.help.split("\n\n"))
        # A command makes its help option on first request and keeps it: made here, it can be changed.
        help_option = node.get_help_option(typer.Context(node, help_option_names=help_names))
        for param in [*node.params, help_option]:
            argument = isinstance(param, typer.core.TyperArgument)  # Typer ignores an argument's metavar there
            choices = getattr(param, "type_descriptor", None) and param.type_descriptor.choices
            if getattr(param, "is_flag", False):
                param.metavar = ""  # shown in place of the type
            elif choices and (argument or param.metavar is None):  # Typer's `<a|b>`
                shown = "|".join(str(getattr(choice, "value", choice)) for choice in choices)
                if argument:
                    param.display_type_rich = lambda ctx, shown=shown: shown
                else:
                    param.metavar = shown
            elif argument and param.nargs != 1:
                param.display_type_rich = lambda ctx, shown=f"{param.metavar}...": shown
        for child in getattr(node, "commands", {}).values():
            plain(child)

    plain(root)
    _fold_long_words()
    return root


def _fold_long_words() -> None:
    """Help text breaks a word longer than its column (`method.prior_checkpoint` in an 80-column
    terminal) onto the next line, where Typer's rich help cut it to `method.prior_che…`."""
    from rich.text import Text
    from typer import rich_utils

    make_text = rich_utils._make_rich_text
    if getattr(make_text, "folds", False):
        return

    def folding(**kwargs: Any) -> Any:
        text = make_text(**kwargs)
        if isinstance(text, Text):
            text.overflow = "fold"
        return text

    folding.folds = True  # type: ignore[attr-defined]
    rich_utils._make_rich_text = folding


def _parse_and_dispatch() -> None:
    """The app, with usage errors (unknown option, value out of range, bad choice) as one error
    line and exit 2, like a bad config: Typer would box them in a multi-line panel."""
    root = command()
    try:
        code = root.main(prog_name="dusa", standalone_mode=False)
    except typer.TyperException as failure:  # Typer's own Click: UsageError and its kin
        context = getattr(failure, "ctx", None)
        if type(failure).__name__ == "NoArgsIsHelpError":  # `dusa` alone: the help is printed already
            code = failure.exit_code
        elif context is None and failure.exit_code != ExitCode.USAGE:
            raise DusaError(failure.format_message()) from failure
        else:  # a usage error; the parser's own (`-c` without its value) come without a context
            message = failure.format_message().replace(": Value error, ", ": ")  # Typer's wording of a bad choice
            path = context.command_path if context else _command_path(root, sys.argv[1:])
            raise ConfigError(f"{message} (see '{path} --help')") from failure  # exit 2, as Click's
    if isinstance(code, int) and code:  # what a typer.Exit ended with
        sys.exit(code)


def _command_path(root: typer.core.TyperGroup, args: list[str]) -> str:
    """`dusa bench cls` for `bench cls --variant`: the command that the leading arguments name."""
    node, path = root, ["dusa"]
    for word in args:
        node = getattr(node, "commands", {}).get(word)
        if node is None:
            break
        path.append(word)
    return " ".join(path)


def _guarded(call: Callable[[], Any]) -> None:
    """Run `call`; a failure ends the process with one line (after its traceback with --debug)
    and its exit code. Ranks other than 0 name themselves; one process reports a stop (stopping.py)."""
    debug = os.environ.get("DUSA_DEBUG") == "1"
    origin = "" if is_main_process() else f"rank {process_rank()}: "
    from dusa_cli.ui import error, warn

    if not debug:  # warnings in one line too (with --debug: Python's, saying where they came from)
        warnings.showwarning = lambda message, *_where, **_: warn(origin + str(message))

    try:
        call()
    except (DusaError, KeyboardInterrupt, OSError) as caught:
        # A KeyboardInterrupt here came before any command's stoppable(): Ctrl-C while Typer sets up.
        # An OSError is a path the system refused (too long, a file where a folder goes): the user's.
        if isinstance(caught, DusaError):
            failure = caught
        elif isinstance(caught, OSError):
            failure = DusaError(f"{caught.strerror or caught}: {caught.filename}" if caught.filename else str(caught))
        else:
            failure = interrupted(caught)
        if debug and not isinstance(failure, Interrupted):
            traceback.print_exc()
        if str(failure):  # empty: another process reports it (ReportedElsewhere, Interrupted)
            error(origin + _own_message(failure))
        _exit(int(failure.exit_code))
    except Exception as failure:  # anything unexpected still ends in one line (traceback with --debug)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        error(f"{origin}internal error: {type(failure).__name__}: {failure}{hint}")
        _exit(int(ExitCode.RUNTIME))


def _own_message(failure: DusaError) -> str:
    """The error's message. A DataLoader worker's error comes back with the worker's traceback
    prepended; its last line is the message (after the exception's class name)."""
    text = str(failure).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(failure).__module__}.{type(failure).__name__}: "
    return last.removeprefix(name)


def _exit(code: int) -> None:
    """Exit with `code`. A process whose run failed inside a process group skips interpreter
    teardown: destroying a gloo/NCCL group with a lost peer can block or abort (SIGABRT), which
    would replace the one-line error and its exit code with a crash report."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no second's import)
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The outcome is said: another Ctrl-C in the teardown (atexit handlers, data workers) ends
    # the process at once, where it would print a traceback from whichever handler it broke.
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    sys.exit(code)
