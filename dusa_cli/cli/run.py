"""The run commands: `dusa baseline`, `adapt-cls` and `adapt-seg`: flags → config → the engine,
in this process or one per GPU (--gpus)."""

from __future__ import annotations

import warnings
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dusa_cli.cli.app import QuietOpt, app, local_path, split_devices
from dusa_cli.cli.guard import guarded
from dusa_cli.errors import ConfigError
from dusa_cli.process import is_main_process
from dusa_cli.stopping import SAVED, outcome_on_stop, stoppable

if TYPE_CHECKING:
    from dusa_cli.config.schema import ExperimentConfig
    from dusa_cli.methods.base import TTAMethod


class Setting(str, Enum):
    reset_each_shift = "reset_each_shift"
    continual = "continual"


class Task(str, Enum):
    cls = "cls"
    seg = "seg"


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
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML (every key, defaults included: what OUTPUT/config.yaml would hold) and exit without running or reading any input.")]


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


@stoppable(SAVED)
def _run(command: str, config_path: Optional[Path], overrides: dict[str, Any], assignments: Optional[list[str]], resume: bool, quiet: bool, gpus: Optional[str], print_config: bool) -> None:
    from dusa_cli.config.loader import dump_config, load_config, read_preset, saved_run_config

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

    method = get_method(config.method.name)
    recipe_given = any(key.startswith(("optim.", "run.precision")) for key in [*overrides, *(assignments or [])])
    if config_path is None and not recipe_given and method.trains:
        warnings.warn(
            f"no --config: built-in defaults (optim {config.optim.name} lr {config.optim.lr:g}, run.precision "
            f"{config.run.precision}), not a paper's recipe (presets in configs/cls and configs/seg)", stacklevel=1,
        )
    for caveat in method.caveats(config.method):
        warnings.warn(caveat, stacklevel=1)
    _check_command(command, config)
    if print_config:
        typer.echo(dump_config(config), nl=False)
        return
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
    launch(devices, worker, (config, resume, quiet), outcome)


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


def worker(config: ExperimentConfig, resume: bool, quiet: bool) -> None:
    """One process of a `--gpus` run (started by engine.distributed.launch, which reports a stop)."""
    guarded(stoppable(report=False)(partial(_execute, config, resume, quiet)))  # silent: the launcher reports


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
    print_config: PrintConfigOpt = False,
    quiet: QuietOpt = False,
    gpus: GpusOpt = None,
) -> None:
    """Run a method without a generative prior (source, norm, tent, eata, sar, rotta, cotta) online over the corruptions (--task seg: segmentation)."""
    overrides = _overrides(method=method, task=task, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("baseline", config, overrides, set_, resume, quiet, gpus, print_config)


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
    print_config: PrintConfigOpt = False,
    quiet: QuietOpt = False,
    gpus: GpusOpt = None,
) -> None:
    """Adapt a classifier with DUSA (or DUSA-U) and a class-conditional diffusion/flow prior."""
    overrides = _overrides(method=method, prior=prior, prior_checkpoint=prior_checkpoint, vae=vae, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("adapt-cls", config, overrides, set_, resume, quiet, gpus, print_config)


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
    print_config: PrintConfigOpt = False,
    quiet: QuietOpt = False,
    gpus: Annotated[
        Optional[str],
        typer.Option("--gpus", metavar="DEVICES", help="Model parallelism: split the SD3 transformer's blocks over these devices, e.g. 0,1 (or cpu,cpu) → run.split_devices."),
    ] = None,
) -> None:
    """Adapt a segmenter with DUSA and a Stable Diffusion 3 prior, window by window (one image per step)."""
    overrides = _overrides(method=method, prior=prior, model=model, checkpoint=checkpoint, data=data, corruption=corruption, severity=severity, num_ex=num_ex, setting=setting, seed=seed, output=output, compile=compile_, profile=profile, track=track)
    _run("adapt-seg", config, overrides, set_, resume, quiet, gpus, print_config)
