"""Running the real `dusa` command (or the `--gpus` launcher) in a subprocess, what its errors
must look like, and tiny models whose outputs depend on their inputs."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests import forkserver

Module = TypeVar("Module", bound=torch.nn.Module)


def dusa(*args: str, cwd: Path | None = None, columns: int = 200, threads: int | None = None) -> subprocess.CompletedProcess:
    """`dusa ARGS` in a process of its own, forked after the imports (tests/forkserver.py);
    `threads`: torch's CPU threads (default: one per core)."""
    env = os.environ | {"COLUMNS": str(columns), "DUSA_DEBUG": "0"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    return forkserver.run(args, cwd, env, timeout=300)


def dusa_each(*invocations: Sequence[str], columns: int = 200) -> list[subprocess.CompletedProcess]:
    """`dusa` on each argument list, in order, several at a time: most of a short run is one
    core importing torch, so independent commands need not wait for each other. The cores are
    shared out: with a thread per core each, two processes' OpenMP threads spin-wait on cores that
    the other holds (on 2 cores the two trajectory checks of test_bench took 44 s, not 8 s)."""
    cores = os.cpu_count() or 1
    at_once = min(len(invocations), max(2, cores))
    threads = max(1, cores // at_once)
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(lambda args: dusa(*args, columns=columns, threads=threads), invocations))


# Runs the CLI on the arguments after -c, then names the heavy libraries the process imported
# on a last line of its own, and exits as the CLI did.
HEAVY_IMPORTS = """
import sys
from dusa_cli.cli import main

sys.argv[0] = "dusa"
code = 0
try:
    main()
except SystemExit as stop:
    code = stop.code
print("imported:", *[name for name in ("torch", "numpy", "timm", "transformers", "diffusers") if name in sys.modules])
sys.exit(code)
"""


def heavy_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`dusa ARGS` in a fresh process (its output without the last line), and the heavy
    libraries it imported (torch alone takes a second on a CPU)."""
    result = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS, *args], capture_output=True, text=True, timeout=120)
    *output, last = result.stdout.splitlines()
    assert last.startswith("imported:"), result.stdout + result.stderr
    result.stdout = "".join(f"{line}\n" for line in output)
    return result, last.split()[1:]


def randomized(model: Module, seed: int = 0) -> Module:
    """Every weight perturbed: DiT's adaLN-Zero init makes its blocks the identity and its
    output zero, so a test on it could not tell right outputs or gradients from wrong ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@contextmanager
def optimizer_steps() -> Iterator[list[int]]:
    """A list that gains an entry for every step any optimizer takes inside the block."""
    steps: list[int] = []
    hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        yield steps
    finally:
        hook.remove()


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()  # a blank line too would be one too many
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr


def assert_one_line_errors(*cases: tuple[Sequence[str], int, str]) -> None:
    """`assert_one_line_error` for each (arguments, exit code, text), the commands run side by side."""
    results = dusa_each(*(args for args, _, _ in cases))
    for (args, code, text), result in zip(cases, results):
        assert result.returncode == code, (args, result.stderr)
        assert_one_line_error(result, code, text)


# What `--gpus 0,1` runs after its CUDA checks; with run.device cpu, two CPU processes (gloo).
LAUNCH = """
from pathlib import Path
from dusa_cli.cli.guard import guarded
from dusa_cli.cli.run import worker
from dusa_cli.config.loader import load_config
from dusa_cli.engine.distributed import launch
from dusa_cli.results.store import stopped_run_outcome

config = load_config(Path({preset!r}), {settings})
guarded(lambda: launch([0, 1], worker, (config, False, True), lambda: stopped_run_outcome(config.run.output)))
"""
LAUNCH_ENV = {"CUDA_VISIBLE_DEVICES": ""}  # the listed "GPUs" need not exist


def launch_command(preset: Path, settings: dict[str, Any]) -> list[str]:
    """A Python command that launches the run of `preset` and `settings` as `--gpus 0,1` would."""
    return [sys.executable, "-c", LAUNCH.format(settings=settings, preset=str(preset))]


def _ended(pid: int) -> bool:
    """Whether the process is a zombie: dead, not yet waited for by its stopped parent."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def die_beside_a_failing_rank(peer_file: str) -> None:
    """A `launch` worker: with the launcher stopped (SIGSTOP), rank 1 is killed by SIGKILL, then
    rank 0 exits with code 1 and has the launcher continued once it is gone, so the launcher
    wakes to find both ended, as when rank 0 fails on a killed peer before the launcher looks."""
    launcher, peer = os.getppid(), Path(peer_file)
    if os.environ["RANK"] == "1":
        os.kill(launcher, signal.SIGSTOP)
        peer.with_suffix(".tmp").write_text(str(os.getpid()))
        peer.with_suffix(".tmp").rename(peer)
        os.kill(os.getpid(), signal.SIGKILL)
    while not (peer.exists() and _ended(int(peer.read_text()))):
        time.sleep(0.01)
    continue_launcher = f"until grep -q ') Z ' /proc/{os.getpid()}/stat; do sleep 0.01; done; kill -CONT {launcher}"
    subprocess.Popen(["sh", "-c", continue_launcher], start_new_session=True)
    os._exit(1)


RACE = """
import sys
sys.path.insert(0, {root!r})  # the spawned processes import the worker from tests.helpers
from dusa_cli.cli.guard import guarded
from dusa_cli.engine.distributed import launch
from tests.helpers import die_beside_a_failing_rank

guarded(lambda: launch([0, 1], die_beside_a_failing_rank, ({peer_file!r},), lambda: "nothing was kept"))
"""


def race_command(peer_file: Path) -> list[str]:
    """A Python command that launches `die_beside_a_failing_rank` as `--gpus 0,1` would."""
    return [sys.executable, "-c", RACE.format(root=str(Path(__file__).parents[1]), peer_file=str(peer_file))]
