"""ImageNet-C from any ImageNet-style folder, made the way Hendrycks & Dietterich made theirs."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dusa_cli.data.corruptions import CORRUPTIONS, SEVERITIES, check_selection
from dusa_cli.data.files import absolute_path, class_folders, image_files, read_rgb, require_directory
from dusa_cli.data.generate import (
    FINISH_FIRST,
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

RESIZE = 256
CROP = 224
# The released ImageNet-C images are JPEGs saved at quality 85; the same keeps the compression
# artefacts a model sees alike.
JPEG = ImageFormat(".JPEG", "JPEG", {"quality": 85})


def load_center_crop(path: Path) -> np.ndarray:
    """Resize the short side to 256 (bilinear, antialiased) and centre-crop 224×224.

    The same arithmetic as torchvision's Resize(256) + CenterCrop(224) on a PIL image, which the
    ImageNet-C generation script used.
    """
    image = read_rgb(path)
    width, height = image.size
    if width <= height:
        new_size = (RESIZE, int(RESIZE * height / width))
    else:
        new_size = (int(RESIZE * width / height), RESIZE)
    # Pillow's filter spans the whole source footprint when shrinking, so this antialiases.
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = int(round((new_size[0] - CROP) / 2))
    top = int(round((new_size[1] - CROP) / 2))
    return np.asarray(image.crop((left, top, left + CROP, top + CROP)))


def _source_jobs(source: Path) -> tuple[list[str], list[Job]]:
    """The class names and one job per image of `source/<class>/<image>`."""
    require_directory(source, "source folder")
    folders = class_folders(source)
    jobs = []
    for folder in folders:
        seen: dict[str, Path] = {}
        for path in image_files(folder):
            if path.stem in seen:
                raise DusaError(
                    f"{seen[path.stem]} and {path} would both be saved as {path.stem}{JPEG.suffix}"
                )
            seen[path.stem] = path
            load = functools.partial(load_center_crop, path)
            jobs.append(Job(item_id=f"{folder.name}/{path.stem}", load=load))
    if not jobs:
        raise DusaError(f"no images in {source} (expected {source}/<wnid>/<image>.JPEG)")
    return [folder.name for folder in folders], jobs


def prepare_imagenet_c(
    source: Path,
    output: Path,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Write OUTPUT/<corruption>/<severity>/<wnid>/<stem>.JPEG for every SOURCE/<wnid>/<image>.

    Resumable: files that exist and decode are kept, anything else is (re)made. `workers` defaults
    to the usable CPU cores. Returns the manifest, written last as OUTPUT/manifest.json; it also
    lists the files of other corruptions or severities that earlier calls made in OUTPUT. A stopped
    build's files that this call would not make are refused: it is to be finished first.
    """
    corruption_names, severity_levels = check_selection(corruptions, severities)
    classes, jobs = _source_jobs(source)
    check_apart(source, output)
    claim_output(output, {"seed": seed, "resize": RESIZE, "crop": CROP, **JPEG.save_options}, source)
    earlier = earlier_files(output, source)

    plan = Plan(
        output=output,
        corruptions=corruption_names,
        severities=severity_levels,
        seed=seed,
        image_format=JPEG,
        image_size=(CROP, CROP),
        resume=True,
    )
    # A stopped build's files of other corruptions would stay on disk, in no manifest.
    files_not_made(output, unlisted_files(output), planned_files(plan, jobs), FINISH_FIRST)
    files = run_jobs(plan, jobs, workers, progress)
    files.checksums = earlier | files.checksums
    description = {
        "dataset": "imagenet-c",
        "source": str(absolute_path(source)),
        "preprocessing": f"short side to {RESIZE} (bilinear, antialiased), centre crop {CROP}",
        "jpeg_quality": JPEG.save_options["quality"],
        "classes": classes,
        "images": len(jobs),
    }
    return write_manifest(plan, files, description)
