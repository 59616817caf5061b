"""`dusa prepare-data` (the corrupted benchmarks on disk) and `dusa pretrain` (the digits models)."""

from __future__ import annotations

import os
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from dusa_cli.cli.app import QuietOpt, app, given_flags, local_path, refuse
from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.stopping import outcome_on_stop, stoppable

pretrain_app = typer.Typer(help="Train the embedded benchmark's models: the digits classifier and the digits prior.", no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")


class Dataset(str, Enum):
    digits_c = "digits-c"
    imagenet_c = "imagenet-c"
    ade20k_c = "ade20k-c"


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
        refuse(given_flags(ctx, "limit_per_class", "force"), f"on {dataset.value} (digits-c only)")
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
