"""Ctrl-C, SIGTERM and SIGHUP stop a run cleanly: one line, exit 128 + the signal's number, no
temporary file left behind, and --resume completes the run as if it had never stopped."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dusa_cli.config.loader import load_config
from dusa_cli.engine.loop import run_experiment
from dusa_cli.errors import ExitCode
from dusa_cli.results.store import stopped_run_outcome
from helpers import LAUNCH_ENV, assert_one_line_error, dusa, dusa_each, launch_command

PRESET = Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml"
KEYS = ("corruption", "top1", "top5", "mean_loss", "num_samples")
# A run writes config.yaml, environment.json, results.json without tasks, then with the first
# task: the hooks (conftest.HOOKS) make rank 0 hang in its fourth write, the first task's record,
# with the temporary file written but not yet in place. The stop then writes results.json itself:
# the first task (finished, its record in memory) and status "stopped".
STALL = {"DUSA_TEST_FAULT": "0:hang-write:3"}
SAVED = "every finished task is saved (continue with --resume)"  # where the stop cannot look


def kept(output: Path, done: int = 1) -> str:
    """How a run stopped after `done` of its 2 tasks says what it kept."""
    return f"{done} of 2 tasks finished and are saved in {output} (continue with --resume)"

Start = Callable[..., subprocess.Popen]


def settings(digits_c: Path, output: Path) -> dict:
    return {"data.root": str(digits_c), "data.corruptions": ["gaussian_noise", "fog"], "run.output": str(output)}


def dusa_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dusa_cli", *args]


def baseline(digits_c: Path, output: Path, *more: str) -> list[str]:
    """The `dusa baseline` command of those settings."""
    return dusa_command("baseline", "-c", str(PRESET), "--data", str(digits_c), "--corruption", "gaussian_noise,fog",
                        "-o", str(output), "-q", *more)  # fmt: skip


def records(output: Path) -> list[list]:
    return [[task[key] for key in KEYS] for task in json.loads((output / "results.json").read_text())["tasks"]]


@pytest.fixture(scope="module")
def reference(digits_c: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list]:
    """The same run, never stopped (in this process)."""
    output = tmp_path_factory.mktemp("reference") / "run"
    run_experiment(load_config(PRESET, settings(digits_c, output)))
    return records(output)


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a command in a process group of its own, with Ctrl-C as `sigint` says (a shell's
    background job ignores it, and so would the command if pytest were one). What is left of the
    group when the test ends is killed: the runs here hang until they are signalled."""
    groups = []

    def started(command: list[str], env: dict[str, str], sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.Popen:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | env,
            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )  # fmt: skip
        groups.append(process.pid)
        return process

    yield started
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def wait_for_hang(process: subprocess.Popen, hang_log: Path, hangs: int = 1) -> None:
    """Until the hooks make the run hang (DUSA_TEST_FAULT), the `hangs`-th time."""
    deadline = time.monotonic() + 60
    while not hang_log.is_file() or len(hang_log.read_text().splitlines()) < hangs:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached its hang"
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    ("number", "code", "stop"),
    [(signal.SIGINT, ExitCode.INTERRUPTED, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGHUP, 129, "stopped by SIGHUP")],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_a_stopped_run_says_so_in_one_line_and_resumes(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start, reference: list[list], number: int, code: int, stop: str) -> None:
    output = tmp_path / "run"
    process = start(baseline(digits_c, output), hooks | STALL)
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(number)
    assert_one_line_error(finish(process), code, f"{stop}; {kept(output)}")
    assert not list(output.glob(".*"))  # the interrupted write removed its temporary file
    assert records(output) == reference[:1]
    assert json.loads((output / "results.json").read_text())["status"] == "stopped"
    resumed = subprocess.run(baseline(digits_c, output, "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert records(output) == reference


def test_the_same_command_again_says_what_its_output_holds_and_resume_needs_no_preset(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start, reference: list[list]) -> None:
    output = tmp_path / "run"
    command = baseline(digits_c, output)
    process = start(command, hooks | STALL)
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    assert finish(process).returncode == ExitCode.INTERRUPTED
    again, other = dusa_each(command[3:], (*command[3:], "--method", "norm", "--set", "data.batch_size=16", "--set", "data.shuffle=false",
                                           "--set", "data.num_ex=5", "--resume"))  # fmt: skip
    assert_one_line_error(again, 1, f"{output} holds a stopped run of this config; pass --resume to continue it")
    # What decides what runs is named first, not lost among the keys before it alphabetically.
    assert_one_line_error(other, 1, "differs from its config.yaml in method.name ('tent' → 'norm'), data.batch_size (64 → 16)")
    # --resume alone: the run's config.yaml is where it starts (flags still override what a resume may change).
    resumed = dusa("baseline", "--resume", "-o", str(output), "--set", "data.num_workers=1", "-q")
    assert resumed.returncode == 0 and "warning" not in resumed.stderr, resumed.stderr
    assert records(output) == reference
    again, nothing_left = dusa_each(command[3:], (*command[3:], "--resume"))
    assert_one_line_error(again, 1, f"{output} holds a complete run of this config: nothing is left to run")
    assert nothing_left.returncode == 0, nothing_left.stderr
    assert [line for line in nothing_left.stderr.splitlines() if line.startswith("warning")] == [
        f"warning: --resume: every task of the run in {output} is finished; nothing is left to run"
    ]


def test_a_run_stopped_before_its_first_task_finished_says_so(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start, reference: list[list]) -> None:
    output = tmp_path / "run"
    process = start(baseline(digits_c, output), hooks | {"DUSA_TEST_FAULT": "0:hang:0"})  # in its first step
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    assert_one_line_error(finish(process), ExitCode.INTERRUPTED, "interrupted; no task had finished (run it again with --resume)")
    resumed = subprocess.run(baseline(digits_c, output, "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert records(output) == reference


def test_ctrl_c_again_quits_a_stuck_stop_at_once(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start, reference: list[list]) -> None:
    """The stop's own write hangs too (every write does, from the first task's record on): a
    second Ctrl-C ends the process there, and --resume still completes the run."""
    output = tmp_path / "run"
    process = start(baseline(digits_c, output), hooks | {"DUSA_TEST_FAULT": "0:hang-writes:3"})
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    wait_for_hang(process, tmp_path / "hangs.log", hangs=2)  # in the stop's status write
    process.send_signal(signal.SIGINT)
    assert_one_line_error(finish(process), ExitCode.INTERRUPTED, f"interrupted again, quit at once; {SAVED}")
    assert list(output.glob(".results.json.*"))  # the write it cut off: --resume removes it
    resumed = subprocess.run(baseline(digits_c, output, "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert records(output) == reference and not list(output.glob(".*"))


def test_sigterm_to_every_process_of_a_run_with_data_workers(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    """A scheduler signals every process of a job: DataLoader workers too, which torch would
    have die of it (the run would then fail on them rather than report the stop)."""
    output = tmp_path / "run"
    # One micro-batch per task: the run hangs with the second task's first batch, its workers up.
    process = start(baseline(digits_c, output, "--set", "data.num_workers=2"), hooks | {"DUSA_TEST_FAULT": "0:hang:1"})
    wait_for_hang(process, tmp_path / "hangs.log")
    os.killpg(process.pid, signal.SIGTERM)
    assert_one_line_error(finish(process), 143, f"stopped by SIGTERM; {kept(output)}")
    assert len(records(output)) == 1


def launched(digits_c: Path, output: Path, hooks: dict[str, str], start: Start, sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.Popen:
    """The `--gpus 0,1` launcher running the same settings on two CPU processes, once rank 0
    hangs in its fourth write (STALL)."""
    command = launch_command(PRESET, settings(digits_c, output) | {"run.device": "cpu"})
    process = start(command, hooks | LAUNCH_ENV | STALL, sigint)
    wait_for_hang(process, Path(hooks["DUSA_TEST_HANG_LOG"]))
    return process


def test_the_gpus_launcher_forwards_sigterm_and_reports_it_once(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    output = tmp_path / "run"
    process = launched(digits_c, output, hooks, start)
    process.send_signal(signal.SIGTERM)  # to the launcher alone
    assert_one_line_error(finish(process), 143, f"stopped by SIGTERM; {kept(output)}")
    assert not list(output.glob(".*"))  # rank 0 stopped as at Ctrl-C
    assert len(records(output)) == 1


def children(pid: int) -> list[int]:
    """The processes that `pid` started (Linux: /proc/PID/stat reads "PID (NAME) STATE PARENT ...")."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue  # ended meanwhile
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # an orphan's zombie waits for a parent that may never reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_workers_of_a_killed_launcher_stop(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    """SIGKILL, which the launcher cannot forward: the kernel SIGTERMs its workers. Also in the
    background, where they ignore SIGINT (the signal torch asks for)."""
    output = tmp_path / "run"
    process = launched(digits_c, output, hooks, start, sigint=signal.SIG_IGN)
    workers = children(process.pid)
    assert len(workers) >= 2
    process.kill()
    finish(process)  # its output pipes close when the workers, which share them, have ended
    deadline = time.monotonic() + 30
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, workers))
    assert not list(output.glob(".*"))  # rank 0 stopped as at Ctrl-C, not killed


# A build writes its settings, its unfinished marker, then one file per image (4 here).
@pytest.mark.parametrize(("writes", "images"), [(0, 0), (3, 1)], ids=["in-its-first-write", "in-its-second-image"])
def test_a_stopped_data_build_says_what_the_same_command_finishes(imagenet_source: Path, tmp_path: Path, hooks: dict[str, str], start: Start, writes: int, images: int) -> None:
    output = tmp_path / "imagenet-c"
    command = dusa_command("prepare-data", "imagenet-c", "--source", str(imagenet_source), "-o", str(output),
                           "--corruption", "fog", "--severity", "1", "--workers", "1")  # fmt: skip
    process = start([*command, "-q"], hooks | {"DUSA_TEST_FAULT": f"0:hang-write:{writes}"})
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    kept = f"{output} holds part of the build (the same command finishes it)" if images else "nothing was written"
    assert_one_line_error(finish(process), ExitCode.INTERRUPTED, f"interrupted; {kept}")
    assert len(list(output.rglob("*.JPEG"))) == images and not (output / "manifest.json").exists()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"wrote {4 - images} of the 4 files in {output}" in finished.stderr  # what the stop kept is not made again


def test_a_stopped_training_says_no_weights_were_written(digits_c: Path, tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    weights = tmp_path / "digits.safetensors"
    command = dusa_command("pretrain", "digits-classifier", "--data", str(digits_c), "-o", str(weights), "--epochs", "1", "-q")
    process = start(command, hooks | {"DUSA_TEST_FAULT": "0:hang-write:0"})  # in its one write, at the end
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    assert_one_line_error(finish(process), ExitCode.INTERRUPTED, "interrupted; no weights were written")
    assert list(tmp_path.glob("*digits.safetensors*")) == []  # nor a temporary file


def test_a_stopped_benchmark_says_where_the_finished_recipes_are(tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    figures = tmp_path / "bench.json"
    command = dusa_command("bench", "cls", "--tiny", "--updates", "1", "--warmup", "0", "--device", "cpu", "-o", str(figures), "-q")
    # The official recipe's update is 8 micro-batches: it hangs in the fast recipe's first.
    process = start(command, hooks | {"DUSA_TEST_FAULT": "0:hang:8"})
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGINT)
    assert_one_line_error(finish(process), ExitCode.INTERRUPTED, f"interrupted; the figures of 1 of the 2 recipes are in {figures}")
    saved = json.loads(figures.read_text())
    assert [row["name"] for row in saved["recipes"]] == ["official"] and not saved["complete"]


def test_a_stopped_trajectory_check_says_nothing_was_written(tmp_path: Path, hooks: dict[str, str], start: Start) -> None:
    figures = tmp_path / "trajectory.json"
    command = dusa_command("bench", "cls", "--tiny", "--trajectory", "1", "--device", "cpu", "-o", str(figures), "-q")
    process = start(command, hooks | {"DUSA_TEST_FAULT": "0:hang:0"})
    wait_for_hang(process, tmp_path / "hangs.log")
    process.send_signal(signal.SIGTERM)
    assert_one_line_error(finish(process), 128 + signal.SIGTERM, f"stopped by SIGTERM; nothing was written to {figures}")
    assert list(tmp_path.glob("*trajectory.json*")) == []


def test_a_stop_that_something_swallowed_still_ends_as_a_stop() -> None:
    """Python drops an exception raised in a ctypes callback (numba's compiler runs in one): the
    work then goes on, but the command must still end as stopped, not as a success."""
    from dusa_cli.errors import Interrupted
    from dusa_cli.stopping import stoppable

    finished = False
    with pytest.raises(Interrupted, match="^stopped by SIGTERM; kept") as caught:
        with stoppable("kept"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass  # as the ctypes callback does
            finished = True
    assert finished and caught.value.exit_code == 143


def test_a_stop_during_a_failed_runs_last_save_leaves_it_failed(tmp_path: Path) -> None:
    """When one process of a torchrun run dies, rank 0 fails on the lost peer while torchrun
    SIGTERMs it: a stop in the middle of saving "failed" left results.json "running" (CI caught
    it in test_distributed's killed-rank test). The save finishes; the failure is what's reported."""
    from dusa_cli.results.store import ResultsStore
    from dusa_cli.stopping import stoppable

    class SignalledAsItSaves(ResultsStore):
        def _save(self, *results: dict) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next line
            super()._save(*results)

    store = SignalledAsItSaves(tmp_path, {"status": "running", "tasks": []})
    with pytest.raises(RuntimeError, match="lost peer"):
        with stoppable("kept"), store.running():
            raise RuntimeError("lost peer")
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_a_stop_during_a_runs_completing_save_leaves_it_stopped(tmp_path: Path) -> None:
    """A SIGTERM (a scheduler's time limit) in the middle of writing "complete": the write is
    abandoned, and the run must not stay "running" on disk with every task finished."""
    from dusa_cli.errors import Interrupted
    from dusa_cli.results.store import ResultsStore
    from dusa_cli.stopping import stoppable

    class SignalledAsItCompletes(ResultsStore):
        def _save(self, *results: dict) -> None:
            if (results[0] if results else self.results)["status"] == "complete":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next line
            super()._save(*results)

    store = SignalledAsItCompletes(tmp_path, {"status": "running", "tasks": [{"corruption": "fog"}]})
    store._save()
    with pytest.raises(Interrupted, match="^stopped by SIGTERM"):
        with stoppable(), store.running():
            store.complete({"top1": 0.5})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "stopped" and saved["tasks"] == [{"corruption": "fog"}]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the retry timer is POSIX's")
def test_a_stop_in_the_middle_of_an_import_waits_for_it_to_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in a module's import leaves it half-loaded: numpy then refused to load again
    and a Ctrl-C in the first second ended in "internal error: ImportError", or, inside torch's
    C++ set-up, in an abort. The stop waits for the import and lands in the code after it."""
    from dusa_cli.errors import Interrupted
    from dusa_cli.stopping import stoppable

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.2)\nLOADED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_to_import", raising=False)
    alarm = signal.getsignal(signal.SIGALRM)
    after_import = False
    with pytest.raises(Interrupted, match="^stopped by SIGTERM; kept"):
        with stoppable("kept"):
            import slow_to_import  # noqa: F401

            after_import = True
            time.sleep(1)  # the stop lands here
            pytest.fail("the stop was lost")
    assert after_import and sys.modules["slow_to_import"].LOADED
    assert signal.getsignal(signal.SIGALRM) is alarm  # the retry's timer handler is gone


def test_a_stop_says_what_it_kept_from_the_files_on_disk(tmp_path: Path) -> None:
    assert stopped_run_outcome(tmp_path / "new") == "no task had started; nothing was written"
    (tmp_path / "config.yaml").write_text("task: cls\n")  # stopped between the first two writes
    assert stopped_run_outcome(tmp_path) == "no task had finished (run it again with --resume)"
    (tmp_path / "results.json").write_text("{")
    assert stopped_run_outcome(tmp_path) == f"see {tmp_path / 'results.json'}"
