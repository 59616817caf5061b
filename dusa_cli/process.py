"""Which process of a run this is: torchrun's RANK, read without importing torch (the error and
stop paths ask before, or without, any model loading)."""

from __future__ import annotations

import os


def process_rank() -> str:
    """torchrun's RANK; "0" for a process alone."""
    return os.environ.get("RANK", "0")


def is_main_process() -> bool:
    """Rank 0, or a single process (true before any process group exists)."""
    return process_rank() == "0"
