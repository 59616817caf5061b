"""How a command ends: one error line (its traceback with --debug) and an exit code that means something."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from dusa_cli.errors import DusaError, ExitCode, Interrupted
from dusa_cli.process import is_main_process, process_rank
from dusa_cli.stopping import interrupted


def guarded(call: Callable[[], Any]) -> None:
    """Run `call`; a failure ends the process with one line (after its traceback with --debug)
    and its exit code. Ranks other than 0 name themselves; one process reports a stop (stopping.py)."""
    debug = os.environ.get("DUSA_DEBUG") == "1"
    origin = "" if is_main_process() else f"rank {process_rank()}: "
    from dusa_cli.ui import error

    if not debug:  # warnings in one line too (with --debug: Python's, saying where they came from)
        warnings.showwarning = _show_warning

    try:
        call()
    except (DusaError, KeyboardInterrupt, OSError) as caught:
        # A KeyboardInterrupt here came before any command's stoppable(): Ctrl-C while Typer sets up.
        # An OSError is a path the system refused (too long, a file where a folder goes): the user's.
        if isinstance(caught, DusaError):
            failure = caught
        elif isinstance(caught, OSError):
            failure = DusaError(f"{caught.strerror or caught}: {caught.filename}" if caught.filename else str(caught))
        else:
            failure = interrupted(caught)
        if debug and not isinstance(failure, Interrupted):
            traceback.print_exc()
        if str(failure):  # empty: another process reports it (ReportedElsewhere, Interrupted)
            error(origin + _own_message(failure))
        _exit(int(failure.exit_code))
    except Exception as failure:  # anything unexpected still ends in one line (traceback with --debug)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        error(f"{origin}internal error: {type(failure).__name__}: {failure}{hint}")
        _exit(int(ExitCode.RUNTIME))


def _show_warning(message: Warning | str, *_where: Any, **_: Any) -> None:
    """A warning in one line, from rank 0 only: every process runs the same config on the same
    data, so the others would repeat it."""
    if is_main_process():
        from dusa_cli.ui import warn

        warn(str(message))


def _own_message(failure: DusaError) -> str:
    """The error's message. A DataLoader worker's error comes back with the worker's traceback
    prepended; its last line is the message (after the exception's class name)."""
    text = str(failure).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(failure).__module__}.{type(failure).__name__}: "
    return last.removeprefix(name)


def _exit(code: int) -> None:
    """Exit with `code`. A process whose run failed inside a process group skips interpreter
    teardown: destroying a gloo/NCCL group with a lost peer can block or abort (SIGABRT), which
    would replace the one-line error and its exit code with a crash report."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no second's import)
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The outcome is said: another Ctrl-C in the teardown (atexit handlers, data workers) ends
    # the process at once, where it would print a traceback from whichever handler it broke.
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    sys.exit(code)
