"""The online loop on real digits-C files: metrics, determinism, resets, resume, output safety."""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import optimizer_steps

from dusa_cli.config.loader import load_config
from dusa_cli.engine.classification import OnlineMetrics
from dusa_cli.engine.loop import run_experiment
from dusa_cli.errors import DusaError
from dusa_cli.models.classifier import create_classifier

PRESET = Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml"


def config_for(digits_c: Path, output: Path, method: str = "tent", **extra):
    overrides = {
        "data.root": str(digits_c),
        "data.corruptions": ["gaussian_noise", "fog"],
        "data.batch_size": 16,
        "run.output": str(output),
        "method.name": method,
    } | extra
    return load_config(PRESET, overrides)


def test_records_match_an_independent_evaluation(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", method="source")
    results = run_experiment(config).results
    assert results["status"] == "complete"
    assert [t["corruption"] for t in results["tasks"]] == ["gaussian_noise", "fog"]
    from dusa_cli.data.datasets import open_task

    for task in results["tasks"]:  # the online curve ends where the task's totals are
        curve = task["curve"]
        assert curve["images"] == [16, 32, 40] and curve["online_top1"][-1] == pytest.approx(task["top1"])
        assert "loss" not in curve  # the source model has no loss
    model = create_classifier(config.model).eval()
    for task in results["tasks"]:
        dataset = open_task(digits_c, task["corruption"], 5)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        with torch.no_grad():
            logits = model(images)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        assert task["num_samples"] == len(dataset) == 40
        assert task["top1"] == pytest.approx(accuracy)
        assert task["error"] == pytest.approx(1 - accuracy)
        assert task["top5"] == pytest.approx((logits.topk(5).indices == labels[:, None]).any(1).float().mean().item())
        assert task["top20"] == 1.0  # 10 classes
        assert task["images_per_s"] == pytest.approx(task["num_samples"] / task["wall_time_s"]) and task["peak_memory_gib"] > 0
    summary, tasks = results["summary"], results["tasks"]  # images over time, not a mean of rates
    assert summary["num_samples"] == 80 and summary["wall_time_s"] == pytest.approx(sum(t["wall_time_s"] for t in tasks))
    assert summary["images_per_s"] == pytest.approx(80 / summary["wall_time_s"])
    assert summary["peak_memory_gib"] == max(t["peak_memory_gib"] for t in tasks)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == results
    assert (tmp_path / "run" / "config.yaml").is_file()
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["packages"]["torch"] and environment["device"] == "cpu"


def test_a_tent_run_scores_each_batch_before_it_adapts_on_it(digits_c: Path, tmp_path: Path) -> None:
    # A large step (Adam lr 1) changes the predictions: scored after it, the accuracy is 5 %, not 25 %.
    config = config_for(digits_c, tmp_path / "run", **{"data.corruptions": ["fog"], "data.shuffle": False, "optim.lr": 1.0})
    (task,) = run_experiment(config).results["tasks"]
    # By hand, in the file order: predict a micro-batch, then step on it, as the adapter does.
    from dusa_cli.data.datasets import open_task
    from dusa_cli.engine.adapter import OnlineAdapter
    from dusa_cli.methods import get_method

    method = get_method("tent")(create_classifier(config.model), config.method)
    adapter = OnlineAdapter(method, config.optim, config.run.precision, torch.device("cpu"))
    dataset = open_task(digits_c, "fog", 5)
    hits = 0
    for start in range(0, len(dataset), 16):
        items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
        images = torch.stack([image for image, _ in items]).float() / 255
        hits += int((adapter.step(images).logits.argmax(1) == torch.tensor([label for _, label in items])).sum())
    assert task["top1"] == hits / len(dataset) and hits > 0


def test_a_tasks_last_partial_accumulation_is_applied_at_its_end(digits_c: Path, tmp_path: Path) -> None:
    # 40 images in micro-batches of 16 make 3 per task: accumulation 2 steps after the second, and
    # the third's gradient is applied when the task ends (the official code lets it leak, §1.7).
    with optimizer_steps() as steps:
        run_experiment(config_for(digits_c, tmp_path / "run", **{"optim.accumulation": 2}))
    assert len(steps) == 2 * 2  # per task, for its two tasks


def test_same_seed_same_run_and_seed_matters(digits_c: Path, tmp_path: Path) -> None:
    first = run_experiment(config_for(digits_c, tmp_path / "a")).results["tasks"]
    second = run_experiment(config_for(digits_c, tmp_path / "b")).results["tasks"]
    assert [(t["top1"], t["mean_loss"]) for t in first] == [(t["top1"], t["mean_loss"]) for t in second]
    other = run_experiment(config_for(digits_c, tmp_path / "c", **{"run.seed": 1})).results["tasks"]
    assert [t["mean_loss"] for t in other] != [t["mean_loss"] for t in first]


def test_num_ex_picks_the_same_images_for_every_seed(digits_c: Path, tmp_path: Path) -> None:
    """Seeds vary the adaptation, not the sample: the unadapted model scores the same on each."""
    scores = [
        [task["top1"] for task in run_experiment(config_for(digits_c, tmp_path / str(seed), "source", **{"run.seed": seed, "data.num_ex": 25})).results["tasks"]]
        for seed in (1, 2)
    ]  # fmt: skip
    assert scores[0] == scores[1]


def test_a_diverged_run_says_so_and_writes_standard_json(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", **{"optim.lr": 1e30, "data.corruptions": ["fog"]})
    with pytest.warns(UserWarning, match="fog/5: the loss became nan"):
        run_experiment(config)
    text = (tmp_path / "run" / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["tasks"][0]["mean_loss"] is None


def test_resume_where_there_is_no_run_says_it_starts_from_the_first_task(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "typo", "source", **{"data.corruptions": ["fog"]})
    expected = f"--resume: nothing to resume in {tmp_path / 'typo'} \\(no results.json\\); the run starts from its first task"
    with pytest.warns(UserWarning, match=expected):
        assert run_experiment(config, resume=True).results["status"] == "complete"


def test_resume_of_a_damaged_results_file_says_what_to_do(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", "source", **{"data.corruptions": ["fog"], "data.num_ex": 16})
    run_experiment(config)
    results = tmp_path / "run" / "results.json"
    results.write_text(results.read_text()[:100])  # cut short (by hand: runs write it atomically)
    with pytest.raises(DusaError, match=f"^cannot resume: unreadable results file {results}: .*; move it away to run every task afresh$"):
        run_experiment(config, resume=True)
    results.write_text("[1, 2]")
    with pytest.raises(DusaError, match="^cannot resume: .*: not a dusa results file"):
        run_experiment(config, resume=True)
    saved = tmp_path / "run" / "config.yaml"
    for damage, problem in (("model: {name: x\n", "expected ',' or '}', but got '<stream end>'"), ("", "not a mapping of sections")):
        saved.write_text(damage)
        with pytest.raises(DusaError, match=re.escape(f"cannot resume: {saved} is unreadable ({problem}); move the folder away")):
            run_experiment(config, resume=True)


def test_the_environment_records_the_input_files_by_sha256(digits_c: Path, tmp_path: Path) -> None:
    import hashlib

    from dusa_cli.models.digits_resnet import digits_weights_path

    weights = Path(digits_weights_path())
    overrides = {"data.corruptions": ["fog"], "model.checkpoint": str(weights), "model.pretrained": False}
    run_experiment(config_for(digits_c, tmp_path / "run", "source", **overrides))
    inputs = json.loads((tmp_path / "run" / "environment.json").read_text())["inputs"]
    assert inputs["model.checkpoint"] == {"path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    manifest = digits_c / "manifest.json"
    assert inputs["data.root/manifest.json"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()


def test_every_missing_input_is_named_at_once_before_anything_is_written(tmp_path: Path) -> None:
    dusa = Path(__file__).parents[1] / "configs" / "cls" / "dusa_digits.yaml"
    missing = {"model.checkpoint": tmp_path / "resnet.pth", "data.root": tmp_path / "digits-c", "method.prior_checkpoint": tmp_path / "sit.pt"}
    config = load_config(dusa, {key: str(path) for key, path in missing.items()} | {"run.output": str(tmp_path / "run")})
    with pytest.raises(DusaError) as error:
        run_experiment(config)
    named = ", ".join(f"{key} {path}" for key, path in missing.items())
    assert str(error.value) == f"not found: {named} (`dusa prepare-data` builds digits-c, ImageNet-C and ADE20K-C)"
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_weights_under_the_same_path_and_says_rebuilt_data(digits_c: Path, tmp_path: Path) -> None:
    from dusa_cli.models.digits_resnet import digits_weights_path

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "weights.safetensors"
    shutil.copy(digits_weights_path(), weights)
    data = tmp_path / "digits-c"
    shutil.copytree(digits_c, data)
    overrides = {"model.checkpoint": str(weights), "model.pretrained": False}
    config = config_for(data, tmp_path / "run", "source", **overrides)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=StopAfter(batches=4))  # stops in task 2
    state = load_file(weights)
    state["fc.bias"] = state["fc.bias"] + 1  # other weights, same file name
    save_file(state, weights)
    with pytest.raises(DusaError, match=f"^cannot resume {tmp_path / 'run'}: model.checkpoint \\({weights}\\) is not what its first session read \\(its sha256 differs\\); restore it, or run afresh"):
        run_experiment(config, resume=True)
    shutil.copy(digits_weights_path(), weights)
    manifest = data / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # as prepare-data rewrites it when it adds corruptions
    with pytest.warns(UserWarning, match="data.root/manifest.json .* changed since the run began"):
        assert run_experiment(config, resume=True).results["status"] == "complete"


def test_resume_names_the_changed_file_of_a_folder_and_another_process_count(tmp_path: Path, monkeypatch) -> None:
    from dusa_cli.results import environment
    from dusa_cli.results.environment import folder_record
    from dusa_cli.results.store import _check_same_inputs, _say_other_process_count

    folder = tmp_path / "segformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = {"model.checkpoint": {"path": str(folder)} | folder_record(folder)}
    (folder / "config.json").write_text('{"num_labels": 3}')
    now = {"model.checkpoint": {"path": str(folder)} | folder_record(folder)}
    with pytest.raises(DusaError, match=f"model.checkpoint \\({folder}\\) is not what its first session read \\(its file config.json differs\\)"):
        _check_same_inputs(tmp_path, {"inputs": before}, {"inputs": now})
    # An image set (EATA's Fisher data) over the limit is recorded by the names and sizes of its files.
    monkeypatch.setattr(environment, "LISTED_FILES_LIMIT", 1)
    (folder / "weights.bin").write_bytes(b"1")
    before = {"method.fisher_data": {"path": str(folder)} | folder_record(folder)}
    assert before["method.fisher_data"]["file_count"] == 2 and "files" not in before["method.fisher_data"]
    (folder / "weights.bin").write_bytes(b"12")
    now = {"method.fisher_data": {"path": str(folder)} | folder_record(folder)}
    with pytest.raises(DusaError, match=r"method.fisher_data .* \(its file names or sizes differ\)"):
        _check_same_inputs(tmp_path, {"inputs": before}, {"inputs": now})
    with pytest.warns(UserWarning, match="records no inputs"):  # runs recorded before inputs were: no check
        _check_same_inputs(tmp_path, {}, {"inputs": now})
    recorded = {"world_size": 1}
    with pytest.warns(UserWarning, match=r"^--resume with 2 process\(es\) after 1: BatchNorm layers"):
        _say_other_process_count(recorded, {"world_size": 2})
    _say_other_process_count(recorded | {"resumed": [{"world_size": 2}]}, {"world_size": 2})  # the last session's count


def test_the_commit_is_dirty_for_changed_code_not_for_a_results_folder(tmp_path: Path) -> None:
    import subprocess

    from dusa_cli.results.environment import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True, capture_output=True)

    (tmp_path / "dusa_cli").mkdir()
    (tmp_path / "dusa_cli" / "cli.py").write_text("tracked\n")
    (tmp_path / "preset.yaml").write_text("tracked\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = git_commit(tmp_path)
    assert commit is not None and len(commit) == 40
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "results.json").write_text("{}")
    assert git_commit(tmp_path) == commit  # a user's results folder: the code is as committed
    (tmp_path / "dusa_cli" / "my_method.py").write_text("new\n")
    assert git_commit(tmp_path) == f"{commit}-dirty"  # a new file in the package: it may register a method
    (tmp_path / "dusa_cli" / "my_method.py").unlink()
    (tmp_path / "dusa_cli" / "cli.py").write_text("changed\n")
    assert git_commit(tmp_path) == f"{commit}-dirty"
    git("checkout", "dusa_cli/cli.py")
    (tmp_path / "preset.yaml").write_text("changed\n")
    assert git_commit(tmp_path) == f"{commit}-dirty"  # any tracked file: a preset is code too


# CoTTA draws its augmentations from torch's global stream, which a reset re-seeds.
@pytest.mark.parametrize("method", [{"method.name": "tent"}, {"method.name": "cotta", "method.augmentations": 2, "method.anchor_threshold": 1.01}])
def test_reset_makes_tasks_independent_and_continual_carries_over(digits_c: Path, tmp_path: Path, method: dict) -> None:
    def fog(output: str, corruptions: list[str], setting: str) -> dict:
        config = config_for(digits_c, tmp_path / output, **{"data.corruptions": corruptions, "run.setting": setting} | method)
        return run_experiment(config).results["tasks"][-1]

    alone = fog("alone", ["fog"], "reset_each_shift")
    after_reset = fog("reset", ["gaussian_noise", "fog"], "reset_each_shift")
    after_continual = fog("continual", ["gaussian_noise", "fog"], "continual")
    assert alone["mean_loss"] == after_reset["mean_loss"] and alone["top1"] == after_reset["top1"]
    assert after_continual["mean_loss"] != alone["mean_loss"]


class StopAfter:
    """A progress sink that interrupts the run after N batches: as Ctrl-C would, or with
    `failure`, as a bug would."""

    def __init__(self, batches: int, failure: BaseException | None = None):
        self.batches = batches
        self.failure = failure or KeyboardInterrupt()

    def start_task(self, name: str, total: int) -> None: ...
    def end_task(self, score: float) -> None: ...

    def advance(self, images: int, score) -> None:
        self.batches -= 1
        if self.batches < 0:
            raise self.failure


def test_each_session_of_a_run_is_recorded_and_a_resumed_run_can_end_failed(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", method="source")
    for sessions, progress in enumerate((StopAfter(batches=1), StopAfter(batches=2)), start=1):
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, resume=sessions > 1, progress=progress)
        assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "stopped"
    with pytest.raises(RuntimeError, match="a bug"):
        run_experiment(config, resume=True, progress=StopAfter(batches=0, failure=RuntimeError("a bug")))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"  # not the stop it resumed
    assert len(json.loads((tmp_path / "run" / "environment.json").read_text())["resumed"]) == 2  # every resumed session


class EndScores:
    """A progress sink that keeps the score each task ends with."""

    def __init__(self) -> None:
        self.scores: list[float] = []

    def start_task(self, name: str, total: int) -> None: ...
    def advance(self, images: int, score) -> None: ...

    def end_task(self, score: float) -> None:
        self.scores.append(score)


def test_progress_ends_each_task_with_the_score_results_record(digits_c: Path, tmp_path: Path) -> None:
    """Under torchrun the running score is rank 0's share; each task's bar ends on the recorded one."""
    sink = EndScores()
    results = run_experiment(config_for(digits_c, tmp_path / "run", **{"data.num_ex": 16}), progress=sink).results
    assert sink.scores == [task["top1"] for task in results["tasks"]] and len(sink.scores) == 2


@pytest.mark.parametrize("setting", ["reset_each_shift", "continual"])
def test_resume_after_interruption_equals_an_uninterrupted_run(digits_c: Path, tmp_path: Path, setting: str) -> None:
    reference = run_experiment(config_for(digits_c, tmp_path / "ref", **{"run.setting": setting})).results
    config = config_for(digits_c, tmp_path / "run", **{"run.setting": setting})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=StopAfter(batches=4))  # 3 batches per task: stops in task 2
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "stopped" and len(partial["tasks"]) == 1
    if setting == "continual":  # a damaged state.pt is refused in one line; the run resumes once it is back
        state = tmp_path / "run" / "state.pt"
        saved = state.read_bytes()
        state.write_bytes(b"not what a run saved")
        with pytest.raises(DusaError, match="state.pt is unreadable \\(RuntimeError"):
            run_experiment(config, resume=True)
        older = torch.load(io.BytesIO(saved), weights_only=False) | {"records": []}  # saved before task 1 ended
        torch.save(older, state)
        with pytest.raises(DusaError, match="state.pt is older than results.json"):
            run_experiment(config, resume=True)
        state.write_bytes(saved)
    resumed = run_experiment(config, resume=True).results
    assert resumed["status"] == "complete"
    keys = ("corruption", "top1", "top5", "mean_loss", "num_samples")
    assert [[t[k] for k in keys] for t in resumed["tasks"]] == [[t[k] for k in keys] for t in reference["tasks"]]


def test_output_directory_guards(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", method="source")
    run_experiment(config)
    with pytest.raises(DusaError, match="holds a complete run of this config: nothing is left to run"):
        run_experiment(config)
    # The output is checked first, before the inputs and the model: the missing checkpoint is not reached.
    unloadable = config_for(digits_c, tmp_path / "run", method="source", **{"model.checkpoint": str(tmp_path / "missing.pth")})
    with pytest.raises(DusaError, match="holds a run whose config differs in model.checkpoint \\(None → '.*missing.pth'\\), model.pretrained \\(True → False\\); "
                       "choose another --output \\(or continue that run: --resume -o .*run, without -c\\)"):
        run_experiment(unloadable)
    changed = config_for(digits_c, tmp_path / "run", method="norm")
    with pytest.raises(DusaError, match="differs from its config.yaml in method.name \\('source' → 'norm'\\)"):
        run_experiment(changed, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DusaError, match="not empty"):
        run_experiment(config_for(digits_c, tmp_path / "other"))


def test_resume_takes_a_moved_run_cleans_killed_writes_and_records_each_session(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", method="source")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=StopAfter(batches=4))  # stops in task 2
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    (moved / ".state.pt.k1ll3d").write_bytes(b"half a write")  # what a SIGKILL mid-write leaves
    # Where the run is written and how it loads data are not what it computes: it resumes.
    options = {"data.num_workers": 1}
    resumed = run_experiment(config_for(digits_c, moved, method="source", **options), resume=True).results
    assert resumed["status"] == "complete" and len(resumed["tasks"]) == 2
    assert not list(moved.glob(".*"))
    environment = json.loads((moved / "environment.json").read_text())
    assert environment["device"] == "cpu" and len(environment["resumed"]) == 1
    (moved / "environment.json").unlink()  # what the inputs are checked against
    with pytest.warns(UserWarning, match="environment.json records no inputs \\(missing or unreadable\\)"):
        with pytest.warns(UserWarning, match="every task of the run .* is finished; nothing is left to run"):
            run_experiment(config_for(digits_c, moved, method="source"), resume=True)

    # Killed between config.yaml and its first results: --resume starts it afresh.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(moved / "config.yaml", early / "config.yaml")
    with pytest.raises(DusaError, match="holds a stopped run of this config; pass --resume"):
        run_experiment(config_for(digits_c, early, method="source"))
    with pytest.warns(UserWarning, match="nothing to resume"):
        assert len(run_experiment(config_for(digits_c, early, method="source"), resume=True).results["tasks"]) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(DusaError, match="it is a file"):
        run_experiment(config_for(digits_c, tmp_path / "file"))


def test_missing_task_fails_before_writing_anything(digits_c: Path, tmp_path: Path) -> None:
    config = config_for(digits_c, tmp_path / "run", **{"data.corruptions": ["snow"]})
    with pytest.raises(DusaError, match="snow"):
        run_experiment(config)
    assert not (tmp_path / "run").exists()


def test_profiled_run_records_micro_batches_three_to_five_of_its_first_task(digits_c: Path, tmp_path: Path) -> None:
    import gzip

    config = config_for(digits_c, tmp_path / "run", **{"data.batch_size": 8, "run.profile": True})  # 5 per task
    results = run_experiment(config).results
    assert results["status"] == "complete" and len(results["tasks"]) == 2
    profile = tmp_path / "run" / "profile"
    summary = json.loads((profile / "summary.json").read_text())
    assert summary["schedule"] == {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}
    assert summary["wall_ms"] > 0 and summary["ms_by_kind"]["convolution"] > 0  # the ResNet's
    trace = json.loads(gzip.open(profile / "steps.trace.json.gz").read())
    # The profiler names each recorded step: micro-batches 3 to 5 (counted from 1) of the first task.
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}
    assert summary["steps_recorded"] == 3, summary
    assert "aten::" in (profile / "steps.ops.txt").read_text()


def test_top_k_accuracies_over_micro_batches_with_more_classes_than_twenty() -> None:
    torch.manual_seed(0)
    metrics = OnlineMetrics(torch.device("cpu"))
    logits, labels = torch.randn(2, 16, 50), torch.randint(50, (2, 16))
    for batch_logits, batch_labels in zip(logits, labels):
        metrics.update(batch_logits, batch_labels, None, 1.0, 16)
    record = metrics.record()
    for k in (1, 5, 20):
        hits = (logits.flatten(0, 1).topk(k).indices == labels.flatten()[:, None]).any(dim=1)
        assert record[f"top{k}"] == pytest.approx(hits.float().mean().item())
    assert record["top1"] < record["top5"] < record["top20"] < 1


def test_online_curve_keeps_evenly_spaced_points_and_interval_losses() -> None:
    from dusa_cli.engine.tasks import CURVE_POINTS, online_curve

    short = online_curve([8, 16, 20], "online_top1", [0.5, 0.25, 0.4], [1.0, 2.0, 3.0])
    assert short == {"images": [8, 16, 20], "online_top1": [0.5, 0.25, 0.4], "loss": [1.0, 2.0, 3.0]}
    count = 3 * CURVE_POINTS + 1  # micro-batches of 4 images, loss = index
    curve = online_curve([4 * (i + 1) for i in range(count)], "online_miou", [i / count for i in range(count)], list(range(count)))
    assert len(curve["images"]) == CURVE_POINTS and curve["images"][-1] == 4 * count  # the task's end is a point
    ends = [image // 4 - 1 for image in curve["images"]]
    assert curve["online_miou"] == [end / count for end in ends]
    starts = [0, *(end + 1 for end in ends[:-1])]
    assert curve["loss"] == [sum(range(a, b + 1)) / (b + 1 - a) for a, b in zip(starts, ends)]  # interval means
    assert "loss" not in online_curve([1], "online_miou", [0.3], None)


def test_tensorboard_tracks_each_tasks_scores_and_curves(digits_c: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_for(digits_c, tmp_path / "run", **{"run.track": ["tensorboard"], "run.setting": "continual"})
    first, second = run_experiment(config).results["tasks"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(event.step, event.value) for event in events.Scalars(tag)]

    assert scalars("tasks/top1") == [(0, pytest.approx(first["top1"])), (1, pytest.approx(second["top1"]))]
    for task in (first, second):  # each task's curve against the images seen in it
        curve = task["curve"]
        assert scalars(f"{task['corruption']}/5/online_top1") == list(zip(curve["images"], map(pytest.approx, curve["online_top1"])))
        assert len(scalars(f"{task['corruption']}/5/loss")) == len(curve["images"])
    # The stream: the second task's points continue after the first task's images.
    steps = [step for step, _ in scalars("stream/online_top1")]
    assert steps == first["curve"]["images"] + [40 + images for images in second["curve"]["images"]]


def test_tracking_holds_every_finished_task_once_across_sessions(digits_c: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged_tasks() -> list[int]:
        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        events.Reload()
        return [event.step for event in events.Scalars("tasks/top1")]

    config = config_for(digits_c, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=StopAfter(batches=4))  # stops in task 2, untracked
    tracked = config_for(digits_c, tmp_path / "run", **{"run.track": ["tensorboard"]})
    run_experiment(tracked, resume=True)  # tracking turned on at --resume: task 1 is logged too
    assert logged_tasks() == [0, 1]
    (tmp_path / "run" / "results.json").unlink()  # the run starts from its first task again
    with pytest.warns(UserWarning, match="nothing to resume"):
        run_experiment(tracked, resume=True)
    assert logged_tasks() == [0, 1]  # once each, not the earlier session's as well


def test_a_missing_tracker_package_is_a_one_line_error_before_anything_is_written(digits_c: Path, tmp_path: Path, monkeypatch) -> None:
    from dusa_cli.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # Python then finds no such package
    with pytest.raises(ConfigError, match=r"tensorboard package is not installed: pip install tensorboard \(or, in dusa's checkout: pip install -e '\.\[track\]'\)"):
        run_experiment(config_for(digits_c, tmp_path / "run", **{"run.track": ["tensorboard"]}))
    assert not (tmp_path / "run").exists()  # the run can start afresh once it is installed


def test_more_data_workers_than_cores_is_said_once(digits_c: Path, tmp_path: Path) -> None:
    from dusa_cli.data.files import usable_cores

    workers = usable_cores() + 1
    with pytest.warns(UserWarning) as said:  # torch's own warnings (two per task) are not among them
        run_experiment(config_for(digits_c, tmp_path / "run", method="source", **{"data.num_workers": workers}))
    # Python 3.12 adds a DeprecationWarning per forked worker (fork in a multi-threaded process).
    user_warnings = [str(w.message) for w in said if issubclass(w.category, UserWarning)]
    assert user_warnings == [f"data.num_workers={workers} is more than the {usable_cores()} CPU cores this process may use"]
