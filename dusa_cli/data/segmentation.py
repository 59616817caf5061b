"""Readers for corrupted segmentation test sets (ADE20K-C).

Every item is `(image, label)`: the image a uint8 3×H×W RGB tensor at its stored (native) size,
the label an int64 H×W tensor in the model's 150 classes, 255 where a pixel is not scored. Two
layouts are read; the label maps are the unchanged ADE20K PNGs in both:

- official (DUSA's ADE20K_val-c and `dusa prepare-data ade20k-c`):
  `ROOT/<corruption>/<severity>/validation/*.jpg`, labels in `ROOT/annotations/validation`
  (written there by prepare-data; for the downloaded set pass `annotations=`);
- corruptions beside the clean images: `ROOT/images/validation/<corruption>_<severity>/*.jpg`,
  labels in `ROOT/annotations/validation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dusa_cli.data.corruptions import check_task
from dusa_cli.data.datasets import fixed_subset, image_tensor
from dusa_cli.data.files import image_files, read_rgb, require_data_root, require_directory
from dusa_cli.errors import DusaError

Item = tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = 255

# The 150 ADE20K classes in label order (0..149 after the reduction), the names DUSA fills into
# its prompts (docs/research/dusa_official.md §3.4). The official list spells "bed " with a trailing
# space; CLIP's tokenizer strips whitespace, so "bed" encodes the same.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
NUM_CLASSES = len(ADE20K_CLASSES)


def reduce_ade_labels(label: np.ndarray) -> np.ndarray:
    """ADE20K's 0 ("other") becomes the ignore index and classes 1..150 become 0..149, the
    classes the SegFormer checkpoints predict (dusa_official.md §3, peers.md §E.1)."""
    reduced = label.astype(np.int64) - 1
    reduced[label == 0] = IGNORE_INDEX
    return reduced


def read_label(path: Path) -> np.ndarray:
    """A single-channel label map as stored (H×W); a missing or unreadable file names it."""
    try:
        with Image.open(path) as image:
            label = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DusaError(f"cannot read label map {path}: {exc}") from exc
    if label.ndim != 2:
        raise DusaError(f"label map {path} has {label.shape[-1]} channels, expected one")
    return label


class SegmentationTask(Dataset[Item]):
    """The images of one folder paired by file stem with `<stem>.png` label maps."""

    def __init__(self, images: Path, annotations: Path) -> None:
        require_directory(images, "image folder")
        require_directory(annotations, "annotation folder")
        paths = image_files(images)
        if not paths:
            raise DusaError(f"no images in {images}")
        labels = {path.name for path in annotations.iterdir()}
        for path in paths:
            if f"{path.stem}.png" not in labels:
                raise DusaError(f"no label map for {path}: {annotations / (path.stem + '.png')} not found")
        self.samples = [(path, annotations / f"{path.stem}.png") for path in paths]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        image_path, label_path = self.samples[index]
        image = np.asarray(read_rgb(image_path))
        label = read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DusaError(
                f"{image_path} is {image.shape[1]}×{image.shape[0]} but its label map "
                f"{label_path} is {label.shape[1]}×{label.shape[0]}"
            )
        return image_tensor(image), torch.from_numpy(reduce_ade_labels(label))


SEG_TASK_LAYOUT = "ADE20K-C's CORRUPTION/SEVERITY/validation/ or images/validation/CORRUPTION_SEVERITY/ folders"


def _image_folders(root: Path, corruption: str, severity: int) -> tuple[Path, Path]:
    """Where one task's images may lie: the official layout's folder, then the one beside the clean images."""
    return root / corruption / str(severity) / "validation", root / "images" / "validation" / f"{corruption}_{severity}"


def seg_task_images(root: Path, corruption: str, severity: int) -> Path | None:
    """The folder of one task's images under `root`, in either layout; None where neither is."""
    return next((folder for folder in _image_folders(root, corruption, severity) if folder.is_dir()), None)


def open_seg_task(
    root: Path,
    corruption: str,
    severity: int,
    *,
    annotations: Path | None = None,
    num_ex: int | None = None,
) -> Dataset[Item]:
    """The ADE20K-C test set of one (corruption, severity) under `root`, in either layout.

    `annotations` is the folder of label PNGs (default `root/annotations/validation`). `num_ex`
    picks the fixed subset `open_task` picks.
    """
    check_task(corruption, severity)
    require_data_root(root)
    images = seg_task_images(root, corruption, severity)
    if images is None:
        official, beside_clean = _image_folders(root, corruption, severity)
        raise DusaError(f"no '{corruption}' severity {severity} data in {root}: expected folder {official} or {beside_clean}")
    labels = annotations if annotations is not None else root / "annotations" / "validation"
    return fixed_subset(SegmentationTask(images, labels), num_ex)
