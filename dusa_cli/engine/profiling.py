"""Where an update's time goes (`dusa bench cls|seg --profile DIR`): a torch.profiler trace of one
update (open it in Perfetto or chrome://tracing), a table of its busiest operations, and the time
by kind of work. On a GPU the kinds sum the device's kernels, and the busy share says how much of
the update's wall time the GPU computed at all (the rest is launch and host overhead: what CUDA
graphs can win back). On a CPU they sum each operator's own time."""

from __future__ import annotations

import re
import time
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


def profile_update(update: Callable[[], None], devices: list[torch.device], stem: Path) -> dict[str, Any]:
    """Run `update` once under the profiler; write STEM.trace.json.gz and STEM.ops.txt. With a
    split model the busy share counts the time any of `devices` computed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = devices[0].type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    stem.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        update()
        synchronize(devices)
        wall_ms = (time.perf_counter() - start) * 1000
    profiler.export_chrome_trace(str(stem.with_name(stem.name + ".trace.json.gz")))
    averages = profiler.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    ops = stem.with_name(stem.name + ".ops.txt")
    ops.write_text(averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=80))
    if on_gpu:
        kernels = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
        by_kind = time_by_kind((event.name, event.time_range.elapsed_us()) for event in kernels)
        busy_ms = covered((e.time_range.start, e.time_range.end) for e in kernels) / 1000
    else:
        by_kind = time_by_kind((average.key, average.self_cpu_time_total) for average in averages)
        busy_ms = None
    return {
        "wall_ms": wall_ms,
        "ms_by_kind": by_kind,
        "busy_fraction": busy_ms / wall_ms if busy_ms is not None else None,
        "trace": str(stem.with_name(stem.name + ".trace.json.gz")),
        "ops": str(ops),
    }


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
