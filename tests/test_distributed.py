"""Data parallelism on the CPU (gloo): two processes give a single process's results, only rank 0
writes, a killed or hung rank ends the run with an error instead of a hang, resume works."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dusa_cli import collectives
from dusa_cli.collectives import all_reduce_gradients
from dusa_cli.config.loader import load_config
from dusa_cli.config.schema import DataConfig
from dusa_cli.engine.distributed import World, parse_gpus
from dusa_cli.engine.loop import run_experiment, task_loader
from dusa_cli.errors import ConfigError
from helpers import LAUNCH_ENV, assert_one_line_error, dusa, launch_command, race_command

PRESET = Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml"
KEYS = ("top1", "top5", "mean_loss")

# Tent on a LayerNorm model (no BatchNorm: shard statistics would differ from the batch's), in
# the continual setting (state.pt, resume). 36 images in batches of 5: every batch splits 2 + 3
# and the last one (1 image) leaves rank 0 without any; accumulation 3 ends each task partial.
SETTINGS = {
    "data.corruptions": ["gaussian_noise", "fog"],
    "data.num_ex": 36,
    "data.batch_size": 5,
    "model.name": "convnext_atto",
    "model.num_classes": 10,
    "model.pretrained": False, "model.random_init": True,
    "method.name": "tent",
    "optim.accumulation": 3,
    "run.setting": "continual",
    "run.device": "cpu",  # gloo, also on a GPU machine
}

def cli_args(digits_c: Path, output: Path) -> list[str]:
    settings = SETTINGS | {"data.root": str(digits_c), "run.output": str(output)}
    return ["-c", str(PRESET), "-q", *(f"--set={key}={json.dumps(value)}" for key, value in settings.items())]


def tasks(output: Path) -> list[dict]:
    return json.loads((output / "results.json").read_text())["tasks"]


def assert_same_results(run: Path, reference: list[dict]) -> None:
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
    assert len(tasks(run)) == len(reference) == 2
    for task, expected in zip(tasks(run), reference):
        assert task["num_samples"] == expected["num_samples"] == 36
        for key in KEYS:
            assert task[key] == pytest.approx(expected[key], abs=1e-5), key
        # The online curve too: every micro-batch's hits and loss summed over the processes' shards.
        curve, expected_curve = task["curve"], expected["curve"]
        assert curve["images"] == expected_curve["images"] and curve["images"][-1] == 36
        for key in ("online_top1", "loss"):
            assert curve[key] == pytest.approx(expected_curve[key], abs=1e-5), key


@pytest.fixture(scope="module")
def reference(digits_c: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The single-process run, in this process."""
    output = tmp_path_factory.mktemp("single") / "run"
    config = load_config(PRESET, SETTINGS | {"data.root": str(digits_c), "run.output": str(output)})
    return run_experiment(config).results["tasks"]


def torchrun(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dusa_cli", *args],
        capture_output=True, text=True, env=os.environ | env, timeout=120,
    )
    return result, time.monotonic() - start


def writers(log: Path) -> set[str]:
    return {line.split()[0] for line in log.read_text().splitlines()}


def test_shards_cut_the_single_process_batches_in_order() -> None:
    dataset = TensorDataset(torch.arange(37))
    data = DataConfig(root=Path("unused"), batch_size=5)
    single = [batch[0].tolist() for batch in DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7))]
    for size in (1, 2, 3, 6):
        shards = [list(task_loader(dataset, data, World(torch.device("cpu"), rank, size), seed=7)) for rank in range(size)]
        rebuilt = [sum((shard[0].tolist() for shard in parts if shard is not None), []) for parts in zip(*shards)]
        assert rebuilt == single
        assert task_loader(dataset, data, World(torch.device("cpu"), 0, size), 7).batch_sampler.global_sizes() == [5] * 7 + [2]
        if size == 2:  # rank 0 takes the smaller part (SETTINGS' last 1-image batch leaves it empty)
            assert [[len(shard[0]) for shard in parts] for parts in zip(*shards)] == [[2, 3]] * 7 + [[1, 1]]


def _reduce_gradients(rank: int, folder: str) -> None:
    """One of two gloo processes: a gradient both have, one neither has, one only rank 1 has, and
    a float64 one both have, each in a bucket of its own (a DiT-XL/2's gradients span many)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    collectives.BUCKET_BYTES = 8
    both, neither, one = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    wide = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    both.grad, wide.grad = torch.full((3,), rank + 1.0), torch.full((2,), 10.0 * (rank + 1), dtype=torch.float64)
    if rank == 1:
        one.grad = torch.ones(3)
    all_reduce_gradients([both, neither, wide, one])
    torch.save([both.grad, neither.grad, wide.grad, one.grad], f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gradients_sum_over_processes_and_none_stays_none(tmp_path: Path) -> None:
    # A zero where no process had a gradient would be an Adam step (momentum, weight decay) that a
    # single process does not take.
    torch.multiprocessing.spawn(_reduce_gradients, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        both, neither, wide, one = torch.load(tmp_path / f"rank{rank}.pt")
        assert both.tolist() == [3.0] * 3 and neither is None and one.tolist() == [1.0] * 3
        assert wide.dtype == torch.float64 and wide.tolist() == [30.0] * 2


def test_gpu_lists_are_checked() -> None:
    for text, message in (("0,a", "comma list of GPU indices"), ("1,0,1", "GPU 1 more than once"), ("", "comma list")):
        with pytest.raises(ConfigError, match=message):
            parse_gpus(text)


def test_gpus_flag_fails_in_one_line_without_those_gpus(digits_c: Path, tmp_path: Path) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus, message = (f"0,{count}", "no GPU") if count else ("0,1", "CUDA is not available")
    result = dusa("baseline", *cli_args(digits_c, tmp_path / "run"), "--gpus", gpus)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "run").exists()


def test_torchrun_two_processes_match_one_and_only_rank_0_writes(digits_c: Path, tmp_path: Path, reference: list[dict], hooks: dict[str, str]) -> None:
    output = tmp_path / "run"
    result, _ = torchrun("baseline", *cli_args(digits_c, output), env=hooks)
    assert result.returncode == 0, result.stderr
    assert_same_results(output, reference)
    assert writers(tmp_path / "writes.log") == {"0"}
    assert {path.name for path in output.iterdir()} == {"config.yaml", "environment.json", "results.json", "state.pt"}
    assert json.loads((output / "environment.json").read_text())["world_size"] == 2
    assert result.stdout.count("online accuracy") == 1  # one results table, from rank 0


def test_dusa_under_torchrun_matches_one_process(digits_c: Path, tmp_path: Path, hooks: dict[str, str]) -> None:
    """DUSA trains the prior through `predict`, not `forward`: the summed gradients keep the
    classifier and the prior the same on both processes, update after update; and every image
    draws its noise and classes from its own stream, and every micro-batch its timestep from
    its own (timestep_range: one per micro-batch, on both shards), so the run equals one
    process's (a LayerNorm classifier: no shard batch statistics)."""
    preset = PRESET.with_name("dusa_digits.yaml")
    settings = {"data.root": str(digits_c), "data.corruptions": ["fog"], "data.num_ex": 20, "data.batch_size": 8,
                "model.name": "convnext_atto", "model.num_classes": 10, "model.pretrained": False, "model.random_init": True, "run.device": "cpu",
                "method.timestep": None, "method.timestep_range": [0.2, 0.9]}
    single = run_experiment(load_config(preset, settings | {"run.output": str(tmp_path / "single")})).results["tasks"]
    output = tmp_path / "run"
    args = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
    result, _ = torchrun("adapt-cls", "-c", str(preset), *args, "-o", str(output), "-q", env=hooks)
    assert result.returncode == 0, result.stderr
    (task,) = tasks(output)
    assert task["num_samples"] == 20 and task["top1"] == single[0]["top1"]
    assert task["mean_loss"] == pytest.approx(single[0]["mean_loss"], rel=1e-5)
    assert task["curve"]["online_top1"] == single[0]["curve"]["online_top1"]
    assert task["curve"]["loss"] == pytest.approx(single[0]["curve"]["loss"], rel=1e-5)
    sums = [line.split() for line in (tmp_path / "parameters.log").read_text().splitlines()]
    by_rank = {rank: [total for r, total in sums if r == rank] for rank in ("0", "1")}
    assert len(by_rank["0"]) == 3 and by_rank["0"] == by_rank["1"]


def test_a_killed_rank_stops_the_run_and_resume_completes_it(digits_c: Path, tmp_path: Path, reference: list[dict], hooks: dict[str, str]) -> None:
    output = tmp_path / "run"
    # 8 micro-batches per task: rank 1 dies early in the second task.
    result, elapsed = torchrun("baseline", *cli_args(digits_c, output), env=hooks | {"DUSA_TEST_FAULT": "1:kill:10"})
    assert result.returncode != 0 and elapsed < 120
    partial = json.loads((output / "results.json").read_text())
    # Rank 0 fails on the lost peer ("failed"), unless torchrun's SIGTERM reaches it first ("stopped").
    assert partial["status"] in ("failed", "stopped") and [t["corruption"] for t in partial["tasks"]] == ["gaussian_noise"]
    resumed, _ = torchrun("baseline", *cli_args(digits_c, output), "--resume", env=hooks)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(output, reference)


def test_a_hung_rank_times_out_with_one_error_line_from_rank_0(digits_c: Path, tmp_path: Path, hooks: dict[str, str]) -> None:
    output = tmp_path / "run"
    eta = "--set=method.name=eata"  # warned of by every process's config check: rank 0 alone says it
    result, elapsed = torchrun("baseline", *cli_args(digits_c, output), eta, env=hooks | {"DUSA_TEST_FAULT": "1:hang:3", "DUSA_DIST_TIMEOUT_S": "5"})
    assert result.returncode != 0 and elapsed < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with the other processes" in errors[0], result.stderr
    warned = [line for line in result.stderr.splitlines() if "method eata without method.fisher_data" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: method eata"), result.stderr
    assert json.loads((output / "results.json").read_text())["status"] == "failed"


def launch(digits_c: Path, output: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    settings = SETTINGS | {"data.root": str(digits_c), "run.output": str(output)}
    env = os.environ | env | LAUNCH_ENV
    return subprocess.run(launch_command(PRESET, settings), capture_output=True, text=True, env=env, timeout=120)


def test_gpus_launcher_matches_one_process_and_reports_failures(digits_c: Path, tmp_path: Path, reference: list[dict], hooks: dict[str, str]) -> None:
    output = tmp_path / "run"
    result = launch(digits_c, output, hooks)
    assert result.returncode == 0, result.stderr
    assert_same_results(output, reference)
    assert writers(tmp_path / "writes.log") == {"0"}
    # Failing in every process (the output holds this run, complete): one line, from rank 0.
    assert_one_line_error(launch(digits_c, output, hooks), 1, "holds a complete run of this config")
    killed = launch(digits_c, tmp_path / "killed", hooks | {"DUSA_TEST_FAULT": "1:kill:2"})
    assert killed.returncode == 1 and "Traceback" not in killed.stderr
    last = killed.stderr.splitlines()[-1]  # killed in the first task
    assert "the process on GPU 1 was killed by SIGKILL; the others were stopped; no task had finished" in last


def test_a_killed_process_is_the_report_when_it_ended_together_with_a_failing_one(tmp_path: Path) -> None:
    # Rank 0 exits 1 (its own error: printed by it) after rank 1 was killed, the launcher waking
    # only then: the killed process is the cause to report, whatever their order.
    result = subprocess.run(race_command(tmp_path / "peer"), capture_output=True, text=True, env=os.environ | LAUNCH_ENV, timeout=120)
    assert_one_line_error(result, 1, "the process on GPU 1 was killed by SIGKILL; the others were stopped; nothing was kept")
