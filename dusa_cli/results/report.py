"""Tables across runs: rows = experiments (a method and its settings; seeds pooled as mean ±
std), columns = corruptions + mean."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dusa_cli.data.corruptions import ALL_CORRUPTIONS
from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.results.markdown import pipe_table
from dusa_cli.results.store import RESULTS_FILE, RESUMABLE_CHANGES, read_results, read_run_config

# metric → (task record key, title, the task it belongs to)
METRICS = {
    "acc": ("top1", "accuracy (%)", "cls"),
    "err": ("error", "error (%)", "cls"),
    "top5": ("top5", "top-5 accuracy (%)", "cls"),
    "top20": ("top20", "top-20 accuracy (%)", "cls"),
    "miou": ("miou", "mIoU (%)", "seg"),
    "pacc": ("pixel_accuracy", "pixel accuracy (%)", "seg"),
}
MEAN = "mean"


def find_runs(paths: Iterable[Path], skip: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Load every results.json at or below the given paths (a run dir or a dir of runs). A file
    named on the command line must be a dusa results file; one found below a folder that is not
    (another tool's results.json) is passed over, and `skip` is told why. A run reached twice
    (a path given twice, or a run inside another path given) is read once, and `skip` is told."""
    runs = []
    read: dict[Path, Path] = {}  # each results file read (resolved) → the path given that reached it
    for path in paths:
        if not path.exists():
            raise DusaError(f"no such results path: {path}")
        named = path.is_file()
        files = {file.resolve(): file for file in ([path] if named else sorted(path.rglob(RESULTS_FILE)))}
        before = sorted({read[resolved] for resolved in files if resolved in read})
        if before and skip is not None:
            twice = path.resolve() in {earlier.resolve() for earlier in before}
            skip(f"{path} is given twice: its runs count once" if twice else f"{path} holds runs given before ({', '.join(map(str, before))}): each counts once")
        found = []
        for resolved, file in files.items():
            if resolved in read:
                continue
            read[resolved] = path
            try:
                found.append(_read_run(file))
            except DusaError as problem:
                if named or skip is None:
                    raise
                skip(f"skipped {problem}")
        if not found and not before:
            raise DusaError(f"no dusa {RESULTS_FILE} found under {path}")
        runs += found
    return runs


def _read_run(file: Path) -> dict[str, Any]:
    run = read_results(file)
    run["path"] = str(file.parent)
    config = file.parent / "config.yaml"
    if config.is_file():  # what tells experiments apart: readable, or the run is skipped
        run["config"] = read_run_config(config)
    return run


@dataclass
class Row:
    label: str
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    partial: bool = False

    def cell(self, column: str) -> tuple[float, float | None, int] | None:
        """Mean, std (None for one value) and how many seeds the column pools."""
        values = self.values.get(column)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _run_columns(run: dict[str, Any], key: str) -> dict[str, float]:
    """Per corruption, the metric averaged over the run's severities, in percent."""
    by_corruption: dict[str, list[float]] = {}
    for task in run["tasks"]:
        if key not in task:  # records written before a score was added (top20) lack it
            raise DusaError(f"{run.get('path', 'a run')} records no {key} (written by an older dusa); pick another --metric")
        by_corruption.setdefault(task["corruption"], []).append(100.0 * task[key])
    return {name: statistics.fmean(values) for name, values in by_corruption.items()}


def default_metric(runs: list[dict[str, Any]]) -> str:
    """acc for classification runs, miou for segmentation runs."""
    tasks = {run.get("task", "cls") for run in runs}
    if len(tasks) > 1:
        raise DusaError("these runs mix classification and segmentation; report them separately")
    return "miou" if tasks == {"seg"} else "acc"


# How and where a run was executed, not what it measured: runs that differ only in these are
# seeds (or reruns) of one experiment.
HOW_IT_RAN = RESUMABLE_CHANGES | {"run.seed", "run.device", "run.split_devices", "run.compile", "run.compile_mode", "run.channels_last"}


def _experiment(run: dict[str, Any]) -> dict[str, Any]:
    """What the run measured: its config.yaml (as find_runs read it) minus how it ran. Results
    without their config (a copied results.json, or a run still in memory) are told apart by
    what results.json names."""
    if "config" not in run:
        return {"task": run.get("task", "cls"), "method.name": run.get("method"), "model.name": run.get("model"), "run.setting": run.get("setting")}
    return {key: value for key, value in run["config"].items() if key not in HOW_IT_RAN}


def _value(value: Any, limit: int | None = 40) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Labels:
    """Each experiment's row label, the keys it shows, and a legend line per row whose label
    leaves out settings in which its method's rows differ."""

    labels: list[str]
    shown: list[list[str]]
    legend: list[str]


def _labels(experiments: list[dict[str, Any]]) -> Labels:
    """The method, then the fewest of the settings its rows differ in that tell them apart, a key
    by its last part where no other key ends alike: `tent · lr=0.001`. The other settings in which
    they differ go in the legend: `tent · lr=0.001 · optim.name=sgd: also optim.momentum=0.5`."""
    by_method: dict[Any, list[dict[str, Any]]] = {}
    for experiment in experiments:
        by_method.setdefault(experiment.get("method.name"), []).append(experiment)
    chosen: dict[Any, list[str]] = {}
    varying: dict[Any, list[str]] = {}
    for method, siblings in by_method.items():
        keys = sorted({key for e in siblings for key in e}, key=lambda key: (not key.endswith(".name"), key))  # a choice first (optim.name)
        varying[method] = [key for key in keys if len({_json(e.get(key)) for e in siblings}) > 1]
        chosen[method] = _telling_apart(siblings, varying[method])
    short = _short_keys({key for e in experiments for key in e})
    shown = [chosen[e.get("method.name")] for e in experiments]
    for limit in (40, None):  # values cut short, unless that makes two rows' labels alike
        labels = [" · ".join([str(e.get("method.name")), *(f"{short[key]}={_value(e.get(key), limit)}" for key in keys)]) for e, keys in zip(experiments, shown)]
        if len(set(labels)) == len(labels):
            break
    legend = []
    for label, e in zip(labels, experiments):
        hidden = [key for key in varying[e.get("method.name")] if key not in chosen[e.get("method.name")]]
        if hidden:
            legend.append(f"{label}: also {', '.join(f'{key}={_value(e.get(key))}' for key in hidden)}")
    return Labels(labels, shown, legend)


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def _telling_apart(siblings: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The fewest of `keys` whose values tell the siblings apart, picked greedily: each time the
    key that parts the most of them (the first in `keys` of those alike), in sorted order."""

    def apart(picked: list[str]) -> int:
        return len({tuple(_json(e.get(key)) for key in picked) for e in siblings})

    chosen: list[str] = []
    while apart(chosen) < len(siblings) and len(chosen) < len(keys):
        chosen.append(max((key for key in keys if key not in chosen), key=lambda key: apart([*chosen, key])))
    return sorted(chosen)


def _short_keys(keys: set[str]) -> dict[str, str]:
    """Each key by its last part (`optim.lr` → `lr`) where no other key ends alike (`optim.name`,
    `model.name` stay whole)."""
    leaves = [key.rpartition(".")[2] for key in keys]
    return {key: leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)}


# What makes two rows' scores comparable: the same task, model, data and setting.
LIKE_FOR_LIKE = ("task", "model.", "data.", "run.setting")


def _unlike(experiments: list[dict[str, Any]], labels: Labels) -> list[str]:
    """A note per comparability setting in which rows differ that their labels do not show
    (tent on every image next to dusa on 64 of them)."""
    shared = set.intersection(*(set(e) for e in experiments)) if experiments else set()
    notes = []
    for key in sorted(k for k in shared if k.startswith(LIKE_FOR_LIKE)):
        values = [_value(e[key]) for e in experiments]
        if len(set(values)) > 1 and not all(key in keys for keys in labels.shown):
            unsaid = [f"{label}: {value}" for label, value, keys in zip(labels.labels, values, labels.shown) if key not in keys]
            said = "; the others as labelled" if len(unsaid) < len(experiments) else ""
            notes.append(f"rows differ in {key} ({'; '.join(unsaid)}{said})")
    return notes


def _one_per_seed(runs: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """A rerun of an experiment with the same seed is not another sample: the run with most
    finished tasks counts (the first listed on a tie), and a note says which was left out."""
    kept: dict[Any, dict[str, Any]] = {}
    for run in runs:
        seed = run.get("seed")
        if seed not in kept:
            kept[seed] = run
            continue
        counted, dropped = (run, kept[seed]) if len(run["tasks"]) > len(kept[seed]["tasks"]) else (kept[seed], run)
        kept[seed] = counted
        notes.append(f"{dropped.get('path', 'a run')} repeats seed {seed} of {counted.get('path', 'a run')}: counted once")
    return list(kept.values())


def build_table(runs: list[dict[str, Any]], metric: str | None = None) -> Table:
    """One row per experiment (runs that differ only in seed or in how they ran); its cells are
    the mean ± std over distinct seeds."""
    metric = metric or default_metric(runs)
    key, title, task = METRICS[metric]
    other = sorted({run.get("path", "a run") for run in runs if run.get("task", "cls") != task})
    if other:
        raise ConfigError(f"--metric {metric} scores task {task}, but {other[0]} is not a {task} run")
    notes = [f"{run.get('path', 'a run')} has no finished task: left out" for run in runs if not run["tasks"]]
    runs = [run for run in runs if run["tasks"]]
    if not runs:
        raise DusaError("none of these runs has a finished task yet")
    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for run in runs:
        experiment = _experiment(run)
        groups.setdefault(json.dumps(experiment, sort_keys=True, default=str), (experiment, []))[1].append(run)
    experiments = [experiment for experiment, _ in groups.values()]
    labels = _labels(experiments)
    notes += _unlike(experiments, labels) + labels.legend
    rows: list[Row] = []
    names: set[str] = set()
    for label, (_, members) in zip(labels.labels, groups.values()):
        row = Row(label=label)
        for run in _one_per_seed(members, notes):
            row.seeds.append(run.get("seed"))
            columns = _run_columns(run, key)
            names.update(columns)
            for name, value in columns.items():
                row.values.setdefault(name, []).append(value)
            planned = {(t["corruption"], t["severity"]) for t in run["planned_tasks"]}
            if len({(t["corruption"], t["severity"]) for t in run["tasks"]}) == len(planned):
                row.values.setdefault(MEAN, []).append(statistics.fmean(columns.values()))
            else:
                row.partial = True
        rows.append(row)
    rows.sort(key=lambda row: not row.label.startswith("source"))  # the reference first, otherwise as found
    order = [c for c in ALL_CORRUPTIONS if c in names] + sorted(names - set(ALL_CORRUPTIONS))
    severities = sorted({t["severity"] for r in runs for t in r["tasks"]})
    # A corruption's cell is the mean over its severities: the title says which, and that it is a mean.
    listed = ", ".join(map(str, severities))
    suffix = f"severity {listed}" if len(severities) == 1 else f"mean over severities {listed}"
    return Table(title=f"online {title}, {suffix}", columns=[*order, MEAN], rows=rows, notes=notes)


def _format(cell: tuple[float, float | None, int] | None, seeds: int) -> str:
    """`mean ± std`; a cell pooling fewer seeds than its row (a stopped run) says how many."""
    if cell is None:
        return "—"
    mean, std, count = cell
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
    return text if count == seeds else f"{text} (n={count})"


def _header(table: Table) -> list[str]:
    return ["method", "seeds", *table.columns]


def _cells(table: Table) -> list[list[str]]:
    return [
        [row.label + (" (partial)" if row.partial else ""), str(len(row.seeds))]
        + [_format(row.cell(c), len(row.seeds)) for c in table.columns]
        for row in table.rows
    ]


def to_markdown(table: Table) -> str:
    return pipe_table(table.title, _header(table), _cells(table), below=[f"- {note}" for note in table.notes])


def to_csv(table: Table) -> str:
    """Machine-readable: per corruption a mean, a std (empty for one seed) and the number of
    seeds it is over (`_n`: fewer than `seeds` where a run stopped early); `complete` is false
    where a run stopped early (its mean is then over the complete runs only, or empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # text lines, as the other formats
    writer.writerow(["method", "seeds", "complete", *[f"{c}{s}" for c in table.columns for s in ("", "_std", "_n")]])
    for row in table.rows:
        values: list[str] = [row.label, str(len(row.seeds)), str(not row.partial).lower()]
        for column in table.columns:
            cell = row.cell(column)
            if cell is None:
                values += ["", "", "0"]
            else:
                mean, std, count = cell
                values += [f"{mean:.4f}", "" if std is None else f"{std:.4f}", str(count)]
        writer.writerow(values)
    return out.getvalue()


LABEL_WIDTH = 24  # a label wider than this wraps at its " · " (labels do not choose the layout)
CORNER = "corruption"


def to_rich(table: Table, width: int = 200):
    """Corruptions as columns when they fit in `width`; otherwise the table the narrower way
    round: corruptions as rows, a column per experiment, when that is narrower (many
    corruptions, few experiments). Widths are the figures' (labels wrap). The notes follow
    the table, wrapped at the terminal's width (a caption would wrap at the table's)."""
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    header, body = _header(table), _cells(table)
    widths = [max(len(h), *(len(row[i]) for row in body)) + 3 for i, h in enumerate(header)]
    across = min(widths[0], LABEL_WIDTH + 3) + sum(widths[1:])
    down = max(map(len, [CORNER, *header[1:]])) + 3 + sum(max(map(len, row[1:])) + 3 for row in body)
    if across > width and down < across:  # transpose: rows = corruptions (+ seeds, mean), columns = experiments
        header, body = [CORNER, *(row[0] for row in body)], [list(r) for r in zip(*body)][1:]
        body = [[name, *cells] for name, cells in zip(_header(table)[1:], body)]
    rich_table = RichTable(title=table.title, header_style="bold")
    for index, name in enumerate(header):
        rich_table.add_column(name, justify="left" if index == 0 else "right", overflow="fold")
    for cells in body:
        rich_table.add_row(*cells, style="bold" if cells[0] == MEAN else None)
    return Group(rich_table, Text("\n".join(table.notes), style="table.caption")) if table.notes else rich_table
