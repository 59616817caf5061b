"""Terminal output: rich progress bars on stderr (so stdout stays pipeable) and error lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stdout = Console()
stderr = Console(stderr=True)
SCORE_PERIOD_S = 0.5  # how often a progress bar reads the running score
NOT_YET = "–"  # a task's score and speed before it has scored an image (0.0 % would read as a result)


def wide_stdout(width: int = 160) -> Console:
    """stdout for wide tables: the terminal as it is, or `width` columns when piped into a log
    (where rich would otherwise fold a table into 80 columns)."""
    return stdout if stdout.is_terminal else Console(width=width)


def error(message: str) -> None:
    # Messages quote paths and library errors: brackets in them are text, not rich markup.
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    stderr.print(escape(message), highlight=False, soft_wrap=True)


class _Bars:
    """A rich progress display on stderr, started and stopped as a context manager."""

    def __init__(self, *columns: ProgressColumn, enabled: bool):
        self.progress = Progress(
            *columns, BarColumn(), MofNCompleteColumn(), *self.extra_columns(), TextColumn("eta"),
            TimeRemainingColumn(), console=stderr, disable=not enabled,
        )
        self.task_id: TaskID | None = None

    def extra_columns(self) -> tuple[ProgressColumn, ...]:
        return ()

    def __enter__(self):
        return self  # shown from the first report on (show): checks that fail first leave no empty bar

    def show(self) -> None:
        self.progress.start()  # once: rich starts a display only once

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:  # rich's stop() prints a blank line when not on a terminal
            self.progress.stop()


class TaskProgress(_Bars):
    """One bar per task with the running online score (accuracy, mIoU), throughput and ETA."""

    def __init__(self, enabled: bool = True, score: str = "acc"):
        self.score = score
        super().__init__(TextColumn("[bold]{task.description:<24}"), enabled=enabled)

    def extra_columns(self) -> tuple[ProgressColumn, ...]:
        return (TextColumn(self.score + " {task.fields[score]:>6}"), TextColumn("{task.fields[rate]:>6} img/s"))

    def start_task(self, name: str, total: int) -> None:
        self.show()
        self.task_id = self.progress.add_task(name, total=total, score=NOT_YET, rate=NOT_YET)
        self.score_read = 0.0

    def advance(self, images: int, score: Callable[[], float]) -> None:
        """The score is read (a host sync on a GPU) at most every SCORE_PERIOD_S, and at the end."""
        self.progress.update(self.task_id, advance=images)
        task = self.progress.tasks[-1]
        now = time.monotonic()
        if not self.progress.disable and (now - self.score_read >= SCORE_PERIOD_S or task.finished):
            self.progress.update(self.task_id, score=f"{score():.1%}")
            self.score_read = now
        # rich estimates the speed from two reports on; a task of one batch gets its average.
        speed = task.speed or (task.completed / task.elapsed if task.finished and task.elapsed else None)
        if speed:
            self.progress.update(self.task_id, rate=f"{speed:.1f}")

    def end_task(self, score: float) -> None:
        """The bar keeps the task's score over every process (what results.json records)."""
        self.progress.update(self.task_id, score=f"{score:.1%}")
        self.task_id = None


class FileProgress(_Bars):
    """A single bar for data preparation or training, fed with (done, total) callbacks."""

    def __init__(self, description: str, enabled: bool = True):
        super().__init__(TextColumn("[bold]{task.description}"), enabled=enabled)
        self.description = description

    def extra_columns(self) -> tuple[ProgressColumn, ...]:
        return (TimeElapsedColumn(),)

    def __enter__(self):
        self.task_id = self.progress.add_task(self.description, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self.show()
        self.progress.update(self.task_id, completed=done, total=total)


class StatusLine:
    """What a long step without a count is doing (a benchmark's recipe and update), with the
    seconds since the start: a spinner line on a terminal, a line per step in a log."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.spinner = stderr.status("") if enabled and stderr.is_terminal else None
        self.start = time.monotonic()

    def __enter__(self):
        if self.spinner is not None:
            self.spinner.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.spinner is not None:
            self.spinner.stop()

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.monotonic() - self.start:5.0f} s] {text}"
        if self.spinner is not None:
            self.spinner.update(escape(line))
        else:
            info(line)
