"""Experiment tracking (seed 000): each finished task's scores and online curve as TensorBoard
scalars in OUTPUT/tensorboard, written by the process that writes the results. Offline by
construction: event files on disk. Weights & Biases imports them
(`wandb sync --sync-tensorboard OUTPUT/tensorboard`).

Tags: `<corruption>/<severity>/<curve key>` against the images seen in the task; `stream/<curve
key>` against the images seen since the run's first task (a continual run's curve across its
shifts); `tasks/<score>` against the task's place in the plan.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dusa_cli.errors import ConfigError
from dusa_cli.results.store import task_id

INSTALL_HINT = "pip install tensorboard (or, in dusa's checkout: pip install -e '.[track]')"


class TensorBoardTracker:
    files = "events.out.tfevents.*"  # what it writes in its folder (a restarted run removes them)

    @staticmethod
    def check() -> None:
        """ConfigError unless the tracker can run (checked before the run writes anything)."""
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"run.track names tensorboard, but the tensorboard package is not installed: {INSTALL_HINT}")

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def log_task(self, records: list[dict[str, Any]], plan: list[str]) -> None:
        """The last of the run's finished `records`, placed by its index in `plan` (the task ids
        in the run's order) and, on the stream, after the images of the records before it."""
        record, images_before = records[-1], sum(earlier["num_samples"] for earlier in records[:-1])
        task = task_id(record["corruption"], record["severity"])
        position = plan.index(task)
        curve = record["curve"]
        for key, values in curve.items():
            if key == "images":
                continue
            for images, value in zip(curve["images"], values):
                self.writer.add_scalar(f"{task}/{key}", value, images)
                self.writer.add_scalar(f"stream/{key}", value, images_before + images)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "severity":
                self.writer.add_scalar(f"tasks/{key}", value, position)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# run.track's names; a tracker takes its folder under the run's output and logs finished tasks.
TRACKERS = {"tensorboard": TensorBoardTracker}


def check_trackers(names: list[str]) -> None:
    for name in names:
        TRACKERS[name].check()


def open_trackers(names: list[str], output: Path, finished: list[dict[str, Any]], plan: list[str]) -> list[TensorBoardTracker]:
    """The run's trackers, each under OUTPUT/<name>, holding every task of `finished` (the
    records results.json keeps; `plan`: the task ids in the run's order) once: a run that starts
    from its first task drops what an earlier session of it logged (its results.json was removed),
    and tracking turned on at --resume logs the tasks finished before."""
    trackers = []
    for name in names:
        directory = output / name
        earlier = sorted(directory.glob(TRACKERS[name].files)) if directory.is_dir() else []
        if not finished:
            for stale in earlier:
                stale.unlink()
        tracker = TRACKERS[name](directory)
        if finished and not earlier:
            for end in range(1, len(finished) + 1):
                tracker.log_task(finished[:end], plan)
        trackers.append(tracker)
    return trackers
