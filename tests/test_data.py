"""The data layer on real inputs: scikit-learn's digits, generated JPEG/PNG folders, .npy arrays."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import dusa_cli._compat  # noqa: F401  (installs the torchvision shim before anything imports timm)
from dusa_cli.data.corruptions import ALL_CORRUPTIONS
from dusa_cli.data.datasets import (
    TASK_LAYOUT,
    ImageFolderTask,
    check_labels,
    class_index,
    imagenet_wnids,
    open_split,
    open_task,
    task_source,
)
from dusa_cli.data.digits import PNG, build_digits_c, digit_images, stratified_split
from dusa_cli.data.files import UNFINISHED_MARKER, require_tasks
from dusa_cli.data.generate import Job, Plan, corrupt_image, file_seed, listed_files, run_jobs
from dusa_cli.data.imagenet_c import load_center_crop, prepare_imagenet_c
from dusa_cli.data.segmentation import SEG_TASK_LAYOUT, seg_task_images
from dusa_cli.errors import ConfigError, DusaError, ExitCode, Stopped
from helpers import assert_one_line_error, dusa, dusa_each

CORRUPTIONS = ("gaussian_noise", "impulse_noise", "glass_blur", "frost")
SEVERITIES = (1, 5)
LIMIT = 3
# With this seed a severity-1 spatter layer on a 32×32 image is empty (see corrupt_image).
EMPTY_SPATTER_SEED = 1704084270


def build(output: Path, seed: int, workers: int) -> dict:
    return build_digits_c(
        output,
        seed=seed,
        corruptions=CORRUPTIONS,
        severities=SEVERITIES,
        workers=workers,
        limit_per_class=LIMIT,
    )


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def relative_pngs(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*.png")}


def tree_bytes(root: Path) -> dict[str, bytes]:
    files = (path for path in root.rglob("*") if path.is_file())
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def digits_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits-C built by two worker processes."""
    output = tmp_path_factory.mktemp("digits") / "digits-c"
    calls: list[tuple[int, int]] = []
    build_digits_c(
        output,
        corruptions=CORRUPTIONS,
        severities=SEVERITIES,
        workers=2,
        limit_per_class=LIMIT,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    return output


def test_a_corruption_is_imagecorruptions_own_at_the_severity_asked() -> None:
    import imagecorruptions

    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for corruption, severity in (("gaussian_noise", 1), ("gaussian_noise", 5), ("impulse_noise", 3)):
        np.random.seed(7)
        options = {"seed": 7} if corruption == "impulse_noise" else {}  # it takes its seed as an argument
        expected = imagecorruptions.corrupt(image, corruption_name=corruption, severity=severity, **options)
        assert np.array_equal(corrupt_image(image, corruption, severity, seed=7), expected), (corruption, severity)


def test_digits_c_layout_and_manifest(digits_c: Path) -> None:
    manifest = json.loads((digits_c / "manifest.json").read_text())
    assert manifest["dataset"] == "digits-c" and not (digits_c / UNFINISHED_MARKER).exists()
    assert manifest["classes"] == [str(label) for label in range(10)]
    assert manifest["splits"]["clean"] == 10 * LIMIT
    # Each class gives about two thirds of its images to the source split (limit only cuts test).
    labels = digit_images()[1]
    train_per_class = [len(relative_pngs(digits_c / "train" / str(label))) for label in range(10)]
    for label, count in enumerate(train_per_class):
        assert abs(count - (labels == label).sum() * 2 / 3) <= 1
    assert manifest["splits"]["train"] == sum(train_per_class)
    assert manifest["counts"] == {c: {str(s): 10 * LIMIT for s in SEVERITIES} for c in CORRUPTIONS}
    versions = set(manifest["versions"])
    assert versions >= {"numpy", "imagecorruptions", "pillow", "scikit-learn", "opencv"}

    files = relative_pngs(digits_c)
    assert files == set(manifest["files"])
    copies_per_test_image = 1 + len(CORRUPTIONS) * len(SEVERITIES)
    splits = manifest["splits"]
    assert len(files) == splits["train"] + splits["clean"] * copies_per_test_image
    for relative_path, checksum in manifest["files"].items():
        assert hashlib.sha256((digits_c / relative_path).read_bytes()).hexdigest() == checksum
    clean = relative_pngs(digits_c / "clean")
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            assert relative_pngs(digits_c / corruption / str(severity)) == clean


def test_digits_c_images_are_32px_rgb_and_corrupted(digits_c: Path) -> None:
    for relative_path in sorted(relative_pngs(digits_c / "clean")):
        clean = pixels(digits_c / "clean" / relative_path)
        assert clean.shape == (32, 32, 3) and clean.max() > 200
        for corruption in CORRUPTIONS:
            corrupted = pixels(digits_c / corruption / "5" / relative_path)
            assert np.abs(corrupted.astype(int) - clean).mean() > 2, (corruption, relative_path)


def test_digits_c_same_seed_is_byte_identical_in_process(digits_c: Path, tmp_path: Path) -> None:
    build(tmp_path / "again", seed=0, workers=1)
    assert tree_bytes(tmp_path / "again") == tree_bytes(digits_c)


def test_digits_c_other_seed_gives_other_split_and_noise(digits_c: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1"
    manifest = build(other, seed=1, workers=1)
    assert manifest["seed"] == 1
    assert relative_pngs(other / "train") != relative_pngs(digits_c / "train")
    shared = relative_pngs(other / "clean") & relative_pngs(digits_c / "clean")
    assert shared  # the two limited test splits overlap (deterministically)
    for name in shared:
        assert np.array_equal(pixels(other / "clean" / name), pixels(digits_c / "clean" / name))
        for corruption in CORRUPTIONS:
            ours, theirs = (pixels(root / corruption / "5" / name) for root in (digits_c, other))
            assert not np.array_equal(ours, theirs)


def test_each_image_of_a_corruption_gets_noise_of_its_own(digits_c: Path) -> None:
    # The item id is part of each file's seed: without it every image would get the same draws.
    assert file_seed(0, "gaussian_noise", 5, "0/0000") != file_seed(0, "gaussian_noise", 5, "0/0001")
    first, second = sorted(relative_pngs(digits_c / "clean"))[:2]
    clean = [pixels(digits_c / "clean" / name) for name in (first, second)]
    noisy = [pixels(digits_c / "gaussian_noise" / "5" / name) for name in (first, second)]
    # Where the two clean images hold the same value, the same draws would give the same output;
    # independent noise agrees only where both clip to the same bound (about a quarter of the time).
    same = clean[0] == clean[1]
    assert same.sum() > 500  # their common black background, at least
    assert (noisy[0][same] == noisy[1][same]).mean() < 0.6


def test_a_hand_edited_manifest_cannot_make_a_rebuild_delete_files_outside_the_output(tmp_path: Path) -> None:
    output = tmp_path / "digits-c"
    output.mkdir()
    outside, absolute = tmp_path / "outside.txt", tmp_path / "elsewhere" / "kept.png"
    absolute.parent.mkdir()
    for path in (outside, absolute):
        path.write_text("not digits-C")
    listed = {"../outside.txt": "0" * 64, str(absolute): "1" * 64, "fog/1/0/old.png": "2" * 64}
    (output / "manifest.json").write_text(json.dumps({"files": listed}))
    assert listed_files(output) == {"fog/1/0/old.png": "2" * 64}  # only plain relative paths
    # A rebuild that deletes the earlier build's files (--force) must not reach outside its output.
    build_digits_c(output, corruptions=["fog"], severities=[1], workers=1, limit_per_class=1, replace=True)
    assert outside.is_file() and absolute.is_file()
    assert outside.read_text() == absolute.read_text() == "not digits-C"


def test_digits_c_rebuild_removes_files_of_the_earlier_build_only_when_asked(tmp_path: Path) -> None:
    output = tmp_path / "digits-c"
    first = build(output, seed=0, workers=1)
    smaller = {"corruptions": ["fog"], "severities": [2], "workers": 1, "limit_per_class": 1}
    with pytest.raises(DusaError, match=r"files this one would not make: clean, frost/1, frost/5, gaussian_noise/1 and 5 more \(\d+ files\); pass --force"):
        build_digits_c(output, **smaller)
    assert relative_pngs(output) == set(first["files"])  # refused before anything changed
    manifest = build_digits_c(output, replace=True, **smaller)
    assert manifest.written == len(manifest["files"])  # a rebuild makes every file again
    assert not (output / "gaussian_noise").exists()
    assert relative_pngs(output) == set(manifest["files"])
    (output / "results.json").write_text("{}")  # not a digits-C folder any more: never written into
    with pytest.raises(DusaError, match="holds files that are not part of digits-C \\(results.json\\)"):
        build_digits_c(output, **smaller)


def stop_after(files: int):
    """A progress callback that stops a build as Ctrl-C does, once `files` files are made."""

    def progress(done: int, total: int) -> None:
        if done >= files:
            raise Stopped(signal.SIGINT)

    return progress


def stop_digits_build(output: Path, corruptions: list[str]) -> None:
    """A digits-C build (one test image per class, severity 5) stopped after its train split and two
    test images: files on disk, the unfinished marker, no manifest."""
    train = len(stratified_split(digit_images()[1], seed=0)[0])
    with pytest.raises(Stopped):
        build_digits_c(output, corruptions=corruptions, severities=[5], workers=1, limit_per_class=1,
                       progress=stop_after(train + 2 * (1 + len(corruptions))))  # fmt: skip
    assert (output / UNFINISHED_MARKER).exists() and not (output / "manifest.json").exists()


def test_digits_c_rebuild_over_a_stopped_build_deletes_its_other_files_only_when_asked(tmp_path: Path) -> None:
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    for output in (stopped, resumed):
        stop_digits_build(output, ["gaussian_noise", "fog"])
    left = relative_pngs(stopped)
    assert {path.split("/")[0] for path in left} == {"train", "clean", "gaussian_noise", "fog"}
    command = ("prepare-data", "digits-c", "--severity", "5", "--limit-per-class", "1", "--workers", "1", "-q")
    other, same = dusa_each(
        (*command, "-o", str(stopped), "--corruption", "contrast"),
        (*command, "-o", str(resumed), "--corruption", "gaussian_noise,fog"),
    )
    assert_one_line_error(other, ExitCode.RUNTIME, f"{stopped} holds a stopped build with files this one would not make: "
                          "fog/5, gaussian_noise/5 (4 files); pass --force to delete them, or choose another --output")  # fmt: skip
    assert relative_pngs(stopped) == left  # refused before anything changed
    # The stopped command itself still finishes the build.
    assert same.returncode == 0, same.stderr
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert f"wrote {len(manifest['files'])} of the {len(manifest['files'])} files in {resumed}" in same.stderr
    assert manifest["corruptions"] == ["gaussian_noise", "fog"] and relative_pngs(resumed) == set(manifest["files"])

    forced = dusa(*command, "-o", str(stopped), "--corruption", "contrast", "--force")
    assert forced.returncode == 0, forced.stderr
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert manifest["corruptions"] == ["contrast"]
    assert not (stopped / "gaussian_noise").exists() and not (stopped / "fog").exists()
    on_disk = {path.relative_to(stopped).as_posix() for path in stopped.rglob("*") if path.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}  # exactly what the manifest lists


def _interrupted_in_compiled_code() -> np.ndarray:
    # What numba's glass_blur raises when Ctrl-C's handler runs inside it.
    try:
        raise Stopped(signal.SIGINT)
    except Stopped as interrupt:
        raise SystemError("CPUDispatcher(<function glass_blur>) returned a result with an exception set") from interrupt


def _failing_in_compiled_code() -> np.ndarray:
    raise SystemError("a real bug")


@pytest.mark.parametrize(
    ("load", "expected"), [(_interrupted_in_compiled_code, Stopped), (_failing_in_compiled_code, SystemError)]
)
def test_an_in_process_job_stopped_inside_compiled_code_ends_as_a_stop(load, expected, tmp_path: Path) -> None:
    plan = Plan(tmp_path, ("fog",), (1,), seed=0, image_format=PNG, image_size=(32, 32), resume=False)
    with pytest.raises(expected):
        run_jobs(plan, [Job(item_id="0/0000", load=load)], workers=1)
    # Stopped before its manifest: the images so far are not a dataset to adapt on.
    with pytest.raises(DusaError, match="is an unfinished build of `dusa prepare-data`: run the same command again"):
        open_task(tmp_path, "fog", 1)


@pytest.fixture(scope="module")
def colour_photo() -> np.ndarray:
    """A real colour photo at 32×32 (on grey digits, saturate 1-3 is the identity)."""
    photo = Image.fromarray(skimage.data.chelsea())
    return np.asarray(photo.resize((32, 32), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("corruption", ALL_CORRUPTIONS)
def test_every_corruption_is_reproducible_from_its_seed(
    corruption: str, colour_photo: np.ndarray
) -> None:
    first = corrupt_image(colour_photo, corruption, 3, seed=7)
    assert first.shape == colour_photo.shape and first.dtype == np.uint8
    assert np.array_equal(first, corrupt_image(colour_photo, corruption, 3, seed=7))
    assert not np.array_equal(first, colour_photo)


def test_empty_spatter_layer_keeps_the_image_instead_of_going_black() -> None:
    image = digit_images()[0][0]
    assert np.array_equal(corrupt_image(image, "spatter", 1, seed=EMPTY_SPATTER_SEED), image)


def test_readers_on_digits_c(digits_c: Path) -> None:
    task = open_task(digits_c, "frost", 5)
    assert len(task) == 10 * LIMIT
    image, label = task[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert isinstance(task, ImageFolderTask)
    for path, label in task.samples:
        assert label == int(path.parent.name)
    train = open_split(digits_c, "train")
    assert [label for _, label in train.samples] == sorted(label for _, label in train.samples)
    assert open_split(digits_c, "clean")[0][0].shape == (3, 32, 32)


def test_a_non_square_image_is_read_as_channels_by_height_by_width(tmp_path: Path) -> None:
    # Every digits-C image is square: only a non-square one shows height and width apart.
    path = tmp_path / "fog" / "1" / "n01440764" / "wide.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
    image, label = open_task(tmp_path, "fog", 1)[0]
    assert image.shape == (3, 36, 40) and label == 0
    assert torch.equal(image, torch.from_numpy(pixels(path).copy()).permute(2, 0, 1))


def test_subset_is_deterministic_and_clamped(digits_c: Path) -> None:
    first = open_task(digits_c, "gaussian_noise", 1, num_ex=7)
    assert len(first) == 7 and first.indices == sorted(first.indices)
    assert first.indices == open_task(digits_c, "frost", 5, num_ex=7).indices
    assert first.indices != list(range(7))  # drawn across the set, not its first (class-sorted) items
    assert len(open_task(digits_c, "gaussian_noise", 1, num_ex=10_000)) == 10 * LIMIT
    with pytest.raises(ConfigError, match="num_ex"):
        open_task(digits_c, "gaussian_noise", 1, num_ex=0)


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 3)).save(path)


def test_class_index_wnids_canonical_integers_by_value_others_sorted(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    partial = [wnids[999], wnids[0], wnids[417]]
    assert class_index(partial) == ({wnids[999]: 999, wnids[0]: 0, wnids[417]: 417}, True)
    assert class_index(["10", "2", "7"]) == ({"10": 10, "2": 2, "7": 7}, True)
    assert class_index(["dog", "cat"]) == ({"cat": 0, "dog": 1}, False)
    assert class_index(["n99999999", wnids[5]]) == ({wnids[5]: 0, "n99999999": 1}, False)

    for wnid in partial:
        write_png(tmp_path / "fog" / "3" / wnid / "a.JPEG")  # PNG bytes, .JPEG name: decodes
    task = open_task(tmp_path, "fog", 3)
    assert sorted(label for _, label in (task[i] for i in range(len(task)))) == [0, 417, 999]
    check_labels(task, 1000)  # three of ImageNet's classes, each at its own index
    with pytest.raises(DusaError, match=r"labels run 0\.\.999, but the model predicts 10 classes"):
        check_labels(task, 10)
    for name in ("cat", "dog"):
        write_png(tmp_path / "snow" / "3" / name / "a.png")
    check_labels(open_task(tmp_path, "snow", 3), 2)  # every class named: sorted order is the convention
    with pytest.raises(DusaError, match="2 class folders are named neither by ImageNet wnid nor by class index"):
        check_labels(open_task(tmp_path, "snow", 3, num_ex=1), 1000)


def test_cifar_c_arrays(tmp_path: Path) -> None:
    per_severity = 4
    images = np.zeros((5 * per_severity, 32, 32, 3), np.uint8)
    # Every pixel of a row holds the row number.
    images[:] = np.arange(5 * per_severity, dtype=np.uint8)[:, None, None, None]
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(5 * per_severity) % 10)
    task = open_task(tmp_path, "fog", 3)
    assert len(task) == per_severity
    image, label = task[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == 2 * per_severity + 1 and label == (2 * per_severity + 1) % 10

    np.save(tmp_path / "labels.npy", np.arange(per_severity))  # one copy for all severities
    assert open_task(tmp_path, "fog", 5)[3][1] == 3
    with pytest.raises(DusaError, match=r"labels run 0\.\.3, but the model predicts 3 classes"):
        check_labels(open_task(tmp_path, "fog", 5), 3)
    np.save(tmp_path / "snow.npy", images[:7])
    with pytest.raises(DusaError, match="snow.npy"):
        open_task(tmp_path, "snow", 1)


def test_prepare_imagenet_c_writes_224px_jpegs_and_resumes(
    imagenet_source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "imagenet-c"
    settings = {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 2], "workers": 1}
    manifest = prepare_imagenet_c(imagenet_source, output, **settings)
    files = sorted(output.rglob("*.JPEG"))
    assert len(files) == 4 * 2 * 2 == len(manifest["files"])
    assert {path.relative_to(output).as_posix() for path in files} == set(manifest["files"])
    assert (output / "contrast" / "2" / "n15075141" / "img1.JPEG").is_file()
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (224, 224)
        checksum = manifest["files"][path.relative_to(output).as_posix()]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == checksum
    assert manifest["classes"] == ["n01440764", "n15075141"] and manifest["images"] == 4
    task = open_task(output, "contrast", 1)
    assert sorted(label for _, label in task.samples) == [0, 0, 999, 999]
    # Saved at ImageNet-C's JPEG quality, 85: the same quantization tables as PIL's at 85.
    assert manifest["jpeg_quality"] == 85
    reference = io.BytesIO()
    Image.fromarray(pixels(files[0])).save(reference, format="JPEG", quality=85)
    with Image.open(files[0]) as written, Image.open(reference) as expected:
        assert written.quantization == expected.quantization

    truncated = output / "gaussian_noise" / "2" / "n01440764" / "img0.JPEG"
    original = truncated.read_bytes()
    truncated.write_bytes(original[: len(original) // 2])
    # A file that decodes, but at another size than 224×224, is no finished output either.
    resized = output / "contrast" / "1" / "n15075141" / "img1.JPEG"
    resized_original = resized.read_bytes()
    Image.new("RGB", (100, 100), (90, 30, 200)).save(resized, format="JPEG", quality=85)
    old = 1_000_000_000
    for path in files:
        if path != truncated:
            os.utime(path, ns=(old, old))
    progress: list[tuple[int, int]] = []
    again = prepare_imagenet_c(
        imagenet_source, output, **settings, progress=lambda *counts: progress.append(counts)
    )
    assert truncated.read_bytes() == original  # re-made, and byte-identical to the first run
    assert resized.read_bytes() == resized_original
    assert {path for path in files if path.stat().st_mtime_ns != old} == {truncated, resized}
    assert again["files"] == manifest["files"]
    assert progress[-1] == (len(files), len(files))

    with pytest.raises(DusaError, match=re.escape(str(output))):
        prepare_imagenet_c(imagenet_source, output, **settings, seed=1)


def test_prepare_imagenet_c_in_chunks_keeps_describing_every_file(
    imagenet_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(imagenet_source.parent)
    relative_source = Path(imagenet_source.name)
    output = tmp_path / "imagenet-c"
    one_image_each = {"severities": [1], "workers": 1}
    first = prepare_imagenet_c(relative_source, output, corruptions=["contrast", "gaussian_noise"], **one_image_each)
    assert first.written == len(first["files"]) == 4 * 2
    assert first["source"] == str(imagenet_source)  # absolute, as run configs store paths
    first_bytes = (output / "manifest.json").read_bytes()

    # A call for fewer corruptions writes nothing and leaves the manifest as it was.
    smaller = prepare_imagenet_c(imagenet_source, output, corruptions=["contrast"], **one_image_each)
    assert smaller.written == 0 and smaller == first
    assert (output / "manifest.json").read_bytes() == first_bytes

    # Another chunk adds its files to those of the earlier calls.
    chunk = prepare_imagenet_c(imagenet_source, output, corruptions=["fog"], severities=[2], workers=1)
    assert chunk.written == 4 and len(chunk["files"]) == 4 * 3
    assert chunk["files"].items() >= first["files"].items()
    assert chunk["corruptions"] == ["gaussian_noise", "fog", "contrast"] and chunk["severities"] == [1, 2]
    assert chunk["counts"]["fog"] == {"1": 0, "2": 4} and chunk["counts"]["contrast"] == {"1": 4, "2": 0}
    on_disk = {path.relative_to(output).as_posix() for path in output.rglob("*.JPEG")}
    assert on_disk == set(chunk["files"])

    # Manifests used to store the source as given: a resume from the same folder still matches it.
    manifest = json.loads((output / "manifest.json").read_text())
    (output / "manifest.json").write_text(json.dumps(manifest | {"source": relative_source.name}))
    assert prepare_imagenet_c(relative_source, output, corruptions=["fog"], severities=[2], workers=1) == chunk
    other_source = tmp_path / "copy"
    shutil.copytree(imagenet_source, other_source)
    with pytest.raises(DusaError, match=re.escape(f"{output} holds a build from {imagenet_source}, not {other_source}")):
        prepare_imagenet_c(other_source, output, corruptions=["fog"], severities=[2], workers=1)
    # A first build stopped before its manifest: the settings file, written before any image, names the source.
    (output / "manifest.json").unlink()
    with pytest.raises(DusaError, match=re.escape(f"{output} holds a build from {imagenet_source}, not {other_source}")):
        prepare_imagenet_c(other_source, output, corruptions=["fog"], severities=[2], workers=1)
    # With no manifest, the files on disk are a stopped build's: those of other corruptions are refused.
    with pytest.raises(DusaError, match=re.escape(f"{output} holds a stopped build with files this one would not make: contrast/1, gaussian_noise/1 (8 files)")):
        prepare_imagenet_c(imagenet_source, output, corruptions=["fog"], severities=[2], workers=1)
    for corruption in ("contrast", "gaussian_noise"):
        shutil.rmtree(output / corruption)
    # A build begun before sources were recorded takes the source it resumes with.
    settings = output / ".dusa-prepare.json"
    recorded = json.loads(settings.read_text())
    settings.write_text(json.dumps({key: value for key, value in recorded.items() if key != "source"}))
    assert prepare_imagenet_c(imagenet_source, output, corruptions=["fog"], severities=[2], workers=1).written == 0
    assert json.loads(settings.read_text()) == recorded


def test_prepare_imagenet_c_over_a_stopped_build_refuses_the_files_it_would_not_make(
    imagenet_source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "imagenet-c"
    one = {"severities": [1], "workers": 1}
    first = prepare_imagenet_c(imagenet_source, output, corruptions=["contrast"], **one)
    stopped = {"corruptions": ["gaussian_noise", "fog"], **one}
    with pytest.raises(Stopped):  # after two of the four images
        prepare_imagenet_c(imagenet_source, output, **stopped, progress=stop_after(4))
    assert (output / UNFINISHED_MARKER).exists() and len(list(output.glob("*/1/*/*.JPEG"))) == 4 + 4
    # contrast, which the manifest lists, is kept; the stopped build's files would be in no manifest.
    with pytest.raises(DusaError, match=re.escape(
        f"{output} holds a stopped build with files this one would not make: fog/1, gaussian_noise/1 (4 files); "
        "run the stopped command again to finish it"
    )):  # fmt: skip
        prepare_imagenet_c(imagenet_source, output, corruptions=["frost"], **one)
    assert not (output / "frost").exists()
    finished = prepare_imagenet_c(imagenet_source, output, **stopped)
    assert finished.written == 4 and finished["files"].items() >= first["files"].items() and len(finished["files"]) == 12
    chunk = prepare_imagenet_c(imagenet_source, output, corruptions=["frost"], **one)
    assert {path.relative_to(output).as_posix() for path in output.rglob("*.JPEG")} == set(chunk["files"])
    assert len(chunk["files"]) == 16


def test_prepare_imagenet_c_refuses_an_output_inside_the_source(imagenet_source: Path, tmp_path: Path) -> None:
    fast = {"corruptions": ["fog"], "severities": [1], "workers": 1}
    inside = imagenet_source / "out"
    with pytest.raises(DusaError, match=re.escape(f"--output {inside} is inside --source {imagenet_source}")):
        prepare_imagenet_c(imagenet_source, inside, **fast)
    assert not inside.exists()
    with pytest.raises(DusaError, match=re.escape(f"--source {imagenet_source} is inside --output {tmp_path}")):
        prepare_imagenet_c(imagenet_source, tmp_path, **fast)


def test_imagenet_c_preprocessing_is_torchvisions_resize_256_then_centre_crop_224(
    imagenet_source: Path, tmp_path: Path
) -> None:
    # The generation script's transforms; torchvision imports after dusa_cli._compat's shim (1 s).
    from torchvision.transforms import CenterCrop, Resize

    paths = sorted(path for path in imagenet_source.rglob("*") if path.is_file())
    assert len(paths) == 4  # 300×200, 180×260, 256×256, 500×240
    # Besides the fixture's: crop offsets of 73.5 (rounded to 74, not floored to 73), and an upscale.
    rng = np.random.default_rng(1)
    for width, height in ((371, 256), (256, 371), (120, 90)):
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    for path in paths:
        with Image.open(path) as image:
            expected = np.asarray(CenterCrop(224)(Resize(256)(image.convert("RGB"))))
        assert np.array_equal(load_center_crop(path), expected), path


def test_prepare_imagenet_c_refuses_two_source_images_that_would_share_an_output_name(
    imagenet_source: Path, tmp_path: Path
) -> None:
    folder = imagenet_source / "n01440764"
    Image.new("RGB", (64, 48)).save(folder / "img0.png")  # beside img0.JPEG: both would be img0.JPEG
    output = tmp_path / "out"
    with pytest.raises(DusaError, match=re.escape(
        f"{folder / 'img0.JPEG'} and {folder / 'img0.png'} would both be saved as img0.JPEG"
    )):  # fmt: skip
        prepare_imagenet_c(imagenet_source, output, corruptions=["contrast"], severities=[1], workers=1)
    assert not output.exists()  # refused before any file


def test_prepare_imagenet_c_reports_an_unreadable_source_image_from_a_worker(
    imagenet_source: Path, tmp_path: Path
) -> None:
    broken = imagenet_source / "n01440764" / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DusaError, match=re.escape(f"cannot read image {broken}")):
        prepare_imagenet_c(
            imagenet_source, tmp_path / "out", corruptions=["contrast"], severities=[1], workers=2
        )


def test_every_task_without_data_is_named_at_once(tmp_path: Path) -> None:
    """A dataset built with some corruptions or severities only: one line names each corruption
    that lacks data, with the severities it lacks (the first five corruptions, then a count)."""
    for folder in ("fog/3", "fog/5", "snow/5"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "frost.npy").touch()  # CIFAR-C layout: every severity in one file
    require_tasks(tmp_path, ["fog", "frost"], [3, 5], task_source, TASK_LAYOUT)  # all there
    with pytest.raises(DusaError) as caught:
        require_tasks(tmp_path, ALL_CORRUPTIONS, [3, 5], task_source, TASK_LAYOUT)
    absent = ", ".join(f"{name}/{{3,5}}" for name in ALL_CORRUPTIONS[:5])
    assert str(caught.value) == (
        f"no data in {tmp_path} for 17 of the 19 corruptions: {absent} and 12 more (expected {TASK_LAYOUT}); "
        "pick others with --corruption/--severity, or build them with `dusa prepare-data`"
    )
    with pytest.raises(DusaError, match=rf"^no data in {re.escape(str(tmp_path))} for snow/3 \(expected "):
        require_tasks(tmp_path, ["snow"], [3, 5], task_source, TASK_LAYOUT)
    (tmp_path / "images" / "validation" / "snow_5").mkdir(parents=True)  # segmentation: either layout
    (tmp_path / "fog" / "5" / "validation").mkdir()
    with pytest.raises(DusaError, match=r"for 1 of the 3 corruptions: frost/5 \(expected ADE20K-C's "):
        require_tasks(tmp_path, ["fog", "snow", "frost"], [5], seg_task_images, SEG_TASK_LAYOUT)


def test_missing_and_empty_inputs_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DusaError, match=re.escape(f"not found: {missing} (`dusa prepare-data` builds") + ".*ImageNet-C"):
        open_task(missing, "fog", 1)
    with pytest.raises(DusaError, match=re.escape(f"not found: {missing}") + "$"):
        prepare_imagenet_c(missing, tmp_path / "out", corruptions=["fog"], severities=[1])
    with pytest.raises(DusaError, match=re.escape(f"no 'fog' severity 1 data in {tmp_path}: expected folder {tmp_path / 'fog' / '1'}")):
        open_task(tmp_path, "fog", 1)
    (tmp_path / "fog" / "1").mkdir(parents=True)
    with pytest.raises(DusaError, match=re.escape(f"no class folders in {tmp_path / 'fog' / '1'}")):
        open_task(tmp_path, "fog", 1)
    (tmp_path / "fog" / "1" / "n01440764").mkdir()
    with pytest.raises(DusaError, match=re.escape(f"no images in {tmp_path / 'fog' / '1'}")):
        open_task(tmp_path, "fog", 1)
    with pytest.raises(DusaError, match=re.escape(f"no 'fog' severity 2 data in {tmp_path}: expected folder {tmp_path / 'fog' / '2'}")):
        open_task(tmp_path, "fog", 2)
    with pytest.raises(DusaError, match=re.escape(f"not found: {tmp_path / 'train'}")):
        open_split(tmp_path, "train")
    source = tmp_path / "source"
    (source / "n01440764").mkdir(parents=True)
    with pytest.raises(DusaError, match=re.escape(f"no images in {source}")):
        prepare_imagenet_c(source, tmp_path / "out", corruptions=["fog"], severities=[1])


def test_unreadable_image_is_reported_when_read(tmp_path: Path) -> None:
    write_png(tmp_path / "fog" / "1" / "3" / "good.png")
    bad = tmp_path / "fog" / "1" / "3" / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    task = open_task(tmp_path, "fog", 1)
    assert len(task) == 2
    with pytest.raises(DusaError, match=re.escape(f"cannot read image {bad}")) as error:
        task[0]
    assert "\n" not in str(error.value)


def test_unknown_corruption_or_severity_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown corruption 'fogg'"):
        open_task(tmp_path, "fogg", 1)
    with pytest.raises(ConfigError, match="unknown corruption 'all'"):  # a task is one corruption, not a group
        open_task(tmp_path, "all", 1)
    with pytest.raises(ConfigError, match="severity must be one of 1..5, got 6"):
        open_task(tmp_path, "fog", 6)
    with pytest.raises(ConfigError, match="unknown corruption 'fogg'"):
        build_digits_c(tmp_path / "digits", corruptions=["fogg"])
    with pytest.raises(ConfigError, match="severity"):
        build_digits_c(tmp_path / "digits", severities=[0])
    assert not (tmp_path / "digits").exists()
