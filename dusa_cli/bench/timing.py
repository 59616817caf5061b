"""What both benches share: recipes run in turn (one that runs out of memory is a row, not the
end), timed updates after a warm-up, the ratios and captions of their tables."""

from __future__ import annotations

import gc
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from dusa_cli.collectives import first_line
from dusa_cli.engine.runtime import reset_peak_memory, synchronize
from dusa_cli.errors import DusaError


def unless_out_of_memory(recipe: Any, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A recipe that does not fit, or fails otherwise (a compiler error in one variant), is a
    row that says so, not the end of the benchmark: on a lent GPU the recipes after it still run.
    Its memory and compiled code are released before the next recipe is built."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return asdict(recipe) | {"out_of_memory": True}
    except DusaError:  # the options are wrong (a recipe that cannot be built): every recipe would fail
        raise
    except Exception as failure:  # said in the row and a warning; --debug prints the traceback
        if os.environ.get("DUSA_DEBUG") == "1":
            traceback.print_exc()
        message = f"{type(failure).__name__}: {first_line(failure)}"
        warnings.warn(f"recipe {recipe.name} failed: {message}", stacklevel=2)
        return asdict(recipe) | {"failed": message}
    finally:
        release_compiled_and_memory()


def release_compiled_and_memory() -> None:
    """Drop compiled code and cached GPU memory between runs of a benchmark. Kept, compiled code
    would hold CUDA graph pools, and its cache entries would count toward Dynamo's recompile limit
    (8 per code object, which `nn.Module.compile` shares between modules): past it, a later recipe
    would run eager under a "compiled" label. The collection frees models held in reference cycles
    (an adapter and its method point at each other)."""
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_run(row: dict[str, Any]) -> str | None:
    """Why a recipe has no figures ("out of memory", "failed"), or None."""
    return "out of memory" if row.get("out_of_memory") else ("failed" if row.get("failed") else None)


def compiled_graphs() -> int:
    """The graphs Dynamo has compiled in this process so far: a recipe that asks for torch.compile
    and adds none ran eager."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# Told what a benchmark is doing ("recipe 1/2 official: timed update 3/5"), for a progress line.
Say = Callable[[str], None]


def run_recipes(
    recipes: tuple[Any, ...],
    run: Callable[[Any, Say], dict[str, Any]],
    result_of: Callable[[list[dict[str, Any]]], dict[str, Any]],
    on_result: Callable[[dict[str, Any]], None] | None = None,
    say: Say | None = None,
) -> dict[str, Any]:
    """Each recipe in turn; `on_result` sees the result so far after every row (`complete`
    False until the last), so a benchmark cut short keeps the figures of the recipes it finished.
    `run` reports its steps through the `Say` it is given, which `say` receives with the recipe named."""
    rows: list[dict[str, Any]] = []
    for index, recipe in enumerate(recipes):
        prefix = f"recipe {index + 1}/{len(recipes)} {recipe.name}: "
        told = (lambda text: say(prefix + text)) if say is not None else (lambda text: None)
        rows.append(unless_out_of_memory(recipe, lambda: run(recipe, told)))
        if on_result is not None:
            on_result(result_of(rows) | {"complete": len(rows) == len(recipes)})
    return result_of(rows) | {"complete": True}


def time_updates(update: Callable[[], None], *, warmup: int, updates: int, devices: list[torch.device], say: Say) -> float:
    """Seconds for `updates` calls of `update` after `warmup` untimed ones (compilation, autotuning,
    allocator warm-up); each device's peak memory counts from the timed calls on."""
    for index in range(warmup):
        say(f"warm-up update {index + 1}/{warmup}")
        update()
    synchronize(devices)
    for device in devices:
        reset_peak_memory(device)
    start = time.perf_counter()
    for index in range(updates):
        say(f"timed update {index + 1}/{updates}")
        update()
    synchronize(devices)
    return time.perf_counter() - start


def file_stem(name: str) -> str:
    """A recipe's name as a file name: `fast mb=32 ckpt=8` → `fast_mb_32_ckpt_8`."""
    return re.sub(r"[^\w.-]+", "_", name)


def ratio(rows: list[dict[str, Any]], key: str, numerator: str, denominator: str) -> float | None:
    """rows[numerator][key] / rows[denominator][key], None unless both recipes ran."""
    by_name = {row["name"]: row for row in rows if not not_run(row)}
    if not {numerator, denominator} <= by_name.keys():
        return None
    return by_name[numerator][key] / by_name[denominator][key]


def caption(figures: list[str], result: dict[str, Any]) -> str | None:
    """A bench table's caption: its ratios, and a warning that ratios without warm-up compare
    cold starts (first allocations, compilation) rather than steady updates."""
    cold = ["no warm-up: the timed updates include one-off costs"] if result["warmup"] == 0 else []
    return "; ".join(figures + cold) or None
