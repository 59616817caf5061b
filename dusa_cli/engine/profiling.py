"""Where the time goes: a torch.profiler trace (open it in Perfetto or chrome://tracing), a table
of the busiest operations, and the time by kind of work — of one update per recipe in
`dusa bench cls|seg --profile DIR`, of a few micro-batches of a run with `run.profile`.

On a GPU the kinds sum the device's kernels, and the busy share says how much of the recorded
time the GPU computed at all (the rest is launch and host overhead: what CUDA graphs can win
back). On a CPU they sum each operator's own time."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dusa_cli.engine.runtime import synchronize

# Kinds of work by kernel or operator name, first match wins (names are cuBLAS/cuDNN/flash/Triton
# kernels on a GPU, aten operators on a CPU). Inductor's pointwise/reduction kernels name the ops
# they fuse, so they come first; cuDNN's implicit-GEMM convolutions name their pass (fprop,
# dgrad, wgrad), so convolutions are matched before matrix products.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        ("fused (compiled)", r"^triton_(poi|red|per)"),
        ("attention", r"attention|flash|fmha|sdpa"),
        ("convolution", r"conv|fprop|dgrad|wgrad"),
        ("matmul", r"gemm|matmul|addmm|bmm|(^|_|::)mm(_|$)|cutlass|nvjet|xmma|linear"),
        ("optimizer", r"adam|multi_tensor|foreach"),
        ("copies", r"memcpy|memset|copy_|::to\b|_to_copy"),
    )
)
OTHER = "other"


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), OTHER)


def time_by_kind(timings: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(name, microseconds) pairs → milliseconds per kind, largest first."""
    totals: dict[str, float] = {}
    for name, microseconds in timings:
        kind = kind_of(name)
        totals[kind] = totals.get(kind, 0.0) + microseconds / 1000
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def covered(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels of several streams may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _activities(devices: list[torch.device]) -> list[Any]:
    """What to record on `devices`. Also quiets kineto, whose start/stop lines would land amid
    the progress output: its log level above its highest (set KINETO_LOG_LEVEL to see them)."""
    from torch.profiler import ProfilerActivity

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if devices[0].type == "cuda" else [])]


def write_profile(profiler: Any, stem: Path, on_gpu: bool) -> dict[str, Any]:
    """Write STEM.trace.json.gz and STEM.ops.txt for what `profiler` recorded; the time by kind,
    the recorded span and (on a GPU) the share of it in which a kernel ran."""
    from torch.autograd import DeviceType

    stem.parent.mkdir(parents=True, exist_ok=True)
    trace, ops = stem.with_name(stem.name + ".trace.json.gz"), stem.with_name(stem.name + ".ops.txt")
    profiler.export_chrome_trace(str(trace))
    averages = profiler.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    ops.write_text(averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=80))
    events = profiler.events()
    span_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    if on_gpu:
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        by_kind = time_by_kind((event.name, event.time_range.elapsed_us()) for event in kernels)
        busy = covered((e.time_range.start, e.time_range.end) for e in kernels) / span_us
    else:
        by_kind = time_by_kind((average.key, average.self_cpu_time_total) for average in averages)
        busy = None
    return {"wall_ms": span_us / 1000, "ms_by_kind": by_kind, "busy_fraction": busy, "trace": str(trace), "ops": str(ops)}


def profile_update(update: Callable[[], None], devices: list[torch.device], stem: Path) -> dict[str, Any]:
    """Run `update` once under the profiler (benchmarks). With a split model the busy share
    counts the time any of `devices` computed."""
    from torch.profiler import profile

    with profile(activities=_activities(devices)) as profiler:
        update()
        synchronize(devices)
    return write_profile(profiler, stem, devices[0].type == "cuda")


# A run's profile: the first micro-batch is skipped (lazy initialisation, autotuning,
# compilation), the next one warms the profiler up, the three after it are recorded.
RUN_SCHEDULE = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}


def step_profiler(devices: list[torch.device], directory: Path) -> Any:
    """A profiler for `run.profile`, stepped once per micro-batch (OnlineAdapter.profiler):
    when its steps are recorded it writes DIRECTORY/steps.* and DIRECTORY/summary.json."""
    from torch.profiler import profile, schedule

    from dusa_cli.writing import write_json_atomic

    def ready(profiler: Any) -> None:
        summary = write_profile(profiler, directory / "steps", devices[0].type == "cuda")
        # Fewer than `active` when the first task ends first: wall_ms spans the steps recorded.
        steps = sum(average.count for average in profiler.key_averages() if average.key.startswith("ProfilerStep"))
        write_json_atomic(directory / "summary.json", summary | {"schedule": RUN_SCHEDULE, "steps_recorded": steps})

    # One cycle (repeat 1): that a new cycle would clear the events, as torch 2.11 warns, never applies.
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
    return profile(activities=_activities(devices), schedule=schedule(**RUN_SCHEDULE), on_trace_ready=ready)


def profile_to_rich(title: str, rows: list[dict[str, Any]]):
    """One column per profiled recipe: milliseconds by kind of work, and the GPU's busy share."""
    from rich.table import Table

    profiled = [row for row in rows if row.get("profile")]
    table = Table(title=title, header_style="bold")
    table.add_column("kind of work")
    for row in profiled:
        table.add_column(f"{row['name']} ms", justify="right")
    kinds = list(dict.fromkeys(kind for row in profiled for kind in row["profile"]["ms_by_kind"]))
    for kind in kinds:
        table.add_row(kind, *(f"{row['profile']['ms_by_kind'].get(kind, 0.0):.1f}" for row in profiled))
    table.add_row("update (wall)", *(f"{row['profile']['wall_ms']:.1f}" for row in profiled), style="bold")
    busy = [row["profile"]["busy_fraction"] for row in profiled]
    if any(fraction is not None for fraction in busy):
        table.add_row("GPU busy", *("–" if f is None else f"{100 * f:.1f} %" for f in busy))
    table.caption = "traces and operator tables: " + ", ".join(row["profile"]["trace"] for row in profiled)
    return table
