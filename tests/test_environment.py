"""environment.json `inputs` on real tiny SegFormer and SD3 folders: folders are recorded file by
file, large files by a marked sampled hash, and outputs, caches and the data root are left out."""

import hashlib
import shutil
from pathlib import Path

import pytest

from dusa_cli.config.loader import load_config
from dusa_cli.results.environment import FULL_HASH_LIMIT, SAMPLE_BYTES, SAMPLED_SHA256, input_files
from tests.tiny_sd3 import write_tiny_sd3
from tests.tiny_segformer import write_tiny_segformer

PRESET = Path(__file__).parents[1] / "configs" / "seg" / "dusa_sd3_segformer_b5.yaml"


@pytest.fixture(scope="module")
def sd3_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two SD3 folders of the same architecture, different weights."""
    root = tmp_path_factory.mktemp("sd3")
    return write_tiny_sd3(root / "first", seed=0), write_tiny_sd3(root / "second", seed=1)


def seg_inputs(tmp_path: Path, segformer: Path, sd3: Path) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "prompts-0.safetensors").write_bytes(b"derived")
    overrides = {
        "model.checkpoint": str(segformer), "method.prior": str(sd3), "data.root": str(data),
        "method.prompt_cache": str(cache), "run.output": str(tmp_path / "run"),
    }  # fmt: skip
    (tmp_path / "run").mkdir(exist_ok=True)
    return input_files(load_config(PRESET, overrides))


def test_seg_runs_record_the_segformer_and_sd3_folders_file_by_file(sd3_pair: tuple[Path, Path], tmp_path: Path) -> None:
    segformer = write_tiny_segformer(tmp_path / "segformer")
    first, second = sd3_pair
    inputs = seg_inputs(tmp_path, segformer, first)
    assert set(inputs) == {"model.checkpoint", "method.prior", "data.root/manifest.json"}  # no output, cache, data
    checkpoint = inputs["model.checkpoint"]
    assert checkpoint["path"] == str(segformer)
    on_disk = sorted(path for path in segformer.rglob("*") if path.is_file())
    assert checkpoint["files"] == {
        path.relative_to(segformer).as_posix(): {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in on_disk
    }
    prior = inputs["method.prior"]["files"]
    assert {"transformer/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"} <= set(prior)

    # Another SD3 of the same architecture: the same files and sizes, other weights' hashes.
    other = seg_inputs(tmp_path, segformer, second)["method.prior"]["files"]
    assert {name: entry["size"] for name, entry in other.items()} == {name: entry["size"] for name, entry in prior.items()}
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights]["sha256"] != prior[weights]["sha256"]
    assert other["tokenizer/vocab.json"] == prior["tokenizer/vocab.json"]


def test_large_files_get_a_marked_sampled_hash_and_hidden_files_are_skipped(sd3_pair: tuple[Path, Path], tmp_path: Path) -> None:
    segformer = write_tiny_segformer(tmp_path / "segformer")
    large = segformer / "large.bin"
    head, middle, tail = b"h" * SAMPLE_BYTES, b"m" * (FULL_HASH_LIMIT - SAMPLE_BYTES), b"t" * SAMPLE_BYTES
    large.write_bytes(head + middle + tail)  # FULL_HASH_LIMIT + SAMPLE_BYTES: over the limit
    (segformer / ".git").mkdir()
    (segformer / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

    def large_entry() -> dict:
        return seg_inputs(tmp_path, segformer, sd3_pair[0])["model.checkpoint"]["files"]["large.bin"]

    size = len(head + middle + tail)
    sampled = hashlib.sha256(size.to_bytes(8, "little") + head + tail).hexdigest()
    assert large_entry() == {"size": size, SAMPLED_SHA256: sampled}  # no "sha256" key: not a full hash
    assert SAMPLED_SHA256 == "sha256_of_size_first_and_last_4MiB"
    at_limit = segformer / "at_limit.bin"
    with at_limit.open("wb") as stream:
        stream.truncate(FULL_HASH_LIMIT)  # sparse: 64 MiB of zeros without writing them
    files = seg_inputs(tmp_path, segformer, sd3_pair[0])["model.checkpoint"]["files"]
    assert not any(name.startswith(".git") for name in files)
    assert files["at_limit.bin"] == {"size": FULL_HASH_LIMIT, "sha256": hashlib.sha256(bytes(FULL_HASH_LIMIT)).hexdigest()}  # hashed whole
    at_limit.unlink()

    with large.open("r+b") as stream:  # the limit: a change confined to the middle is not seen
        stream.seek(size // 2)
        stream.write(b"X")
    assert large_entry()[SAMPLED_SHA256] == sampled
    with large.open("r+b") as stream:  # a change near either end is
        stream.seek(size - 1)
        stream.write(b"X")
    assert large_entry()[SAMPLED_SHA256] != sampled
    shutil.rmtree(segformer)  # 68 MiB not left behind in pytest's kept temporary folders
