"""Tables across runs: rows = methods (seeds pooled as mean ± std), columns = corruptions + mean."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dusa_cli.data.corruptions import ALL_CORRUPTIONS
from dusa_cli.errors import DusaError
from dusa_cli.results.store import RESULTS_FILE, RESULTS_FORMAT

# metric → (task record key, title, the task it belongs to)
METRICS = {
    "acc": ("top1", "accuracy (%)", "cls"),
    "err": ("error", "error (%)", "cls"),
    "miou": ("miou", "mIoU (%)", "seg"),
}
GROUP_FIELDS = ("method", "model", "setting", "task")
MEAN = "mean"


def find_runs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Load every results.json at or below the given paths (a run dir or a dir of runs)."""
    runs = []
    for path in paths:
        if not path.exists():
            raise DusaError(f"no such results path: {path}")
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS_FILE))
        if not files:
            raise DusaError(f"no {RESULTS_FILE} found under {path}")
        for file in files:
            try:
                run = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise DusaError(f"unreadable results file {file}: {error}") from None
            if run.get("format") != RESULTS_FORMAT:
                raise DusaError(f"{file} is not a dusa results file ({RESULTS_FORMAT})")
            run["path"] = str(file.parent)
            runs.append(run)
    return runs


@dataclass
class Row:
    label: str
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    partial: bool = False

    def cell(self, column: str) -> tuple[float, float] | None:
        values = self.values.get(column)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[Row]


def _run_columns(run: dict[str, Any], key: str) -> dict[str, float]:
    """Per corruption, the metric averaged over the run's severities, in percent."""
    by_corruption: dict[str, list[float]] = {}
    for task in run["tasks"]:
        by_corruption.setdefault(task["corruption"], []).append(100.0 * task[key])
    return {name: statistics.fmean(values) for name, values in by_corruption.items()}


def default_metric(runs: list[dict[str, Any]]) -> str:
    """acc for classification runs, miou for segmentation runs."""
    tasks = {run.get("task", "cls") for run in runs}
    if len(tasks) > 1:
        raise DusaError("these runs mix classification and segmentation; report them separately")
    return "miou" if tasks == {"seg"} else "acc"


def build_table(runs: list[dict[str, Any]], metric: str | None = None) -> Table:
    metric = metric or default_metric(runs)
    key, title, task = METRICS[metric]
    other = sorted({run.get("path", "a run") for run in runs if run.get("task", "cls") != task})
    if other:
        raise DusaError(f"--metric {metric} scores task {task}, but {other[0]} is not a {task} run")
    varying = [f for f in GROUP_FIELDS if len({r.get(f) for r in runs}) > 1]
    rows: dict[tuple, Row] = {}
    names: set[str] = set()
    for run in runs:
        group = tuple(run.get(f) for f in GROUP_FIELDS)
        label = " · ".join(str(run.get(f)) for f in ["method", *[v for v in varying if v != "method"]])
        row = rows.setdefault(group, Row(label=label))
        row.seeds.append(run.get("seed"))
        columns = _run_columns(run, key)
        names.update(columns)
        for name, value in columns.items():
            row.values.setdefault(name, []).append(value)
        planned = {(t["corruption"], t["severity"]) for t in run["planned_tasks"]}
        complete = len(run["tasks"]) == len(planned) and run["tasks"]
        if complete:
            row.values.setdefault(MEAN, []).append(statistics.fmean(columns.values()))
        else:
            row.partial = True
    ordered = sorted(rows.values(), key=lambda row: not row.label.startswith("source"))  # reference first
    order = [c for c in ALL_CORRUPTIONS if c in names] + sorted(names - set(ALL_CORRUPTIONS))
    severities = sorted({t["severity"] for r in runs for t in r["tasks"]})
    suffix = f", severity {', '.join(map(str, severities))}" if severities else ""
    return Table(title=f"online {title}{suffix}", columns=[*order, MEAN], rows=ordered)


def _format(cell: tuple[float, float] | None, seeds: int) -> str:
    if cell is None:
        return "—"
    mean, std = cell
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def _header(table: Table) -> list[str]:
    return ["method", "seeds", *table.columns]


def _cells(table: Table) -> list[list[str]]:
    return [
        [row.label + (" (partial)" if row.partial else ""), str(len(row.seeds))]
        + [_format(row.cell(c), len(row.seeds)) for c in table.columns]
        for row in table.rows
    ]


def to_markdown(table: Table) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join(_header(table)) + " |"]
    lines.append("|" + "---|" * len(_header(table)))
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: one mean and one std column per corruption."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seeds", *[f"{c}{s}" for c in table.columns for s in ("", "_std")]])
    for row in table.rows:
        values: list[str] = [row.label, str(len(row.seeds))]
        for column in table.columns:
            cell = row.cell(column)
            values += ["", ""] if cell is None else [f"{cell[0]:.4f}", f"{cell[1]:.4f}"]
        writer.writerow(values)
    return out.getvalue()


def to_rich(table: Table, width: int = 200):
    """Corruptions as columns when they fit in `width`; otherwise as rows (narrow terminals)."""
    from rich.table import Table as RichTable

    header, body = _header(table), _cells(table)
    needed = sum(max(len(h), *(len(row[i]) for row in body)) + 3 for i, h in enumerate(header))
    if needed > width:  # transpose: rows = corruptions (+ seeds, mean), columns = methods
        header, body = ["corruption", *(row[0] for row in body)], [list(r) for r in zip(*body)][1:]
        body = [[name, *cells] for name, cells in zip(_header(table)[1:], body)]
    rich_table = RichTable(title=table.title, header_style="bold")
    for index, name in enumerate(header):
        rich_table.add_column(name, justify="left" if index == 0 else "right", overflow="fold")
    for cells in body:
        rich_table.add_row(*cells, style="bold" if cells[0] == MEAN else None)
    return rich_table
