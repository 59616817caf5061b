"""`dusa report`: tables over run directories."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dusa_cli.cli.app import app, local_path
from dusa_cli.stopping import stoppable


class Metric(str, Enum):
    acc = "acc"
    err = "err"
    top5 = "top5"
    top20 = "top20"
    miou = "miou"
    pacc = "pacc"


class Format(str, Enum):
    table = "table"
    md = "md"
    csv = "csv"


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
