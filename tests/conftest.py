"""Shared fixtures: a small real digits-C built once per session."""

from pathlib import Path

import pytest

import dusa_cli  # noqa: F401  (torchvision shim before timm)
from dusa_cli.data.digits import build_digits_c

TINY_CORRUPTIONS = ("gaussian_noise", "fog")


@pytest.fixture(scope="session")
def digits_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full clean train split, 4 test images per class, two corruptions at severity 5."""
    root = tmp_path_factory.mktemp("digits-c")
    build_digits_c(root, seed=0, corruptions=TINY_CORRUPTIONS, severities=[5], workers=1, limit_per_class=4)
    return root
