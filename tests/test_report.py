"""`dusa report` rows: one per experiment (config minus seed and how it ran), seeds counted once."""

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
from helpers import assert_one_line_error, dusa, heavy_imports

from dusa_cli.config.loader import load_config
from dusa_cli.engine.loop import run_experiment
from dusa_cli.results.report import MEAN, build_table, find_runs, to_csv, to_markdown

PRESET = Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml"


@pytest.fixture(scope="module")
def sweep(digits_c: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tent at two learning rates × two seeds, and source once, all real runs on digits-C."""
    root = tmp_path_factory.mktemp("sweep")
    plan = [("source", None, 1)] + [("tent", lr, seed) for lr in (0.001, 0.01) for seed in (1, 2)]
    for method, lr, seed in plan:
        overrides = {"data.root": str(digits_c), "data.corruptions": ["gaussian_noise", "fog"], "data.batch_size": 16,
                     "method.name": method, "run.seed": seed, "run.output": str(root / f"{method}-{lr}-{seed}")}
        run_experiment(load_config(PRESET, overrides, [f"optim.lr={lr}"] if lr else []))
    return root


def test_a_learning_rate_sweep_is_two_rows_labelled_by_the_rate(sweep: Path) -> None:
    table = build_table(find_runs([sweep]))
    assert [row.label for row in table.rows] == ["source", "tent · lr=0.001", "tent · lr=0.01"]
    assert [sorted(row.seeds) for row in table.rows] == [[1], [1, 2], [1, 2]]
    for row, lr in zip(table.rows[1:], ("0.001", "0.01")):
        means = [100 * json.loads((sweep / f"tent-{lr}-{seed}" / "results.json").read_text())["summary"]["mean_top1"]
                 for seed in (1, 2)]
        assert row.cell(MEAN) == pytest.approx((statistics.fmean(means), statistics.stdev(means), 2))


def test_report_reads_results_without_torch(sweep: Path) -> None:
    result, imported = heavy_imports("report", str(sweep), "--format", "csv")
    assert result.returncode == 0 and result.stdout == to_csv(build_table(find_runs([sweep]))), result.stderr
    assert imported == []


def test_a_rerun_with_the_same_seed_counts_once_and_partial_runs_say_so(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    shutil.copytree(runs / "tent-0.01-1", runs / "tent-0.01-1-again")  # the same experiment and seed, moved
    partial = runs / "tent-0.001-2" / "results.json"
    results = json.loads(partial.read_text())
    results["tasks"], results["status"] = results["tasks"][:1], "interrupted"
    partial.write_text(json.dumps(results))
    table = build_table(find_runs([runs]))
    assert [len(row.seeds) for row in table.rows] == [1, 2, 2]
    assert table.notes == [f"{runs / 'tent-0.01-1-again'} repeats seed 1 of {runs / 'tent-0.01-1'}: counted once"]
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(to_csv(table)))}
    assert rows["tent · lr=0.001"]["complete"] == "false" and rows["tent · lr=0.01"]["complete"] == "true"
    assert rows["tent · lr=0.001"]["mean_std"] == ""  # the mean is over the one complete run: no std
    assert rows["tent · lr=0.001"]["mean_n"] == "1" and rows["tent · lr=0.01"]["mean_n"] == "2"
    markdown = to_markdown(table)
    assert "| tent · lr=0.001 (partial) | 2 |" in markdown and "counted once" in markdown
    partial_row = next(line for line in markdown.splitlines() if "lr=0.001 (partial)" in line)
    assert partial_row.endswith(" (n=1) |") and "±" not in partial_row.split("|")[-2]  # the mean: one seed, said so


def test_of_two_runs_with_the_same_seed_the_one_with_more_finished_tasks_counts(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    shutil.copytree(runs / "tent-0.01-1", runs / "tent-0.01-1-again")
    stopped = runs / "tent-0.01-1" / "results.json"  # listed first, stopped after one task
    results = json.loads(stopped.read_text())
    stopped.write_text(json.dumps(results | {"tasks": results["tasks"][:1], "status": "stopped"}))
    table = build_table(find_runs([runs]))
    assert table.notes == [f"{runs / 'tent-0.01-1'} repeats seed 1 of {runs / 'tent-0.01-1-again'}: counted once"]
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(to_csv(table)))}
    assert rows["tent · lr=0.01"]["complete"] == "true" and rows["tent · lr=0.01"]["mean_n"] == "2"


def test_a_run_with_no_finished_task_is_left_out_and_a_difference_some_labels_hide_is_noted(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    stopped = runs / "tent-0.01-2" / "results.json"
    results = json.loads(stopped.read_text())
    results["tasks"], results["status"] = [], "stopped"
    stopped.write_text(json.dumps(results))
    for seed in (1, 2):  # tent at lr 0.001 on fog alone: its rows name the corruptions, source's does not
        config = runs / f"tent-0.001-{seed}" / "config.yaml"
        config.write_text(config.read_text().replace("  - gaussian_noise\n", ""))
    table = build_table(find_runs([runs]))
    # Either setting tells the tent rows apart: the label shows one, the legend the other.
    assert [row.label for row in table.rows] == ["source", "tent · corruptions=fog", "tent · corruptions=gaussian_noise,fog"]
    assert [len(row.seeds) for row in table.rows] == [1, 2, 1]
    assert f"{runs / 'tent-0.01-2'} has no finished task: left out" in table.notes
    assert "rows differ in data.corruptions (source: gaussian_noise,fog; the others as labelled)" in table.notes
    assert table.notes[-2:] == ["tent · corruptions=fog: also optim.lr=0.001", "tent · corruptions=gaussian_noise,fog: also optim.lr=0.01"]
    # In a terminal the notes follow the table, wrapped at the terminal's width, not the table's.
    from rich.console import Console

    from dusa_cli.results.report import to_rich

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(to_rich(table, 200))
    lines = console.export_text().rstrip().splitlines()
    table_width = max(len(line.rstrip()) for line in lines[:-len(table.notes)])
    assert len(table.notes[0]) > table_width and lines[-len(table.notes):] == table.notes


def test_labels_cut_short_stay_apart(sweep: Path, tmp_path: Path) -> None:
    long = ["gaussian_noise", "shot_noise", "impulse_noise"]
    for name, last in (("a", "defocus_blur"), ("b", "fog")):  # alike in their first 40 characters
        run = tmp_path / name
        shutil.copytree(sweep / "source-None-1", run)
        config = run / "config.yaml"
        config.write_text(config.read_text().replace("  - gaussian_noise\n", "".join(f"  - {c}\n" for c in long)).replace("  - fog\n", f"  - {last}\n"))
    labels = [row.label for row in build_table(find_runs([tmp_path / "a", tmp_path / "b"])).rows]
    assert labels == [f"source · corruptions={','.join([*long, last])}" for last in ("defocus_blur", "fog")]


def test_labels_name_only_the_settings_that_tell_rows_apart_and_the_legend_the_rest(sweep: Path, tmp_path: Path) -> None:
    """An optimizer switched with its momentum and weight decay: the label names the optimizer
    (a choice before the settings that go with it), the legend the rest; keys by their last part
    unless another key ends alike (optim.name, method.name)."""
    import yaml

    for lr in ("0.001", "0.01"):
        shutil.copytree(sweep / f"tent-{lr}-1", tmp_path / f"adam-{lr}")
    shutil.copytree(sweep / "tent-0.001-1", tmp_path / "sgd")
    config = tmp_path / "sgd" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["optim"] |= {"name": "sgd", "momentum": 0.5, "weight_decay": 0.01}
    config.write_text(yaml.safe_dump(settings))
    table = build_table(find_runs([tmp_path]))
    assert [row.label for row in table.rows] == ["tent · lr=0.001 · optim.name=adam", "tent · lr=0.01 · optim.name=adam", "tent · lr=0.001 · optim.name=sgd"]
    assert table.notes == [
        "tent · lr=0.001 · optim.name=adam: also optim.momentum=0.9, optim.weight_decay=0.0",
        "tent · lr=0.01 · optim.name=adam: also optim.momentum=0.9, optim.weight_decay=0.0",
        "tent · lr=0.001 · optim.name=sgd: also optim.momentum=0.5, optim.weight_decay=0.01",
    ]  # fmt: skip
    markdown = to_markdown(table)  # the legend in the markdown too, under the table
    assert "- tent · lr=0.001 · optim.name=sgd: also optim.momentum=0.5, optim.weight_decay=0.01" in markdown.splitlines()


def test_a_path_given_twice_counts_once(sweep: Path) -> None:
    source = sweep / "source-None-1"
    result = dusa("report", str(source), str(source), "--format", "md")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {source} is given twice: its runs count once"]
    assert "| source | 1 |" in result.stdout and "repeats seed" not in result.stdout
    said: list[str] = []
    runs = find_runs([sweep / "tent-0.01-1", sweep], skip=said.append)  # a run inside a folder given too
    assert len(runs) == 5 and said == [f"{sweep} holds runs given before ({sweep / 'tent-0.01-1'}): each counts once"]


def test_the_table_turns_on_the_figures_widths_not_the_labels(sweep: Path, tmp_path: Path) -> None:
    """Corruptions go down the table only where across does not fit and down is narrower; long
    labels wrap rather than turn the table (they made it turn at about 100 columns)."""
    from rich.console import Console

    from dusa_cli.results.report import to_rich

    def header(width: int, runs: list[Path]) -> str:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(to_rich(build_table(find_runs(runs)), width))
        return console.export_text().splitlines()[2]

    two = [sweep / "source-None-1", sweep / "tent-0.01-1"]
    assert "gaussian_noise" in header(100, two) and "corruption" in header(40, two)
    for name, last in (("a", "defocus_blur"), ("b", "fog")):  # labels of 70 characters
        shutil.copytree(sweep / "source-None-1", tmp_path / name)
        config = tmp_path / name / "config.yaml"
        config.write_text(config.read_text().replace("  - fog\n", f"  - shot_noise\n  - impulse_noise\n  - {last}\n"))
    assert "gaussian_noise" in header(80, [tmp_path / "a", tmp_path / "b"])


def test_a_foreign_results_json_found_below_a_folder_is_skipped_with_a_warning(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(sweep / "source-None-1", runs / "source")
    foreign = runs / "other-tool" / "results.json"
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"accuracy": 0.9}))
    result = dusa("report", str(runs), "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert [row["method"] for row in csv.DictReader(io.StringIO(result.stdout))] == ["source"]
    assert result.stderr.strip() == f"warning: skipped {foreign}: not a dusa results file (dusa-results/1)"
    assert_one_line_error(dusa("report", str(foreign)), 1, "not a dusa results file")  # named: an error
    broken = runs / "broken"
    shutil.copytree(sweep / "source-None-1", broken)
    (broken / "config.yaml").write_text("model: {name: x\n")  # what tells experiments apart cannot be read
    result = dusa("report", str(runs), "--format", "csv")
    assert result.returncode == 0 and [row["method"] for row in csv.DictReader(io.StringIO(result.stdout))] == ["source"]
    assert f"warning: skipped {broken / 'config.yaml'} is unreadable (expected ',' or '}}', but got '<stream end>')" in result.stderr.splitlines()
    shutil.rmtree(broken)
    nothing = dusa("report", str(foreign.parent))
    assert nothing.returncode == 1 and nothing.stderr.splitlines() == [
        f"warning: skipped {foreign}: not a dusa results file (dusa-results/1)",
        f"error: no dusa results.json found under {foreign.parent}",
    ]


@pytest.mark.parametrize(("damage", "problem"), [
    ({"tasks": [{"corruption": "fog", "severity": 5, "top1": "high"}]}, "damaged tasks (fog/5: top1 is \"high\")"),
    ({"tasks": [{"top1": 0.5}]}, 'damaged tasks (a record without its corruption and severity: {"top1": 0.5})'),
    ({"tasks": [["fog", 5]]}, "damaged tasks (a record is a list, not a mapping)"),
    ({"planned_tasks": None}, "damaged planned_tasks (not a list)"),
    ({"format": "dusa-results/0"}, "not a dusa results file (dusa-results/1)"),  # a format this version cannot read
])  # fmt: skip
def test_a_damaged_task_record_skips_its_run(sweep: Path, tmp_path: Path, damage: dict, problem: str) -> None:
    """Edited by hand or cut short: said in one line, where `report` would fail on a key."""
    runs = tmp_path / "runs"
    shutil.copytree(sweep / "source-None-1", runs / "source")
    shutil.copytree(sweep / "source-None-1", runs / "damaged")
    file = runs / "damaged" / "results.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | damage))
    skipped: list[str] = []
    assert [run["path"] for run in find_runs([runs], skip=skipped.append)] == [str(runs / "source")]
    assert skipped == [f"skipped {file}: {problem}"]


def test_rows_that_do_not_measure_the_same_thing_say_so(sweep: Path, digits_c: Path, tmp_path: Path) -> None:
    overrides = {"data.root": str(digits_c), "data.corruptions": ["gaussian_noise", "fog"], "data.batch_size": 16,
                 "data.num_ex": 20, "method.name": "norm", "run.seed": 1, "run.output": str(tmp_path / "norm")}
    run_experiment(load_config(PRESET, overrides))
    table = build_table(find_runs([sweep / "source-None-1", tmp_path / "norm"]))
    assert [row.label for row in table.rows] == ["source", "norm"]  # labels name a method's own variations only
    assert table.notes == ["rows differ in data.num_ex (source: None; norm: 20)"]


def test_top5_and_top20_tables_read_those_scores_and_an_older_record_without_one_says_so(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    for metric in ("top5", "top20"):
        table = build_table(find_runs([runs / "source-None-1"]), metric)
        tasks = json.loads((runs / "source-None-1" / "results.json").read_text())["tasks"]
        assert table.title.startswith(f"online top-{metric[3:]} accuracy")
        assert [table.rows[0].cell(t["corruption"])[0] for t in tasks] == pytest.approx([100 * t[metric] for t in tasks])
    older = runs / "tent-0.01-1" / "results.json"
    results = json.loads(older.read_text())
    for task in results["tasks"]:
        del task["top20"]
    older.write_text(json.dumps(results))
    assert build_table(find_runs([runs]), "acc").rows  # the other scores still report
    assert_one_line_error(dusa("report", str(runs), "--metric", "top20"), 1,
                          f"{older.parent} records no top20 (written by an older dusa); pick another --metric")


def test_markdown_cells_cannot_break_the_table() -> None:
    """A `|` in a cell would start a new column and a line break a new row: escaped and joined."""
    from dusa_cli.results.markdown import pipe_table

    table = pipe_table("figures", ["recipe", "img/s"], [["official|fast", "1.5\n(eager)"]], right=[False, True], below=["ratio"])
    assert table == "**figures**\n\n| recipe | img/s |\n|---|---:|\n| official\\|fast | 1.5 (eager) |\n\nratio\n"


def test_several_severities_are_averaged_per_corruption_and_the_title_says_so(sweep: Path, tmp_path: Path) -> None:
    run = tmp_path / "source"
    shutil.copytree(sweep / "source-None-1", run)
    results = json.loads((run / "results.json").read_text())
    severe = results["tasks"]  # severity 5
    milder = [task | {"severity": 1, "top1": task["top1"] / 2} for task in severe]
    results["tasks"] = severe + milder
    results["planned_tasks"] += [{"corruption": task["corruption"], "severity": 1} for task in milder]
    (run / "results.json").write_text(json.dumps(results))
    table = build_table(find_runs([run]))
    assert table.title == "online accuracy (%), mean over severities 1, 5"
    for task in severe:
        assert table.rows[0].cell(task["corruption"])[0] == pytest.approx(100 * (task["top1"] + task["top1"] / 2) / 2)
    assert build_table(find_runs([sweep / "source-None-1"])).title == "online accuracy (%), severity 5"
