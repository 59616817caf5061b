"""The `dusa` Typer app, its global options, and what several command modules share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dusa_cli import __version__
from dusa_cli.errors import ConfigError

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


def local_path(text: str | Path) -> Path:
    """A path option's value (Typer passes a Path default through here too). An empty one
    (`-o "$OUT"` with OUT unset) is refused: Path("") would be the current directory."""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("expected a path, got an empty string")
    return Path(text)


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


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


def given_flags(ctx: typer.Context, *names: str) -> list[str]:
    """Those of the command's parameters `names` that the command line set, as flags (--warmup).
    (By the source's name: Typer carries its own copy of click's ParameterSource.)"""
    flags = {parameter.name: parameter.opts[0] for parameter in ctx.command.params}
    return [flags[name] for name in names if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]


def refuse(flags: list[str], why: str) -> None:
    """A usage error naming `flags`, which do nothing `why`: silently ignored options mislead."""
    if flags:
        raise ConfigError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {why}")


def split_devices(text: str) -> list[str]:
    """`--gpus 0,1` (or `cpu,cpu`, `cuda:2,cuda:3`) for model parallelism: one device per part."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--gpus takes a comma list of GPU indices (or cpu), got '{text}'")
    return [f"cuda:{part}" if part.isdecimal() else part for part in parts]
