"""digits-C: an offline corruption benchmark built from scikit-learn's real handwritten digits.

`sklearn.datasets.load_digits()` ships inside the scikit-learn wheel (1 797 scans, 8×8, grey
levels 0..16, 10 classes), so the benchmark needs no download. The images are upscaled to 32×32
RGB, the smallest size at which all 19 ImageNet-C corruptions run, split into a source-training
part and a test part, and the test part is corrupted in the ImageNet-C folder layout.
Grey images have no saturation, so `saturate` at severities 1-3 leaves them unchanged (4-5 tint).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dusa_cli.data.corruptions import ALL_CORRUPTIONS, SEVERITIES, check_selection
from dusa_cli.data.generate import (
    ImageFormat,
    Job,
    Manifest,
    Plan,
    Progress,
    files_not_made,
    listed_files,
    planned_files,
    run_jobs,
    unlisted_files,
    write_manifest,
)
from dusa_cli.errors import ConfigError, DusaError, listed
from dusa_cli.writing import check_writable

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 1 / 3
PNG = ImageFormat(".png", "PNG")


@functools.cache
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1 797 digits as N×32×32×3 uint8 images, and their labels."""
    from sklearn.datasets import load_digits  # scikit-learn is only needed to build the benchmark

    digits = load_digits()
    images = np.stack([_upscale(grey) for grey in digits.images])
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)


def _upscale(grey: np.ndarray) -> np.ndarray:
    # Bilinear on the float image gives smooth strokes without the overshoot of bicubic, and
    # interpolating before rounding keeps more than the 16 source grey levels.
    scaled = Image.fromarray((grey * (255 / 16)).astype(np.float32))  # mode "F"
    upscaled = np.asarray(scaled.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    return np.clip(np.rint(upscaled), 0, 255).astype(np.uint8)


def digit_image(index: int) -> np.ndarray:
    """One upscaled digit (a job loader: a module-level function pickles by name to workers)."""
    return digit_images()[0][index]


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices; each class contributes about a third of its images to test."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_size = round(len(members) * TEST_FRACTION)
        test.append(members[:test_size])
        train.append(members[test_size:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _limit_per_class(indices: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    kept = [indices[labels[indices] == label][:limit] for label in range(NUM_CLASSES)]
    return np.sort(np.concatenate(kept))


# What a digits-C folder holds at its top level (a build stopped part-way has no manifest yet).
_LAYOUT = frozenset({"train", "clean", "manifest.json", *ALL_CORRUPTIONS})


def _check_output(output: Path) -> None:
    """`output` is new, empty or an earlier digits-C build: never a results or another dataset's folder."""
    check_writable(output, directory=True)  # not a file, nor under one; writable
    if not output.is_dir():
        return
    foreign = sorted(e.name for e in output.iterdir() if e.name not in _LAYOUT and not e.name.startswith("."))
    if foreign:
        raise DusaError(
            f"{output} holds files that are not part of digits-C ({listed(foreign)}); choose a new or empty --output"
        )


def _remove_stale(output: Path, stale: set[str]) -> None:
    """Delete files of an earlier build that this one did not make, and folders left empty."""
    for relative_path in stale:
        path = output / relative_path
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == output:
                break
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def build_digits_c(
    output: Path,
    *,
    seed: int = 0,
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    workers: int = 2,
    limit_per_class: int | None = None,
    replace: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Write digits-C under `output` and return its manifest (also written as manifest.json).

    Layout: train/<class>/<id>.png (clean source split), clean/<class>/<id>.png (clean test
    split), <corruption>/<severity>/<class>/<id>.png (test split corrupted); <id> is the image's
    index in `load_digits()`, zero-padded. The same seed gives byte-identical files. Files of an
    earlier build in `output` (complete, or stopped before its manifest) that this one does not
    make are deleted only with `replace`.
    """
    corruption_names, severity_levels = check_selection(corruptions, severities)
    if limit_per_class is not None and limit_per_class < 1:
        raise ConfigError(f"limit_per_class must be at least 1, got {limit_per_class}")
    _check_output(output)

    labels = digit_images()[1]
    train, test = stratified_split(labels, seed)
    if limit_per_class is not None:
        test = _limit_per_class(test, labels, limit_per_class)

    def job(index: int, is_test: bool) -> Job:
        return Job(
            item_id=f"{labels[index]}/{index:04d}",
            load=functools.partial(digit_image, int(index)),
            copies=("clean",) if is_test else ("train",),
            corrupted=is_test,
        )

    plan = Plan(
        output=output,
        corruptions=corruption_names,
        severities=severity_levels,
        seed=seed,
        image_format=PNG,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        resume=False,  # rebuilding is quick, and old files may come from another seed
    )
    jobs = [job(index, False) for index in train] + [job(index, True) for index in test]
    # Unlike the resumable builders, a rebuild makes every file again, and deletes the others: those
    # its manifest lists, or where a build stopped before writing one, those on disk.
    earlier = set(listed_files(output)) | unlisted_files(output)
    remedy = None if replace else "pass --force to delete them, or choose another --output"
    stale = files_not_made(output, earlier, planned_files(plan, jobs), remedy)
    # The old manifest would describe files this build is about to replace.
    (output / "manifest.json").unlink(missing_ok=True)
    files = run_jobs(plan, jobs, workers, progress)
    _remove_stale(output, stale)

    description = {
        "dataset": "digits-c",
        "source": "sklearn.datasets.load_digits",
        "upscaling": "bilinear, grey levels 0..16 scaled to 0..255, grey copied to RGB",
        "classes": [str(label) for label in range(NUM_CLASSES)],
        "splits": {"train": len(train), "clean": len(test)},
        "limit_per_class": limit_per_class,
    }
    return write_manifest(plan, files, description)
