"""User-facing errors and the exit codes the CLI maps them to."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable, Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1  # a run failed on its inputs (data, checkpoint, output directory)
    USAGE = 2  # bad flags or config (Typer/Click also use 2 for usage errors)
    # Ctrl-C: 128 + SIGINT. SIGTERM and SIGHUP exit 128 + their numbers too (143, 129): the codes
    # a shell gives a process that the signal killed.
    INTERRUPTED = 130


class DusaError(Exception):
    """An error the user can fix; the CLI prints its message on one line, no traceback."""

    exit_code: ExitCode = ExitCode.RUNTIME


class ConfigError(DusaError):
    """Invalid YAML, unknown keys, bad values or overrides."""

    exit_code = ExitCode.USAGE


class Stopped(KeyboardInterrupt):
    """Raised by the handlers of the stop signals (dusa_cli.stopping), so that a run unwinds as at
    Ctrl-C: finally blocks run, atomic writes remove their temporary files."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.signal = number


class Interrupted(DusaError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the command. Not a failure: never a traceback, even
    with --debug. Silent (no message) where another process reports the stop."""

    def __init__(self, number: int, outcome: str = "", silent: bool = False):
        what = "interrupted" if number == signal.SIGINT else f"stopped by {signal.Signals(number).name}"
        message = f"{what}; {outcome}" if outcome else what
        super().__init__("" if silent else message)
        self.exit_code = 128 + number  # type: ignore[assignment]


def listed(names: Sequence[str], limit: int = 4) -> str:
    """`a, b, c, d and 3 more`: names in one line, the first `limit` of them."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`, did you mean 'x'?` for the choice closest to a mistyped name, `'x' or 'y'` where two are
    about as close ('gausian': gaussian_blur and gaussian_noise); empty if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    best = difflib.SequenceMatcher(None, name, close[0]).ratio()
    close = [choice for choice in close if difflib.SequenceMatcher(None, name, choice).ratio() >= best - 0.05]
    return f", did you mean {' or '.join(repr(choice) for choice in close)}?"
