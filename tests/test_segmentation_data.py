"""ADE20K-C: building it, reading both layouts, label reduction and the mIoU metric."""

import hashlib
import json
import math
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dusa_cli.data.ade20k_c import prepare_ade20k_c
from dusa_cli.data.segmentation import open_seg_task, reduce_ade_labels
from dusa_cli.errors import ConfigError, DusaError, Stopped
from dusa_cli.results.seg_metrics import SegmentationScore
from tests.helpers import assert_one_line_error, dusa

# Native sizes differ per image, as in ADE20K; every side at least 32 px (imagecorruptions).
SIZES = {"ADE_val_00000001": (40, 56), "ADE_val_00000002": (48, 36), "ADE_val_00000003": (32, 32)}
FAST = {"corruptions": ["gaussian_noise", "contrast"], "workers": 1}  # severity: the default, 5, the only one ADE20K-C has (§3.8)


def _fake_ade(root: Path) -> Path:
    rng = np.random.default_rng(0)
    images, labels = root / "images" / "validation", root / "annotations" / "validation"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for stem, (height, width) in SIZES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{stem}.jpg")
        label = rng.integers(0, 151, (height, width), dtype=np.uint8)
        label[0, :3] = (0, 1, 150)
        Image.fromarray(label).save(labels / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_ade(tmp_path_factory.mktemp("ADEChallengeData2016"))


@pytest.fixture(scope="module")
def ade_c(ade: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("ade20k_c")
    prepare_ade20k_c(ade, output, **FAST)
    return output


def test_prepare_writes_the_official_layout_at_native_size(ade: Path, ade_c: Path) -> None:
    for corruption in FAST["corruptions"]:
        folder = ade_c / corruption / "5" / "validation"
        assert sorted(path.name for path in folder.iterdir()) == [f"{stem}.jpg" for stem in SIZES]
        for stem, (height, width) in SIZES.items():
            with Image.open(folder / f"{stem}.jpg") as image:
                assert image.format == "JPEG" and image.size == (width, height)
            clean = np.asarray(Image.open(ade / "images" / "validation" / f"{stem}.jpg"), dtype=float)
            assert np.abs(np.asarray(Image.open(folder / f"{stem}.jpg"), dtype=float) - clean).mean() > 5
    for stem in SIZES:
        copied = ade_c / "annotations" / "validation" / f"{stem}.png"
        assert copied.read_bytes() == (ade / "annotations" / "validation" / f"{stem}.png").read_bytes()


def test_manifest_counts_and_checksums(ade_c: Path) -> None:
    manifest = json.loads((ade_c / "manifest.json").read_text())
    assert manifest["dataset"] == "ade20k-c" and manifest["image_size"] == "native"
    assert manifest["images"] == 3 and manifest["jpeg_quality"] == 75
    assert manifest["counts"] == {"gaussian_noise": {"5": 3}, "contrast": {"5": 3}}
    assert len(manifest["files"]) == 3 * 2 + 3  # corrupted images + label maps
    for relative_path, digest in manifest["files"].items():
        assert hashlib.sha256((ade_c / relative_path).read_bytes()).hexdigest() == digest


def test_prepare_is_deterministic_across_workers_and_resumes(ade: Path, ade_c: Path, tmp_path: Path) -> None:
    manifest = json.loads((ade_c / "manifest.json").read_text())
    again = prepare_ade20k_c(ade, tmp_path / "out", **(FAST | {"workers": 2}))
    assert again["files"] == manifest["files"]
    # A truncated file is made again, identically; a complete one is kept.
    broken = tmp_path / "out" / "contrast" / "5" / "validation" / "ADE_val_00000002.jpg"
    broken.write_bytes(broken.read_bytes()[:50])
    kept = tmp_path / "out" / "gaussian_noise" / "5" / "validation" / "ADE_val_00000001.jpg"
    mtime = kept.stat().st_mtime_ns
    assert prepare_ade20k_c(ade, tmp_path / "out", **FAST)["files"] == manifest["files"]
    assert kept.stat().st_mtime_ns == mtime
    with pytest.raises(DusaError, match="other settings"):
        prepare_ade20k_c(ade, tmp_path / "out", **FAST, seed=1)


def test_prepare_over_a_stopped_build_refuses_the_files_it_would_not_make(ade: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"

    def stop(done: int, total: int) -> None:  # as Ctrl-C, after the first image's two files
        if done >= 2:
            raise Stopped(signal.SIGINT)

    with pytest.raises(Stopped):
        prepare_ade20k_c(ade, output, **FAST, progress=stop)
    assert not (output / "manifest.json").exists() and len(list(output.glob("*/5/validation/*.jpg"))) == 2
    # The label maps, which every build copies, are not among them.
    with pytest.raises(DusaError, match=re.escape(
        f"{output} holds a stopped build with files this one would not make: contrast/5, gaussian_noise/5 (2 files); "
        "run the stopped command again to finish it"
    )):  # fmt: skip
        prepare_ade20k_c(ade, output, **(FAST | {"corruptions": ["fog"]}))
    assert not (output / "fog").exists()
    assert prepare_ade20k_c(ade, output, **FAST).written == 4  # the stopped command finishes it
    chunk = prepare_ade20k_c(ade, output, **(FAST | {"corruptions": ["fog"]}))
    on_disk = {path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file() and not path.name.startswith(".")}
    assert on_disk == set(chunk["files"]) | {"manifest.json"} and len(chunk["files"]) == 3 * 3 + 3


def test_both_layouts_give_the_same_items(ade: Path, ade_c: Path, tmp_path: Path) -> None:
    beside_clean = tmp_path / "ADEChallengeData2016"
    (beside_clean / "images" / "validation").mkdir(parents=True)
    shutil.copytree(ade_c / "contrast" / "5" / "validation", beside_clean / "images" / "validation" / "contrast_5")
    shutil.copytree(ade / "annotations", beside_clean / "annotations")
    official = open_seg_task(ade_c, "contrast", 5)
    other = open_seg_task(beside_clean, "contrast", 5)
    external = open_seg_task(ade_c, "contrast", 5, annotations=ade / "annotations" / "validation")
    assert len(official) == len(other) == len(external) == 3
    for index, (height, width) in enumerate(SIZES.values()):
        image, label = official[index]
        assert image.dtype == torch.uint8 and image.shape == (3, height, width)
        assert label.dtype == torch.int64 and label.shape == (height, width)
        for twin in (other, external):
            assert torch.equal(twin[index][0], image) and torch.equal(twin[index][1], label)
        assert label[0, :3].tolist() == [255, 0, 149]
        assert label.max() <= 255 and set(label.unique().tolist()) <= set(range(150)) | {255}
    subset = open_seg_task(ade_c, "gaussian_noise", 5, num_ex=2)
    assert len(subset) == 2
    # A root holding both layouts reads the official one (here the other holds one image fewer).
    shutil.copytree(ade_c / "contrast", beside_clean / "contrast")
    next((beside_clean / "images" / "validation" / "contrast_5").iterdir()).unlink()
    assert len(open_seg_task(beside_clean, "contrast", 5)) == 3


def test_label_reduction() -> None:
    label = np.array([[0, 1, 2], [75, 149, 150]], dtype=np.uint8)
    assert reduce_ade_labels(label).tolist() == [[255, 0, 1], [74, 148, 149]]
    assert reduce_ade_labels(label).dtype == np.int64


def test_reader_errors_name_the_path(ade: Path, ade_c: Path, tmp_path: Path) -> None:
    with pytest.raises(DusaError, match=f"no 'fog' severity 5 data in {re.escape(str(ade_c))}: expected folder"):
        open_seg_task(ade_c, "fog", 5)
    with pytest.raises(ConfigError, match="unknown corruption"):
        open_seg_task(ade_c, "rain", 5)
    with pytest.raises(DusaError, match="annotation folder not found"):
        open_seg_task(ade_c, "gaussian_noise", 5, annotations=tmp_path / "nowhere")
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem in list(SIZES)[:2]:
        (labels / f"{stem}.png").write_bytes((ade / "annotations" / "validation" / f"{stem}.png").read_bytes())
    with pytest.raises(DusaError, match="no label map for .*ADE_val_00000003.jpg"):
        open_seg_task(ade_c, "gaussian_noise", 5, annotations=labels)
    Image.fromarray(np.zeros((33, 32), np.uint8)).save(labels / "ADE_val_00000003.png")
    task = open_seg_task(ade_c, "gaussian_noise", 5, annotations=labels)
    with pytest.raises(DusaError, match=r"ADE_val_00000003.jpg is 32×32 but its label map .* is 32×33"):
        task[2]


def test_prepare_errors_name_the_path(ade: Path, tmp_path: Path) -> None:
    with pytest.raises(DusaError, match="ADE20K image folder not found"):
        prepare_ade20k_c(tmp_path, tmp_path / "out", **FAST)
    source = _fake_ade(tmp_path / "src")
    (source / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DusaError, match="no label map for .*ADE_val_00000002.jpg"):
        prepare_ade20k_c(source, tmp_path / "out", **FAST)
    # imagecorruptions would fail on it minutes later, naming no file.
    narrow = source / "images" / "validation" / "ADE_val_00000004.jpg"
    Image.fromarray(np.zeros((40, 31, 3), np.uint8)).save(narrow)
    Image.fromarray(np.zeros((40, 31), np.uint8)).save(source / "annotations" / "validation" / "ADE_val_00000004.png")
    (source / "images" / "validation" / "ADE_val_00000002.jpg").unlink()  # its label map is gone (above)
    with pytest.raises(DusaError, match=re.escape(f"{narrow} is 31×40 px; the corruptions need images at least 32 px wide and high")):
        prepare_ade20k_c(source, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_miou_on_a_hand_computed_example() -> None:
    # 4 classes; class 3 is in neither prediction nor ground truth, one pixel is ignored.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    score = SegmentationScore(num_classes=4)
    score.update(pred[:1], target[:1])
    score.update(pred[1:], target[1:])
    result = score.compute()
    # class 0: intersection 2 (pixels 0,0 and 1,3), union 4 → 0.5; class 1: 2 / 3; class 2: 1 / 2.
    assert result["per_class_iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5]) and result["per_class_iou"][3] is None
    assert result["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)
    assert math.isnan(SegmentationScore(num_classes=4).compute()["miou"])
    # A class only predicted (never in the ground truth) counts, with IoU 0, as in MMSeg.
    only_predicted = SegmentationScore(num_classes=2)
    only_predicted.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert only_predicted.compute()["per_class_iou"] == [0.5, 0.0]
    assert only_predicted.compute()["miou"] == pytest.approx(0.25)
    with pytest.raises(DusaError, match="outside"):
        score.update(torch.tensor([4]), torch.tensor([0]))


def test_cli_prepare_ade20k_c(ade: Path, tmp_path: Path) -> None:
    output = tmp_path / "cli"
    result = dusa("prepare-data", "ade20k-c", "--source", str(ade), "-o", str(output), "--corruption", "fog,contrast", "--workers", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert f"wrote 9 of the 9 files in {output}" in result.stderr  # 2 × 3 images and 3 label maps
    assert (output / "fog" / "5" / "validation" / "ADE_val_00000001.jpg").is_file()
    assert json.loads((output / "manifest.json").read_text())["severities"] == [5]
    # A call for fewer corruptions writes nothing, and the manifest still lists the others.
    fewer = dusa("prepare-data", "ade20k-c", "--source", str(ade), "-o", str(output), "--corruption", "fog", "--workers", "1", "-q")
    assert fewer.returncode == 0 and f"wrote 0 of the 9 files in {output}" in fewer.stderr, fewer.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["corruptions"] == ["fog", "contrast"] and len(manifest["files"]) == 9
    missing = dusa("prepare-data", "ade20k-c", "-o", str(output))
    assert_one_line_error(missing, 2, "ade20k-c needs --source")
    results = tmp_path / "results"  # a folder that holds something else is never written into
    results.mkdir()
    (results / "results.json").write_text("{}")
    foreign = dusa("prepare-data", "ade20k-c", "--source", str(ade), "-o", str(results), "--corruption", "fog")
    assert_one_line_error(foreign, 1, "is not empty and holds no build of `dusa prepare-data`")
