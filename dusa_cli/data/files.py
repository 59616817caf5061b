"""Helpers shared by the dataset builders and readers: files, and the cores their workers may use."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from dusa_cli.errors import DusaError, listed


def absolute_path(path: Path) -> Path:
    """`~` expanded and made absolute, symlinks kept: how run configs and dataset settings store
    paths, so that they name the same files from any working directory."""
    return Path(os.path.abspath(os.path.expanduser(path)))


# Suffixes read as images, compared in lower case (ImageNet ships `.JPEG`).
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"})


def require_directory(path: Path, what: str) -> None:
    """Raise a one-line DusaError unless `path` is an existing directory."""
    if not path.exists():
        raise DusaError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DusaError(f"{what} is not a directory: {path}")


# Lies in a `dusa prepare-data` output from its first image until its manifest.json is written.
UNFINISHED_MARKER = ".dusa-unfinished"
PREPARE_HINT = "`dusa prepare-data` builds digits-c, ImageNet-C and ADE20K-C"  # for a missing data root


def require_data_root(root: Path) -> None:
    """A dataset root must exist, and a build of `dusa prepare-data` must have finished (an
    interrupted one holds some images of a task only); the errors say what to do."""
    if not root.exists():
        raise DusaError(f"data directory not found: {root} ({PREPARE_HINT})")
    require_directory(root, "data directory")
    if (root / UNFINISHED_MARKER).exists():
        raise DusaError(f"{root} is an unfinished build of `dusa prepare-data`: run the same command again to complete it")


def require_tasks(
    root: Path, corruptions: Sequence[str], severities: Sequence[int], find: Callable[[Path, str, int], Path | None], layout: str
) -> None:
    """Every (corruption, severity) has data under `root` (`find` says where, None if nowhere), or
    one error names each corruption that lacks some, with the severities it lacks (`fog/3`,
    `snow/{1,5}`): a partial dataset is found out at once, before any model is built."""
    require_data_root(root)
    names = []
    for corruption in corruptions:
        absent = [str(severity) for severity in severities if find(root, corruption, severity) is None]
        if absent:
            names.append(f"{corruption}/{absent[0]}" if len(absent) == 1 else f"{corruption}/{{{','.join(absent)}}}")
    if names:
        counted = f"{len(names)} of the {len(corruptions)} corruptions: " if len(corruptions) > 1 else ""
        raise DusaError(
            f"no data in {root} for {counted}{listed(names, 5)} (expected {layout}); "
            "pick others with --corruption/--severity, or build them with `dusa prepare-data`"
        )


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of `root` (`root/<class>/<image>`), sorted by name."""
    require_directory(root, "image folder")
    folders = sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    if not folders:
        raise DusaError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    return folders


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted; hidden and temporary files are skipped."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.suffix.lower() in IMAGE_SUFFIXES
        and not entry.name.startswith(".")
        and entry.is_file()
    )


def read_rgb(path: Path) -> Image.Image:
    """Decode an image file fully as RGB; a missing or undecodable file is a DusaError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DusaError(f"cannot read image {path}: {reason}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file read in 1 MiB blocks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity: a job scheduler's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def head_tail_sha256(path: Path, sample_bytes: int) -> str:
    """sha256 of a file's size (8 bytes, little-endian), its first `sample_bytes` and its last
    `sample_bytes` (each byte once where they overlap): a fingerprint of a file too large to hash
    whole in passing. It changes with the size or with any byte near either end, not with a change
    confined to the middle."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(stream.read(sample_bytes))
        stream.seek(max(size - sample_bytes, stream.tell()))
        digest.update(stream.read(sample_bytes))
    return digest.hexdigest()
