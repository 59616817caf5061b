"""User-facing errors and the exit codes the CLI maps them to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1  # a run failed on its inputs (data, checkpoint, output directory)
    USAGE = 2  # bad flags or config (Typer/Click also use 2 for usage errors)
    INTERRUPTED = 130


class DusaError(Exception):
    """An error the user can fix; the CLI prints its message on one line, no traceback."""

    exit_code: ExitCode = ExitCode.RUNTIME


class ConfigError(DusaError):
    """Invalid YAML, unknown keys, bad values or overrides."""

    exit_code = ExitCode.USAGE
