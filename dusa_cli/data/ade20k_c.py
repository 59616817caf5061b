"""ADE20K-C from the ADE20K validation set, made the way the DUSA authors made theirs.

The official script (docs/research/dusa_official.md §3.8) corrupts every full validation image at its
native size with `imagecorruptions.corrupt(image, severity=5, corruption_name=c)` and saves it
with PIL under the same name, so `ADE_val_*.jpg` becomes a JPEG at PIL's default quality (75), in
`<out>/<corruption>/5/validation/`. This module writes that layout, seeded per file (the official
files are not reproducible, §3.8), and copies the label maps once, byte for byte, to
`<out>/annotations/validation/`, so `open_seg_task(<out>, ...)` finds them without extra paths:

    OUTPUT/<corruption>/<severity>/validation/ADE_val_XXXXXXXX.jpg
    OUTPUT/annotations/validation/ADE_val_XXXXXXXX.png   (unchanged ADE labels 0..150)
    OUTPUT/manifest.json
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dusa_cli.data.corruptions import CORRUPTIONS, check_selection
from dusa_cli.data.files import absolute_path, image_files, read_rgb, require_directory, sha256_hex
from dusa_cli.data.generate import (
    FINISH_FIRST,
    MIN_SIDE,
    BuildFiles,
    ImageFormat,
    Job,
    Manifest,
    Plan,
    Progress,
    check_apart,
    claim_output,
    earlier_files,
    files_not_made,
    planned_files,
    run_jobs,
    unlisted_files,
    write_manifest,
)
from dusa_cli.errors import DusaError
from dusa_cli.writing import write_bytes_atomic

SPLIT = "validation"
# PIL's default JPEG quality, which the official script's `Image.save(path)` used (§3.8).
JPEG = ImageFormat(".jpg", "JPEG", {"quality": 75})
SEVERITY = 5  # the official ADE20K-C has only severity 5 (§3.8)


def _header_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError) as exc:
        raise DusaError(f"cannot read image {path}: {exc}") from exc


def _load_rgb(path: Path) -> np.ndarray:
    # The official script passes the decoded array as is; RGB keeps the few greyscale ADE images
    # three-channel like the rest.
    return np.asarray(read_rgb(path))


def _source_jobs(source: Path) -> tuple[list[Job], list[Path]]:
    """One job per validation image, and the label map of each, checked to exist and fit."""
    images_dir = source / "images" / SPLIT
    labels_dir = source / "annotations" / SPLIT
    require_directory(source, "source folder")
    require_directory(images_dir, "ADE20K image folder")
    require_directory(labels_dir, "ADE20K annotation folder")
    jobs: list[Job] = []
    labels: list[Path] = []
    for path in image_files(images_dir):
        label = labels_dir / f"{path.stem}.png"
        if not label.is_file():
            raise DusaError(f"no label map for {path}: {label} not found")
        size = _header_size(path)
        if min(size) < MIN_SIDE:
            raise DusaError(f"{path} is {size[1]}×{size[0]} px; the corruptions need images at least {MIN_SIDE} px wide and high")
        if _header_size(label) != size:
            raise DusaError(f"{path} is {size[1]}×{size[0]} but its label map {label} is not")
        load = functools.partial(_load_rgb, path)
        jobs.append(Job(item_id=f"{SPLIT}/{path.stem}", load=load, image_size=size))
        labels.append(label)
    if not jobs:
        raise DusaError(f"no images in {images_dir} (expected the ADEChallengeData2016 layout)")
    return jobs, labels


def _label_copy(label: Path) -> str:
    """Where a label map is copied, relative to the output."""
    return f"annotations/{SPLIT}/{label.name}"


def _copy_labels(labels: Sequence[Path], output: Path) -> BuildFiles:
    """Copy the label maps to OUTPUT/annotations/validation (those not there already)."""
    files = BuildFiles()
    for label in labels:
        relative_path = _label_copy(label)
        target = output / relative_path
        data = label.read_bytes()
        if not (target.is_file() and target.read_bytes() == data):
            write_bytes_atomic(target, data, durable=False)
            files.written += 1
        files.checksums[relative_path] = sha256_hex(data)
    return files


def prepare_ade20k_c(
    source: Path,
    output: Path,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (SEVERITY,),
    seed: int = 0,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Corrupt SOURCE/images/validation/*.jpg (an ADEChallengeData2016 folder) into OUTPUT.

    Resumable like ImageNet-C: files that exist, decode and have the source's size are kept.
    Returns the manifest, written last as OUTPUT/manifest.json; it also lists the files of other
    corruptions or severities that earlier calls made in OUTPUT. A stopped build's files that this
    call would not make are refused: it is to be finished first.
    """
    corruption_names, severity_levels = check_selection(corruptions, severities)
    jobs, labels = _source_jobs(source)
    check_apart(source, output)
    claim_output(output, {"dataset": "ade20k-c", "seed": seed, **JPEG.save_options}, source)
    earlier = earlier_files(output, source)

    plan = Plan(
        output=output,
        corruptions=corruption_names,
        severities=severity_levels,
        seed=seed,
        image_format=JPEG,
        image_size=None,  # native: every image keeps its own size
        resume=True,
    )
    planned = planned_files(plan, jobs) | {_label_copy(label) for label in labels}
    files_not_made(output, unlisted_files(output), planned, FINISH_FIRST)  # as in prepare_imagenet_c
    files = _copy_labels(labels, output)
    files.add(run_jobs(plan, jobs, workers, progress))
    files.checksums = earlier | files.checksums
    description = {
        "dataset": "ade20k-c",
        "source": str(absolute_path(source)),
        "preprocessing": "none: full validation images at native size (dusa_official.md §3.8)",
        "jpeg_quality": JPEG.save_options["quality"],
        "annotations": f"annotations/{SPLIT}",
        "images": len(jobs),
    }
    return write_manifest(plan, files, description)
