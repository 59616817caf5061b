"""What a result was produced with: packages, device, code version, command, input files."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dusa_cli import __version__
from dusa_cli._compat import TORCHVISION_STATUS
from dusa_cli.config.loader import flatten
from dusa_cli.config.schema import ExperimentConfig
from dusa_cli.data.files import file_sha256

PACKAGES = (
    "torch", "torchvision", "timm", "transformers", "diffusers", "torchmetrics",
    "pydantic", "numpy", "pillow", "imagecorruptions-imaug", "scikit-learn",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


CHECKOUT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = CHECKOUT) -> str | None:
    """The project's commit when dusa runs from a checkout (None for an installed copy)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    changes = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain"],
        capture_output=True, text=True, timeout=5,
    ).stdout.splitlines()
    # Dirty: a tracked file changed, or a new file in the package (a method file registers itself
    # on import). Other new files, such as a user's own results folder, leave the code as committed.
    dirty = any(not line.startswith("?? ") or line[3:].startswith("dusa_cli/") for line in changes)
    return result.stdout.strip() + ("-dirty" if dirty else "")


def input_files(config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """The files a run read by path, with their sha256: every config value naming a file
    (weights) and the data's manifest.json (written by prepare-data, with a sha256 per image), so
    a rebuilt dataset or retrained weights show in the record. Folders (SD3, SegFormer) are not
    hashed; packaged weights are fixed by the dusa version."""
    named = {key: Path(value) for key, value in flatten(config.model_dump(mode="json")).items() if isinstance(value, str)}
    named["data.root/manifest.json"] = config.data.root / "manifest.json"
    return {
        key: {"path": str(path), "sha256": file_sha256(path)}
        for key, path in named.items()
        if path.is_absolute() and path.is_file()
    }


def collect_environment(device: torch.device, config: ExperimentConfig) -> dict[str, Any]:
    return {
        "dusa_version": __version__,
        "git_commit": git_commit(),
        "command": sys.argv,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "torchvision_ops": TORCHVISION_STATUS,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "inputs": input_files(config),
    }
