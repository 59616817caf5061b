"""`dusa ARGS` in a process of its own without importing torch again for each command.

Most of a short `dusa` run on a CPU is its imports (torch, timm and, through torchvision,
torch._dynamo: about 2.5 s of a 4 s run), and the suite runs over a hundred commands. A server
process imports the CLI once, then forks a child per command: the child sets the command's
working directory, environment, arguments and output files, calls `main()` as `python -m
dusa_cli` does, and its exit status is the command's. Only the imports are shared, so the child
starts where a fresh `dusa` would be after them. It ends as Python would (threads joined, atexit
handlers run, output flushed) but without tearing the modules down, which costs a child more
than the command itself (the module objects' pages are copied as teardown touches them). Tests
about the start of a process (a stop during the imports, what a command imports, signals to a
run) start `python -m dusa_cli`.

Forking after the imports is safe here: the server runs no computation, so torch's OpenMP pool
does not exist yet (a child sets its own thread count), and the one other thread is the idle
pool of numpy's OpenBLAS, as in any process that imports numpy and forks (multiprocessing's
default start on Linux, a DataLoader's workers).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

SERVER = """
import atexit, json, os, signal, sys, threading, time, warnings

import torch

import dusa_cli.cli
import dusa_cli.engine.loop  # what a run imports: timm, torchvision, torch._dynamo, ...

assert not torch.cuda.is_initialized()  # a forked child could not use CUDA after it

# Python 3.12 warns at every fork of a process with threads; the only other one is OpenBLAS's (above).
warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
threads = torch.get_num_threads()
for line in sys.stdin:
    request = json.loads(line)
    child = os.fork()
    if child == 0:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY), (2, request["stderr"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        # OpenMP read OMP_NUM_THREADS when torch loaded, in the server, which was started without it.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads)))
        sys.argv = ["dusa", *request["args"]]
        try:
            dusa_cli.cli.main()
            status = 0
        except SystemExit as end:  # as Python ends on one: None is 0, an int itself, another object printed and 1
            status = 0 if end.code is None else end.code
            if not isinstance(status, int):
                print(status, file=sys.stderr)
                status = 1
        # The end of `python -m dusa_cli` without the interpreter's teardown, which here touches
        # every object the server imported, each page then copied (copy-on-write): 1.3 s a command.
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    deadline = time.monotonic() + request["timeout"]
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if ended[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        print("timeout", flush=True)
    else:
        print(os.waitstatus_to_exitcode(ended[1]), flush=True)
"""


class ForkServer:
    """One server process, one command at a time. `env`: the environment its imports see."""

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, args: Sequence[str], cwd: Path | None, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dusa_cli", *args]
        with tempfile.TemporaryDirectory() as folder:
            stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
            stdout.touch(), stderr.touch()
            request = {"args": list(args), "cwd": str(cwd or os.getcwd()), "env": env, "timeout": timeout,
                       "stdout": str(stdout), "stderr": str(stderr)}  # fmt: skip
            assert self.process.stdin and self.process.stdout
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline().strip()
            if not reply:
                raise RuntimeError(f"the fork server ended (exit {self.process.wait()})")
            if reply == "timeout":
                raise subprocess.TimeoutExpired(command, timeout)
            return subprocess.CompletedProcess(command, int(reply), stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


_idle: list[ForkServer] = []
_lock = threading.Lock()
# Read when a server imports, so left to each command: torch's thread count (set in the child) and
# the terminal width (rich's consoles, made at import, read COLUMNS at each use when it was unset).
PER_COMMAND = ("OMP_NUM_THREADS", "COLUMNS")


def run(args: Sequence[str], cwd: Path | None, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`dusa ARGS` in `cwd` with `env`, as `subprocess.run(..., capture_output=True, text=True)`
    would give it; commands run side by side in servers of their own."""
    with _lock:
        server = _idle.pop() if _idle else None
    if server is None:
        server = ForkServer({key: value for key, value in env.items() if key not in PER_COMMAND})
    try:
        return server.run(args, cwd, env, timeout)
    finally:
        if server.process.poll() is None:
            with _lock:
                _idle.append(server)
        else:
            server.close()


@atexit.register
def _close() -> None:
    for server in _idle:
        server.close()
