"""Readers for corrupted test sets: ImageNet-C-style folders and CIFAR-C-style .npy arrays.

Every dataset yields `(image, label)`: the image a uint8 C×H×W RGB tensor at its stored size
(resizing and normalising belong to the model), the label an int.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from dusa_cli.data.corruptions import SEVERITIES, check_task
from dusa_cli.data.files import class_folders, image_files, read_rgb, require_data_root
from dusa_cli.errors import ConfigError, DusaError

Item = tuple[torch.Tensor, int]
_WNID = re.compile(r"n\d{8}")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1 000 ImageNet-1k wnids in canonical (sorted) order, from the installed timm package."""
    # find_spec locates timm without importing it (an import costs seconds).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise DusaError("timm is not installed; its ImageNet-1k class list maps wnid folders")
    timm_folder = Path(list(spec.submodule_search_locations)[0])
    path = timm_folder / "data" / "_info" / "imagenet_synsets.txt"
    try:
        return tuple(path.read_text().split())
    except OSError as exc:
        raise DusaError(f"cannot read the ImageNet-1k class list {path}: {exc.strerror}") from exc


def class_index(folder_names: Sequence[str]) -> tuple[dict[str, int], bool]:
    """Map class folder names to label indices, and say whether the names fixed them.

    ImageNet-1k wnids map to their canonical index and integer names to their value, so a copy
    holding only some classes still lines up with the model's outputs; any other names are
    numbered in sorted order (then only a copy with every class lines up: `check_labels`).
    """
    names = list(folder_names)
    if names and all(_WNID.fullmatch(name) for name in names):
        canonical = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
        if all(name in canonical for name in names):
            return {name: canonical[name] for name in names}, True
    if names and all(name.isdecimal() for name in names):
        return {name: int(name) for name in names}, True
    return {name: index for index, name in enumerate(sorted(names))}, False


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 array → contiguous 3×H×W uint8 tensor that owns its memory."""
    return torch.from_numpy(image.transpose(2, 0, 1).copy())


def read_stored(path: Path) -> np.ndarray:
    """An image file as an H×W×3 uint8 array at its stored size."""
    return np.asarray(read_rgb(path))


class ImageFolderTask(Dataset[Item]):
    """`root/<class>/<image>`: one ImageNet-C (corruption, severity) folder, or a clean split.
    `read` turns a file into its H×W×3 uint8 array (default: as stored)."""

    def __init__(self, root: Path, read: Callable[[Path], np.ndarray] = read_stored) -> None:
        folders = class_folders(root)
        self.root = root
        self.read = read
        self.class_to_index, self.named_indices = class_index([folder.name for folder in folders])
        self.samples = [
            (path, self.class_to_index[folder.name])
            for folder in folders
            for path in image_files(folder)
        ]
        if not self.samples:
            raise DusaError(f"no images in {root} (expected {root}/<class>/<image>)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        return image_tensor(self.read(path)), label


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DusaError(f"file not found: {path}")
    try:
        # Memory-mapped: a CIFAR-C corruption file holds all five severities (150 MB).
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DusaError(f"cannot read {path}: {exc}") from exc


class CorruptionArrayTask(Dataset[Item]):
    """CIFAR-10-C/100-C: `root/<corruption>.npy` stacks severities 1..5 (N×H×W×3 uint8 each);
    `root/labels.npy` holds the labels, stacked the same way or once."""

    def __init__(self, root: Path, corruption: str, severity: int) -> None:
        path = root / f"{corruption}.npy"
        images = _load_array(path)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DusaError(
                f"{path}: expected N×H×W×3 uint8 images, found {images.dtype} {images.shape}"
            )
        if len(images) % len(SEVERITIES):
            raise DusaError(
                f"{path}: {len(images)} images do not split into {len(SEVERITIES)} severities"
            )
        per_severity = len(images) // len(SEVERITIES)
        rows = slice((severity - 1) * per_severity, severity * per_severity)
        labels_path = root / "labels.npy"
        labels = _load_array(labels_path)
        if labels.ndim != 1 or len(labels) not in (len(images), per_severity):
            raise DusaError(
                f"{labels_path}: expected {len(images)} or {per_severity} labels, "
                f"found shape {labels.shape}"
            )
        self.root = root
        self.images = images[rows]
        self.labels = labels[rows] if len(labels) == len(images) else labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        return image_tensor(self.images[index]), int(self.labels[index])


TASK_LAYOUT = "ImageNet-C's CORRUPTION/SEVERITY/ folders or CIFAR-C's CORRUPTION.npy files"


def task_source(root: Path, corruption: str, severity: int) -> Path | None:
    """Where one task's images lie under `root`: its folder (ImageNet-C layout), else its
    corruption's array file (CIFAR-C layout); None where neither is."""
    folder, array_file = root / corruption / str(severity), root / f"{corruption}.npy"
    return folder if folder.is_dir() else array_file if array_file.is_file() else None


def open_task(root: Path, corruption: str, severity: int, *, num_ex: int | None = None) -> Dataset[Item]:
    """The test set of one (corruption, severity) under `root`, in either layout.

    `root/<corruption>/<severity>/<class>/<image>` (ImageNet-C) or `root/<corruption>.npy` with
    `root/labels.npy` (CIFAR-C). With `num_ex`, a fixed subset of that many items (`fixed_subset`).
    A `num_ex` above the size gives the whole set: check `len()`.
    """
    check_task(corruption, severity)
    require_data_root(root)
    source = task_source(root, corruption, severity)
    if source is None:
        raise DusaError(
            f"no '{corruption}' severity {severity} data in {root}: expected folder {root / corruption / str(severity)} "
            f"(ImageNet-C layout) or file {root / f'{corruption}.npy'} (CIFAR-C layout)"
        )
    task = ImageFolderTask(source) if source.is_dir() else CorruptionArrayTask(root, corruption, severity)
    return fixed_subset(task, num_ex)


def check_labels(task: Dataset[Item], num_classes: int) -> None:
    """Labels the model cannot predict would be scored as misses, without a word: refuse them,
    and refuse folder names numbered by sort order when they cannot match the model's classes."""
    base = task.dataset if isinstance(task, Subset) else task
    if isinstance(base, ImageFolderTask):
        if not base.named_indices and len(base.class_to_index) != num_classes:
            raise DusaError(
                f"{base.root}: its {len(base.class_to_index)} class folders are named neither by ImageNet "
                f"wnid nor by class index, so sorted order would number them, which cannot match the "
                f"model's {num_classes} classes; name the folders by wnid (n01440764) or index (0, 1, …)"
            )
        labels = np.array([label for _, label in base.samples])
    else:
        labels = np.asarray(base.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DusaError(
            f"{base.root}: labels run {labels.min()}..{labels.max()}, but the model predicts "
            f"{num_classes} classes (0..{num_classes - 1}); check model.num_classes or the data"
        )


# The subset of `num_ex` images is drawn with a fixed seed, not the run's: like RobustBench's fixed
# 5,000-image ImageNet-C list (docs/research/peers.md), every seed and method sees the same images, so
# a spread over seeds measures the adaptation, not the sample.
SUBSET_SEED = 0


def fixed_subset(dataset: Dataset[Item], num_ex: int | None) -> Dataset[Item]:
    """`num_ex` items in stored order, the same for every task of the same size."""
    if num_ex is not None and num_ex < 1:
        raise ConfigError(f"num_ex must be at least 1, got {num_ex}")
    size = len(dataset)  # type: ignore[arg-type]
    if num_ex is None or num_ex >= size:
        return dataset
    chosen = np.random.default_rng(SUBSET_SEED).permutation(size)[:num_ex]
    return Subset(dataset, sorted(chosen.tolist()))


def open_split(root: Path, split: str) -> ImageFolderTask:
    """A clean split `root/<split>/<class>/<image>`, e.g. digits-C's `train` and `clean`."""
    require_data_root(root)
    return ImageFolderTask(root / split)
