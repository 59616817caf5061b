"""The `dusa` command through a subprocess: runs, reports, exit codes and one-line errors."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import dusa_cli

from helpers import assert_one_line_error, assert_one_line_errors, dusa, dusa_each, heavy_imports

PRESET = str(Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml")


@pytest.fixture(scope="module")
def runs(digits_c: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """source and tent, each over two seeds, through the real CLI."""
    from dusa_cli.data.files import usable_cores

    root = tmp_path_factory.mktemp("runs")
    workers = usable_cores() + 1  # one run with more data workers than cores: a warning, not results
    crowded = ("source", "2")
    runs = [(method, seed) for method in ("source", "tent") for seed in ("1", "2")]
    results = dusa_each(*(
        ("baseline", "-c", PRESET, "--method", method, "--data", str(digits_c), "--corruption", "gaussian_noise,fog",
         "--seed", seed, "--output", str(root / f"{method}-{seed}"), "-q",
         *(["--set", f"data.num_workers={workers}"] if (method, seed) == crowded else []))
        for method, seed in runs
    ))  # fmt: skip
    for (method, seed), result in zip(runs, results):
        assert result.returncode == 0, result.stderr
        assert "gaussian_noise" in result.stdout  # the run's own table
        warned = f"warning: data.num_workers={workers} is more than the {usable_cores()} CPU cores this process may use"
        assert [line for line in result.stderr.splitlines() if "warning" in line] == ([warned] if (method, seed) == crowded else [])
    return root


def test_report_formats_pool_seeds(runs: Path) -> None:
    table = dusa("report", str(runs))
    assert table.returncode == 0 and "source" in table.stdout and "tent" in table.stdout
    assert_one_line_error(dusa("report", str(runs), "--metric", "miou"), 2, "--metric miou scores task seg, but")
    errors = dusa("report", str(runs), "--format", "csv", "--metric", "err").stdout
    assert "\r" not in errors  # plain text lines
    rows = list(csv.DictReader(io.StringIO(errors)))
    assert [r["method"] for r in rows] == ["source", "tent"] and {r["seeds"] for r in rows} == {"2"}
    assert {r["fog_n"] for r in rows} == {r["mean_n"] for r in rows} == {"2"}  # seeds behind each cell
    runs_by_method: dict[str, list[float]] = {}
    for path in runs.glob("*/results.json"):
        results = json.loads(path.read_text())
        runs_by_method.setdefault(results["method"], []).append(100 * results["summary"]["mean_error"])
    for row in rows:
        values = runs_by_method[row["method"]]
        assert float(row["mean"]) == pytest.approx(sum(values) / 2, abs=1e-3)
        assert float(row["mean_std"]) == pytest.approx(float(torch.tensor(values).std()), abs=1e-3)
    narrow = dusa("report", str(runs), columns=50).stdout  # too narrow for 4 columns: transposed
    assert any(line.startswith("│ gaussian_noise") for line in narrow.splitlines())
    assert "corruption" in narrow and max(len(line) for line in narrow.splitlines()) <= 50
    markdown = dusa("report", str(runs / "tent-1"), "--format", "md").stdout
    assert markdown.splitlines()[2].startswith("| method | seeds | gaussian_noise | fog | mean |")


def test_resume_of_a_finished_run_and_refusal_to_overwrite(runs: Path, digits_c: Path) -> None:
    args = ("baseline", "-c", PRESET, "--method", "source", "--data", str(digits_c),
            "--corruption", "gaussian_noise,fog", "--seed", "1", "--output", str(runs / "source-1"), "-q")
    assert_one_line_error(dusa(*args), 1, "holds a complete run of this config: nothing is left to run")
    assert dusa(*args, "--resume").returncode == 0
    # Profiling may change on --resume; here no task is left to profile, and --set turns --profile off.
    assert "profile: nothing recorded" in dusa(*args, "--resume", "--profile").stderr
    assert "profile" not in dusa(*args, "--resume", "--set", "run.profile=false").stderr
    assert "profile: false" in (runs / "source-1" / "config.yaml").read_text()
    printed = dusa("baseline", "--resume", "-o", str(runs / "source-1"), "--print-config")  # what a resume would run
    assert printed.returncode == 0 and printed.stdout == (runs / "source-1" / "config.yaml").read_text(), printed.stderr


def test_print_config_shows_every_key_runs_nothing_and_replays(tmp_path: Path) -> None:
    args = ("adapt-cls", "-c", str(Path(PRESET).with_name("dusa_digits.yaml")), "--seed", "3", "--set", "optim.lr=0.01",
            "--data", str(tmp_path / "not-built"), "-o", str(tmp_path / "run"), "--gpus", "0,1")
    printed = dusa(*args, "--print-config")
    assert printed.returncode == 0 and printed.stderr == "", printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert (config["run"]["seed"], config["optim"]["lr"], config["method"]["name"]) == (3, 0.01, "dusa")
    assert config["method"]["loss_weights"]["mse"] == 1.0 and config["optim"]["accumulation"] == 1  # keys the preset leaves at their defaults
    assert not any(tmp_path.iterdir())  # no output, no data read, no process per GPU
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    assert dusa("adapt-cls", "-c", str(tmp_path / "printed.yaml"), "--print-config").stdout == printed.stdout
    assert_one_line_error(dusa(*args, "--set", "optim.lrr=1", "--print-config"), 2, "optim.lrr: unknown key, did you mean 'optim.lr'?")


def test_bad_inputs_end_in_one_line(tmp_path: Path, digits_c: Path) -> None:
    outputs = [tmp_path / f"out{index}" for index in range(12)]
    out = iter(str(path) for path in outputs)  # one each: the commands run side by side
    (tmp_path / "file").write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x\n")
    weights = Path(dusa_cli.__file__).parent / "assets" / "sit_digits.safetensors"
    untrained = ("--model", "convnext_atto", "--set", "model.pretrained=false", "--data", str(digits_c), "--corruption", "fog")
    not_weights = ("--data", str(digits_c), "--corruption", "fog", "--checkpoint", str(bad))
    assert_one_line_errors(
        (("baseline", "-c", PRESET, "--data", str(tmp_path / "none"), "-o", next(out)), 1, f"not found: data.root {tmp_path / 'none'} ("),
        (("baseline", "-c", PRESET, "--corruption", "fgo", "-o", next(out)), 2, "unknown corruption 'fgo'"),
        (("baseline", "-c", PRESET, "--model", "resnet5", "--data", str(digits_c), "--corruption", "fog", "-o", next(out)), 2, "unknown timm model 'resnet5' (similar: resnet50, "),
        (("baseline", "-c", PRESET, "--model", "dusa_digits_resnet.sklearn_digit", "--data", str(digits_c), "--corruption", "fog", "-o", next(out)), 2,
         "dusa_digits_resnet has no weights tagged 'sklearn_digit', did you mean 'sklearn_digits'? (its tags: sklearn_digits)"),
        (("baseline", "-c", PRESET, "--model", "segformer", "--data", str(digits_c), "--corruption", "fog", "-o", next(out)), 2, "'segformer' is a segmentation model: run it with task seg"),
        # A preset of the other task: its method has no --prior, but the task is what is wrong.
        (("adapt-seg", "-c", PRESET, "--prior", "sd3", "-o", next(out)), 2, "`dusa adapt-seg` runs task seg, but the config's task is cls"),
        (("pretrain", "digits-classifier", "--data", str(digits_c), "-o", str(tmp_path / "w.pth")), 2, "must end in .safetensors"),
        (("prepare-data", "imagenet-c", "--source", str(digits_c), "-o", next(out), "--force"), 2, "--force has no effect on imagenet-c"),
        (("prepare-data", "digits-c", "--source", str(digits_c), "-o", next(out)), 2, "--source is for imagenet-c and ade20k-c"),
        (("baseline", "-c", PRESET, "--set", "optim.lrr=1", "-o", next(out)), 2, "optim.lrr: unknown key"),
        (("baseline", "-c", PRESET, *untrained, "-o", next(out)), 2, "'convnext_atto' has no weights: pass --checkpoint"),
        (("baseline", "-c", PRESET, "--data", str(digits_c), "--corruption", "fog", "-o", str(tmp_path / "file" / "run")), 1, f"cannot write {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file"),
        (("prepare-data", "digits-c", "-o", str(tmp_path / "file" / "digits"), "-q"), 1, f"cannot write {tmp_path / 'file' / 'digits'}: {tmp_path / 'file'} is a file"),
        (("prepare-data", "digits-c", "-o", str(tmp_path / "file"), "-q"), 1, f"cannot write {tmp_path / 'file'}: it is a file"),
        (("baseline", "-c", str(tmp_path / "[/odd].yaml")), 2, "[/odd].yaml"),  # rich markup characters in a message stay text
        (("baseline", "-c", str(bad)), 2, "invalid YAML"),
        (("baseline", "-c", str(weights)), 2, "not a YAML file (not UTF-8 text)"),
        (("baseline", "--data", str(digits_c)), 2, "model.name is required (--model); method.name is required (--method); or start from a preset: -c configs/cls/digits.yaml"),
        (("baseline", "-c", PRESET, "--set", "optim=3"), 2, "optim: expected a section (a mapping of its keys), got 3"),
        (("baseline", "-c", PRESET, "--set", "data.corruptions=[fog"), 2, "--set data.corruptions=[fog: invalid YAML"),
        (("baseline", "-c", PRESET, *not_weights, "-o", next(out)), 1, "not a torch or safetensors file"),
        (("baseline", "-c", PRESET, *not_weights[:-1], str(tmp_path), "-o", next(out)), 1, f"checkpoint {tmp_path} is a folder: name the weights file in it"),
        # Usage errors from the parser: one line too, not Typer's boxed panel.
        (("baseline", "--foo"), 2, "No such option: --foo (see 'dusa baseline --help')"),
        (("bench", "cls", "--variant"), 2, "Option '--variant' requires an argument. (see 'dusa bench cls --help')"),  # exit 1 before
        (("baseline", "--setting", "weekly"), 2, "Invalid value for '--setting': 'weekly' is not one of"),
        (("report",), 2, "Missing argument 'DIR'."),
        (("nope",), 2, "No such command 'nope'. (see 'dusa --help')"),
        (("bench", "seg", "--tiny", "--gpus", ""), 2, "--gpus takes a comma list of GPU indices (or cpu), got ''"),
        (("baseline", "-c", PRESET, "-o", ""), 2, "'--output' / '-o': expected a path, got an empty string"),  # -o "$UNSET"
    )
    assert next(out, None) is None and not any(path.exists() for path in outputs)


def test_a_run_without_a_preset_says_its_recipe_is_the_built_in_defaults(tmp_path: Path, digits_c: Path) -> None:
    args = ["baseline", "--model", "dusa_digits_resnet.sklearn_digits", "--set", "model.pretrained=true",
            "--data", str(digits_c), "--corruption", "fog", "--num-ex", "8", "-q"]  # fmt: skip
    result, chosen, untrained = dusa_each(
        (*args, "--method", "tent", "-o", str(tmp_path / "defaults")),
        (*args, "--method", "tent", "--set", "optim.lr=1e-4", "-o", str(tmp_path / "chosen")),  # a recipe of one's own: nothing to say
        (*args, "--method", "source", "-o", str(tmp_path / "source")),  # no optimizer, no recipe to miss
    )
    assert result.returncode == 0, result.stderr
    warned = "warning: no --config: built-in defaults (optim adam lr 0.001, run.precision fp32), not a paper's recipe"
    assert [line for line in result.stderr.splitlines() if line.startswith("warning")] == [f"{warned} (presets in configs/cls and configs/seg)"]
    assert chosen.returncode == 0 and "warning" not in chosen.stderr
    assert untrained.returncode == 0 and "warning" not in untrained.stderr


def test_a_subset_larger_than_a_task_is_said_once(tmp_path: Path, digits_c: Path) -> None:
    result = dusa("baseline", "-c", PRESET, "--method", "source", "--data", str(digits_c), "--corruption", "gaussian_noise,fog", "--num-ex", "100000",
                  "-o", str(tmp_path / "out"), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    warned = "warning: data.num_ex=100000 is more than the images of gaussian_noise/5 (40 images), fog/5 (40 images): each of them runs whole"
    assert [line for line in result.stderr.splitlines() if line.startswith("warning")] == [warned]
    assert [task["num_samples"] for task in json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]] == [40, 40]


def test_a_data_worker_error_is_one_line_too(tmp_path: Path, digits_c: Path) -> None:
    import shutil

    root = tmp_path / "digits-c"
    shutil.copytree(digits_c / "fog", root / "fog")
    broken = sorted((root / "fog" / "5").rglob("*.png"))[3]
    broken.write_bytes(b"not an image")
    args = ["baseline", "-c", PRESET, "--data", str(root), "--corruption", "fog", "-o", str(tmp_path / "out"), "-q"]
    result = dusa(*args, "--set", "data.num_workers=1")
    assert_one_line_error(result, 1, f"cannot read image {broken}")


def test_checkpoint_that_does_not_fit_is_reported(tmp_path: Path, digits_c: Path) -> None:
    import timm

    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": timm.create_model("resnet10t", num_classes=10).state_dict()}, wrong)
    result = dusa("baseline", "-c", PRESET, "--data", str(digits_c), "--corruption", "fog", "--checkpoint", str(wrong), "-o", str(tmp_path / "o"))
    assert_one_line_error(result, 1, "does not fit")
    assert "missing from the file: " in result.stderr and "not in the model: " in result.stderr
    debug = dusa("baseline", "-c", PRESET, "--data", str(digits_c), "--corruption", "fog", "--checkpoint", str(wrong), "-o", str(tmp_path / "o"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug adds the traceback, keeps the code
    assert debug.stderr.splitlines()[-1].startswith("error: checkpoint") and "does not fit" in debug.stderr
    usage = dusa("--debug", "baseline", "-c", PRESET, "--set", "optim.lrr=1")
    assert usage.returncode == 2 and "Traceback" in usage.stderr and "optim.lrr: unknown key" in usage.stderr


def test_a_matching_checkpoint_loads_through_wrappers(tmp_path: Path, digits_c: Path) -> None:
    from dusa_cli.models.digits_resnet import digits_weights_path
    from safetensors.torch import load_file

    wrapped = tmp_path / "wrapped.pth"
    state = {f"module.{k}": v for k, v in load_file(digits_weights_path()).items()}
    torch.save({"model": state, "epoch": 3}, wrapped)
    result = dusa("baseline", "-c", PRESET, "--method", "source", "--data", str(digits_c), "--checkpoint", str(wrapped),
                  "--set", "model.pretrained=false", "--corruption", "fog", "--num-ex", "7", "-o", str(tmp_path / "o"), "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tasks"][0]["num_samples"] == 7


def test_prepare_data_and_pretrain_commands(tmp_path: Path) -> None:
    data = tmp_path / "digits"
    result = dusa("prepare-data", "digits-c", "-o", str(data), "--corruption", "saturate", "--severity", "2",
                  "--limit-per-class", "1", "--workers", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert len(list((data / "saturate" / "2").rglob("*.png"))) == 10
    weights = tmp_path / "w.safetensors"
    result = dusa("pretrain", "digits-classifier", "--data", str(data), "-o", str(weights), "--epochs", "2", "-q")
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stderr.split("accuracy ")[1].split("%")[0])
    assert accuracy > 20  # two epochs are far above chance (10 %) on real digits
    from dusa_cli.models.checkpoint import load_strict, read_state_dict
    from dusa_cli.models.digits_resnet import dusa_digits_resnet

    load_strict(dusa_digits_resnet(), read_state_dict(weights), "trained weights")
    assert_one_line_errors(
        *((("pretrain", command, "--data", str(data), "-o", str(weights)), 1, f"{weights} exists; pass --overwrite to replace it")
          for command in ("digits-classifier", "digits-prior")),  # trained weights are not replaced unasked
        (("pretrain", "digits-classifier", "--data", str(data), "-o", str(data)), 1, f"cannot write {data}: it is a directory"),
        (("prepare-data", "imagenet-c", "-o", str(tmp_path / "inc")), 2, "--source"),
    )  # fmt: skip


def test_what_the_command_line_got_wrong_is_said_as_such(tmp_path: Path, digits_c: Path) -> None:
    """A flag that makes the preset wrong is named beside it; a bad number says what it takes; a
    mistyped method is answered from the methods the command runs (the registry's); tasks that
    the data lacks are named together, before the model is built (its weights, here no weights,
    would fail first otherwise)."""
    from dusa_cli.methods import available_methods, get_method

    runs_without_prior = ", ".join(m for m in available_methods() if not get_method(m).uses_prior and "cls" in get_method(m).tasks)
    not_weights = tmp_path / "weights.pth"
    not_weights.write_text("not weights")
    partial = ("--data", str(digits_c), "--corruption", "fog,snow,frost", "--severity", "3", "--severity", "5", "--checkpoint", str(not_weights))
    assert_one_line_errors(
        (("baseline", "-c", PRESET, "--task", "seg"), 2, f"error: {PRESET} with --task seg: data.batch_size: Input should be 1"),
        (("baseline", "-c", PRESET, "--set", "data.num_ex=yes"), 2, "command line: data.num_ex: expected an integer, got the boolean true"),
        (("baseline", "-c", PRESET, "--seed", "-1"), 2, "command line (--seed -1): run.seed: Input should be greater than or equal to 0"),
        (("baseline", "-c", PRESET, "--method", "sourc"), 2, f"unknown method 'sourc', did you mean 'source'? (available: {runs_without_prior})"),
        (("baseline", "-c", PRESET, *partial, "-o", str(tmp_path / "out")), 1,
         f"no data in {digits_c} for 3 of the 3 corruptions: fog/3, snow/{{3,5}}, frost/{{3,5}} (expected ImageNet-C's"),
    )  # fmt: skip
    assert "dusa" not in runs_without_prior.split(", ") and not (tmp_path / "out").exists()


def test_progress_shows_no_score_before_a_task_has_scored_an_image() -> None:
    """`acc 0.0%` on a bar whose first batch is still running (minutes, compiling) would read as
    a result: the score and the speed show – until there is one."""
    from rich.console import Console

    from dusa_cli.ui import TaskProgress

    def shown(bars: TaskProgress) -> str:
        console = Console(width=150, record=True, file=io.StringIO())
        console.print(bars.progress.make_tasks_table(bars.progress.tasks))
        return console.export_text()

    with TaskProgress(score="acc") as bars:
        bars.start_task("fog/5", 64)
        assert "acc      –      – img/s" in shown(bars) and "%" not in shown(bars)
        bars.advance(16, lambda: 0.8125)
        assert "acc  81.2%" in shown(bars)
        bars.end_task(0.75)  # the task's score over every process
        assert "acc  75.0%" in shown(bars)


def test_help_and_version() -> None:
    assert "prepare-data" in dusa("--help").stdout
    bare = dusa()  # the help, as a usage error
    assert bare.returncode == 2 and "prepare-data" in bare.stdout + bare.stderr
    assert dusa("--version").stdout.startswith("dusa ")


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [(("--help",), 0, "prepare-data"), (("adapt-cls", "--help"), 0, "--corruption"),
     (("baseline", "-c", "no-such-preset.yaml"), 2, "error: config file not found: no-such-preset.yaml")],
)  # fmt: skip
def test_help_and_a_missing_preset_load_no_torch(args: tuple[str, ...], code: int, said: str) -> None:
    """torch takes a second to import: what needs no model answers without it (checking a
    config's model name needs timm, so other config errors take that second)."""
    result, imported = heavy_imports(*args)
    assert result.returncode == code and said in result.stdout + result.stderr, result.stderr
    assert imported == []


def test_a_classifier_released_under_its_authors_layer_names_loads(tmp_path: Path) -> None:
    """FB's ConvNeXt files (the official recipe's convnext_large_1k_224_ema.pth) name layers
    their own way; timm's family filter maps them, so the file loads as it was downloaded."""
    import re

    from dusa_cli.config.schema import ModelConfig
    from dusa_cli.models.classifier import create_classifier

    torch.manual_seed(0)
    timm_state = create_classifier(ModelConfig(name="convnext_atto", num_classes=10)).backbone.state_dict()
    renames = [  # timm → FB, the inverse of timm.models.convnext.checkpoint_filter_fn
        (r"^stem\.", "downsample_layers.0."), (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
        (r"^stages\.(\d+)\.blocks\.", r"stages.\1."), (r"conv_dw", "dwconv"), (r"mlp\.fc", "pwconv"),
        (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head."),
    ]  # fmt: skip
    released = {}
    for key, value in timm_state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        released[key] = value.flatten(1) if "pwconv" in key and value.ndim == 4 else value  # FB's MLPs are Linear
    assert "downsample_layers.0.0.weight" in released and "stages.0.0.dwconv.weight" in released
    path = tmp_path / "convnext_atto_1k_ema.pth"
    torch.save({"model": released}, path)
    loaded = create_classifier(ModelConfig(name="convnext_atto", num_classes=10, checkpoint=path)).backbone.state_dict()
    assert loaded.keys() == timm_state.keys()
    assert all(torch.equal(loaded[key], timm_state[key]) for key in timm_state)


def test_each_run_command_s_help_speaks_of_what_it_runs() -> None:
    """Options shared by the commands are worded for each one's task and networks."""
    baseline, cls, seg, bench = dusa_each(("baseline", "--help"), ("adapt-cls", "--help"), ("adapt-seg", "--help"), ("bench", "cls", "--help"), columns=250)
    compile_line = next(line for line in baseline.stdout.splitlines() if "--compile" in line)
    assert "(model)" in compile_line and "prior" not in compile_line  # a baseline has no prior
    assert "segformer" not in cls.stdout.lower() and "configs/seg" not in cls.stdout and "configs/cls" in cls.stdout
    assert "'extra'" not in seg.stdout and "all19" not in seg.stdout and "configs/cls" not in seg.stdout and "ADE20K-C's 15" in seg.stdout
    assert "issue" not in bench.stdout  # no internal references


def test_every_option_names_what_it_takes() -> None:
    """Help shows a value's meaning (N, NAME, KEY=VALUE, DIR, …) or its choices (a|b, as our own
    metavars; Typer would write <a|b>), never a bare type such as <str>, <list[int]> or
    <list[Path]>; a flag, --help too, shows nothing: it takes no value (Typer would show <bool>).
    A docstring's paragraph is one paragraph, wrapped by the terminal alone."""
    import re

    from dusa_cli.cli import command

    def paths(command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        children = getattr(command, "commands", {})
        return [path, *(p for name, child in children.items() for p in paths(child, (*path, name)))]

    commands = paths(command())
    assert ("bench", "cls") in commands and ("prepare-data",) in commands
    bare_type = re.compile(r"<(str|int|float|path|bool)( range)?>|<list\[[^]]*\]>|<[\w-]+(\|[\w-]+)+>")
    for path, shown in zip(commands, dusa_each(*((*path, "--help") for path in commands), columns=250)):
        assert shown.returncode == 0, (path, shown.stderr)
        assert not bare_type.findall(shown.stdout), (path, bare_type.findall(shown.stdout))
        assert re.search(r"--help +-h +Show this message", shown.stdout), path  # nothing between: no <bool>
    report = next(shown for path, shown in zip(commands, dusa_each(("report", "--help"), columns=250)))
    assert re.search(r"\* +DIR +DIR\.\.\. +Run directories", report.stdout)
    assert "(device, compile, workers, output) are seeds" in report.stdout  # one line at 250 columns
    assert re.search(r"--format +-f +table\|md\|csv ", report.stdout)
    narrow = dusa("adapt-cls", "--help", columns=80).stdout  # a key longer than the help column: folded, not cut
    assert not re.findall(r"\w…", narrow) and "kpoint" in narrow
    # In an 80-column terminal the help text keeps room: a long choice list as metavar
    # (reset_each_shift|continual) and a --no-profile column had squeezed adapt-cls's to 16 columns.
    for path, shown in zip(commands, dusa_each(*((*path, "--help") for path in commands), columns=80)):
        line = next(line for line in shown.stdout.splitlines() if "Show this message" in line)
        assert line.rindex("│") - line.index("Show this message") >= 28, (path, line)


def test_defaults_and_a_resume_with_nothing_to_resume_are_one_line_errors(tmp_path: Path) -> None:
    """pretrain's default --data (data/digits-c, a Path default through the path parser) crashed
    with an AttributeError; --resume with no run at -o said every key was missing."""
    assert_one_line_error(dusa("pretrain", "digits-classifier", "-o", "w.safetensors", cwd=tmp_path), 1,
                          "data directory not found: data/digits-c (`dusa prepare-data` builds")
    assert_one_line_error(dusa("adapt-cls", "--resume", "-o", "nowhere", cwd=tmp_path), 2,
                          "--resume: nowhere holds no run (no config.yaml); name the run's directory with -o")
    assert not any(tmp_path.iterdir())
