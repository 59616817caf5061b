"""Stop signals: Ctrl-C (SIGINT), a scheduler's SIGTERM and a closed terminal's SIGHUP end a
command the way Ctrl-C does. It unwinds (finally blocks run, atomic writes remove their temporary
files, finished tasks stay saved) and exits with one line and 128 + the signal's number. A second
Ctrl-C ends the process at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from dusa_cli.errors import ExitCode, Interrupted, Stopped
from dusa_cli.process import is_main_process

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
SAVED = "every finished task is saved (continue with --resume)"  # what a stopped run keeps, if any
OUTCOME = "dusa_outcome"  # the attribute of a KeyboardInterrupt that says what the stop kept (outcome_on_stop)

Handler = Callable[[int, FrameType | None], Any]


@contextmanager
def handling(handler: Handler) -> Iterator[None]:
    """`handler` for the stop signals while the block runs, the previous handlers after. Only the
    main thread may set handlers (elsewhere this does nothing). A signal the process ignores stays
    ignored: nohup ignores SIGHUP; a shell's background job, SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(number, handler)
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, signal.SIG_DFL if before is None else before)  # None: not set from Python


@contextmanager
def stoppable(outcome: str = "", report: bool = True) -> Iterator[None]:
    """The block (a context manager, or a decorator of a function) stops at the first stop signal
    as at Ctrl-C, and ends in Interrupted, its message followed by `outcome`. Only rank 0 says it;
    no process does with `report` false (the --gpus launcher reports for its workers).

    Typer would turn the KeyboardInterrupt of a command into a silent exit 130. A stop whose
    exception something swallowed (Python drops one raised in a ctypes callback, as numba's
    compiler runs) still ends the block in Interrupted, when it finishes."""
    stopped: int | None = None  # the first stop signal's number

    def stop(number: int, frame: FrameType | None) -> None:
        nonlocal stopped
        # Only the first: more may follow (a scheduler signals every process, and the --gpus
        # launcher forwards its own), and raising again would break off the unwinding.
        if stopped is None:
            stopped = number
            if not _shields:
                raise_outside_imports(Stopped(number), frame)
        elif number == signal.SIGINT:  # Ctrl-C again: a person who will not wait for the unwinding
            quit_at_once(outcome, report)

    try:
        with handling(stop):
            yield
    except KeyboardInterrupt as interrupt:
        raise interrupted(interrupt, outcome, report) from interrupt
    finally:
        cancel_retry()
    if stopped is not None:
        raise interrupted(Stopped(stopped), outcome, report)


_shields = 0  # how many shielded() blocks are running


@contextmanager
def shielded() -> Iterator[None]:
    """A stop signal during the block is noted, not raised, so the block's work is not cut in
    half: a failed run's last save, which the SIGTERM torchrun sends the other processes when one
    fails would otherwise interrupt (leaving results.json "running"). The stoppable() block around
    it ends as stopped when it finishes, or in the error already under way, the one to report."""
    global _shields
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1


RETRY_SECONDS = 0.02
_retry_previous: Any = None  # the SIGALRM handler before a retry was armed


def raise_outside_imports(stop: Stopped, frame: FrameType | None) -> None:
    """Raise `stop` now or, in the middle of an import, once it is over: an exception there leaves
    a module half-loaded (numpy then refuses to load again, and the command fails on an unrelated
    error) or ends the process (torch's C++ initialisation calls back into Python, which cannot
    raise through it). A timer (SIGALRM) looks again every 20 ms; without one, it raises now."""
    global _retry_previous
    if not hasattr(signal, "setitimer") or not _importing(frame):
        raise stop

    def retry(_number: int, frame: FrameType | None) -> None:
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
            return
        cancel_retry()
        raise stop

    _retry_previous = signal.signal(signal.SIGALRM, retry)
    signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)


def cancel_retry() -> None:
    """Disarm a pending retry of `raise_outside_imports` and put SIGALRM's handler back."""
    global _retry_previous
    if _retry_previous is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _retry_previous)
        _retry_previous = None


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import: a module's own code or an extension's set-up."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def outcome_on_stop(describe: Callable[[], str]) -> Iterator[None]:
    """A stop that ends the block says `describe()` (called as it leaves the block: what the stop
    kept) in place of the outcome its stoppable() was given."""
    try:
        yield
    except KeyboardInterrupt as stop:
        setattr(stop, OUTCOME, describe())
        raise


def interrupted(interrupt: KeyboardInterrupt, outcome: str = "", report: bool = True) -> Interrupted:
    """The Interrupted error of a KeyboardInterrupt: Ctrl-C, or the signal that Stopped carries."""
    number = interrupt.signal if isinstance(interrupt, Stopped) else signal.SIGINT
    return Interrupted(number, getattr(interrupt, OUTCOME, outcome), silent=not _says(report))


def quit_at_once(outcome: str = "", report: bool = True) -> None:
    """End the process now, without unwinding: what a write in progress leaves, --resume removes.
    The line is written directly: the signal may have come in the middle of rich's output."""
    if _says(report):
        os.write(2, f"error: interrupted again, quit at once{f'; {outcome}' if outcome else ''}\n".encode())
    os._exit(ExitCode.INTERRUPTED)


def _says(report: bool) -> bool:
    """Whether this process reports a stop: rank 0 alone, and not where another process does."""
    return report and is_main_process()
