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
from dusa_cli.config.loader import input_paths
from dusa_cli.config.schema import ExperimentConfig
from dusa_cli.data.files import file_sha256, head_tail_sha256, sha256_hex
from dusa_cli.results.store import DATA_MANIFEST

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
    try:
        changes = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):  # a slow status (a huge or remote checkout): unknown
        return result.stdout.strip() + "-status-unknown"
    # Dirty: a tracked file changed, or a new file in the package (a method file registers itself
    # on import). Other new files, such as a user's own results folder, leave the code as committed.
    dirty = any(not line.startswith("?? ") or line[3:].startswith("dusa_cli/") for line in changes)
    return result.stdout.strip() + ("-dirty" if dirty else "")


FULL_HASH_LIMIT = 64 << 20  # configs, tokenizers, small weights: hashed whole
SAMPLE_BYTES = 4 << 20
# The key says what was hashed, so that nobody takes it for a sha256 of the whole file.
SAMPLED_SHA256 = f"sha256_of_size_first_and_last_{SAMPLE_BYTES >> 20}MiB"


# A folder of more files than this (an image set such as ImageNet's val, EATA's Fisher data) is
# recorded by its listing, not file by file: 50,000 hashes would read gigabytes at every start.
LISTED_FILES_LIMIT = 10_000


def folder_record(folder: Path) -> dict[str, Any]:
    """`files`: every file under `folder` by relative path (hidden ones such as .git skipped), its
    size and sha256, or, over FULL_HASH_LIMIT, the sha256 of its size and first and last
    SAMPLE_BYTES, so that a 15 GB SD3 folder costs a few tens of MiB of reading, not minutes.
    Over LISTED_FILES_LIMIT files: `file_count` and `listing_sha256`, of their names and sizes."""
    listed = [(path, path.relative_to(folder)) for path in sorted(folder.rglob("*"))]
    paths = [(path, relative) for path, relative in listed if not any(part.startswith(".") for part in relative.parts) and path.is_file()]
    if len(paths) > LISTED_FILES_LIMIT:
        listing = "".join(f"{relative.as_posix()}\t{path.stat().st_size}\n" for path, relative in paths)
        return {"file_count": len(paths), "listing_sha256": sha256_hex(listing.encode())}
    files: dict[str, dict[str, int | str]] = {}
    for path, relative in paths:
        size = path.stat().st_size
        if size <= FULL_HASH_LIMIT:
            files[relative.as_posix()] = {"size": size, "sha256": file_sha256(path)}
        else:
            files[relative.as_posix()] = {"size": size, SAMPLED_SHA256: head_tail_sha256(path, SAMPLE_BYTES)}
    return {"files": files}


def input_files(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """What a run read by path: every config value naming a file (weights) with its sha256, every
    one naming a folder (a SegFormer or SD3 directory, a VAE, label maps) with `folder_record`, and
    the data's manifest.json (written by prepare-data, with a sha256 per image), so that rebuilt
    data or other weights show in the record. Packaged weights are fixed by the dusa version."""
    named = input_paths(config)
    named[DATA_MANIFEST] = named.pop("data.root") / "manifest.json"  # a sha256 per image: the data's record
    records: dict[str, dict[str, Any]] = {}
    for key, path in named.items():
        if path.is_file():
            records[key] = {"path": str(path), "sha256": file_sha256(path)}
        elif path.is_dir():
            records[key] = {"path": str(path)} | folder_record(path)
    return records


def device_name(device: torch.device) -> str:
    """The GPU's model name ("NVIDIA H100 80GB HBM3"), or the CPU's ("AMD EPYC 9654 96-Core
    Processor" from Linux's /proc/cpuinfo; platform.processor() elsewhere, which on Linux says
    only "x86_64"), or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next(line.partition(":")[2].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


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
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "inputs": input_files(config),
    }
