"""Writing corrupted copies of images: reproducible, parallel and resumable.

The builders (digits-C, ImageNet-C from a folder, ADE20K-C) describe their work as `Job`s, one per source
image, and hand them to `run_jobs`. Every output file gets its own seed derived from
(seed, corruption, severity, item id), so the bytes written do not depend on the number of
workers or on the order in which files are made.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dusa_cli.data.corruptions import ALL_CORRUPTIONS
from dusa_cli.data.files import UNFINISHED_MARKER, absolute_path, sha256_hex, usable_cores
from dusa_cli.errors import DusaError, listed
from dusa_cli.writing import check_writable, write_bytes_atomic

Progress = Callable[[int, int], None]

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
# imagecorruptions refuses images narrower or lower than this.
MIN_SIDE = 32

# These two draw from generators of their own (numba's, and skimage's `random_noise`), which
# ignore `np.random.seed`; they take the seed as an argument instead.
_SEED_ARGUMENT_CORRUPTIONS = frozenset({"glass_blur", "impulse_noise"})


@dataclass(frozen=True)
class ImageFormat:
    suffix: str
    pil_format: str
    save_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What every job writes; sent to the workers with each job."""

    output: Path
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int
    image_format: ImageFormat
    # (height, width) of every output, which a resumed file must match; None: each job's own
    image_size: tuple[int, int] | None
    resume: bool  # keep outputs that exist and decode, instead of writing them again


@dataclass(frozen=True)
class Job:
    """One source image and the files made from it."""

    item_id: str  # "<class>/<stem>": output name under each folder, and part of each file's seed
    load: Callable[[], np.ndarray]  # returns the H×W×3 uint8 image at output size; must pickle
    copies: tuple[str, ...] = ()  # folders that receive the image uncorrupted, e.g. ("clean",)
    corrupted: bool = True  # whether the job also writes every (corruption, severity)
    image_size: tuple[int, int] | None = None  # (height, width) of its outputs, if not the plan's


def file_seed(seed: int, corruption: str, severity: int, item_id: str) -> int:
    """A 32-bit seed from a stable hash (Python's `hash()` changes between processes)."""
    key = f"{seed}/{corruption}/{severity}/{item_id}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Apply one ImageNet-C corruption reproducibly; `image` is H×W×3 uint8, at least MIN_SIDE px."""
    import imagecorruptions  # scipy.ndimage and OpenCV, half a second that only a data build needs

    np.random.seed(seed)
    if corruption == "spatter":
        return _spatter(image, severity)
    options = {"seed": seed} if corruption in _SEED_ARGUMENT_CORRUPTIONS else {}
    return imagecorruptions.corrupt(image, corruption_name=corruption, severity=severity, **options)


def _spatter(image: np.ndarray, severity: int) -> np.ndarray:
    # Spatter at severities 1-3 divides its liquid layer by the layer's maximum. On small images
    # (5 of the 599 digits-C test images at severity 1, seed 0) the layer can be empty; the 0/0
    # makes the whole image NaN and the cast to uint8 turns it black. No liquid means no spatter.
    import imagecorruptions

    with np.errstate(invalid="raise"):
        try:
            return imagecorruptions.corrupt(image, corruption_name="spatter", severity=severity)
        except FloatingPointError:
            return image.copy()


def encode_image(image: np.ndarray, image_format: ImageFormat) -> bytes:
    # PIL writes no timestamp or other run-dependent metadata, so equal pixels give equal bytes.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format.pil_format, **image_format.save_options)
    return buffer.getvalue()


def _outputs(plan: Plan, job: Job) -> list[tuple[str, str | None, int]]:
    """(relative path, corruption or None for an uncorrupted copy, severity) per file of `job`."""
    name = job.item_id + plan.image_format.suffix
    outputs: list[tuple[str, str | None, int]] = [
        (f"{folder}/{name}", None, 0) for folder in job.copies
    ]
    if job.corrupted:
        outputs += [
            (f"{corruption}/{severity}/{name}", corruption, severity)
            for corruption in plan.corruptions
            for severity in plan.severities
        ]
    return outputs


def _complete_file(path: Path, size: tuple[int, int]) -> bytes | None:
    """The bytes of `path` if it exists and decodes to an image of `size`, else None."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return data if (image.height, image.width) == size else None
    except (OSError, ValueError, SyntaxError):
        return None


@dataclass
class BuildFiles:
    """Files of a build, and how many of them this call wrote (a resumed build keeps the rest)."""

    checksums: dict[str, str] = field(default_factory=dict)  # relative path → sha256
    written: int = 0

    def add(self, other: BuildFiles) -> None:
        self.checksums.update(other.checksums)
        self.written += other.written


def run_job(plan: Plan, job: Job) -> BuildFiles:
    """Write the files of one job (those a resumed build lacks)."""
    image: np.ndarray | None = None  # loaded only when some output has to be made
    files = BuildFiles()
    size = job.image_size or plan.image_size
    assert size is not None, "a plan without image_size needs jobs that have one"
    for relative_path, corruption, severity in _outputs(plan, job):
        path = plan.output / relative_path
        data = _complete_file(path, size) if plan.resume else None
        if data is None:
            if image is None:
                image = job.load()
            result = image
            if corruption is not None:
                seed = file_seed(plan.seed, corruption, severity, job.item_id)
                result = corrupt_image(image, corruption, severity, seed)
            data = encode_image(result, plan.image_format)
            write_bytes_atomic(path, data, durable=False)
            files.written += 1
        files.checksums[relative_path] = sha256_hex(data)
    return files


def run_batch(plan: Plan, jobs: Sequence[Job]) -> BuildFiles:
    files = BuildFiles()
    for job in jobs:
        files.add(run_job(plan, job))
    return files


def _batches(plan: Plan, jobs: Iterable[Job], min_outputs: int) -> Iterator[list[Job]]:
    """Consecutive jobs grouped until each group makes at least `min_outputs` files."""
    batch: list[Job] = []
    outputs = 0
    for job in jobs:
        batch.append(job)
        outputs += len(_outputs(plan, job))
        if outputs >= min_outputs:
            yield batch
            batch, outputs = [], 0
    if batch:
        yield batch


def planned_files(plan: Plan, jobs: Iterable[Job]) -> set[str]:
    """The relative path of every file the jobs will write."""
    return {relative_path for job in jobs for relative_path, _, _ in _outputs(plan, job)}


def _carried_interrupt(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or a Stopped signal) behind `error`, if any.

    A signal whose handler raises while numba's compiled code runs (glass_blur) comes back from
    the call as "SystemError: ... returned a result with an exception set", the interrupt as its
    cause; the command must still end as a stop, not as a failure."""
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def run_jobs(
    plan: Plan, jobs: Sequence[Job], workers: int | None, progress: Progress | None = None
) -> BuildFiles:
    """Run all jobs (in `workers` processes when above 1; None: one per usable core)."""
    workers = usable_cores() if workers is None else workers
    total = sum(len(_outputs(plan, job)) for job in jobs)
    files = BuildFiles()
    write_bytes_atomic(plan.output / UNFINISHED_MARKER, b"")  # until write_manifest

    def record(results: BuildFiles) -> None:
        files.add(results)
        if progress is not None:
            progress(len(files.checksums), total)

    if workers <= 1:
        for job in jobs:
            try:
                record(run_job(plan, job))
            except SystemError as error:
                interrupt = _carried_interrupt(error)
                if interrupt is None:
                    raise
                raise interrupt from None
        return files
    # Sending a job to a worker costs about a millisecond, more than writing one small file, so
    # cheap jobs (one clean copy each) travel in groups.
    batches = _batches(plan, jobs, min_outputs=64)
    # `spawn` rather than `fork`: forking a process that already runs torch's thread pools can
    # deadlock the children.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_follow_the_parent)
    try:
        # A bounded window of submitted batches keeps memory flat for 50 000-image sources and lets
        # an error stop the run soon rather than after everything was queued.
        pending: set[Future[BuildFiles]] = {
            pool.submit(run_batch, plan, batch) for batch in itertools.islice(batches, 4 * workers)
        }
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                record(future.result())  # re-raises a worker's DusaError here
                next_batch = next(batches, None)
                if next_batch is not None:
                    pending.add(pool.submit(run_batch, plan, next_batch))
    finally:
        pool.shutdown(cancel_futures=True)
    return files


def _follow_the_parent() -> None:
    """A worker leaves stops to the parent: a terminal's Ctrl-C reaches every process of the
    group, and the parent, not each worker (with a traceback), stops the build. Where Linux
    allows, a worker also ends with the parent, so none is left writing after `quit at once`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def corruption_counts(
    checksums: dict[str, str], corruptions: Sequence[str], severities: Sequence[int]
) -> dict[str, dict[str, int]]:
    """Files per corruption and severity (severities as strings, since JSON keys are)."""
    counts = {c: {str(severity): 0 for severity in severities} for c in corruptions}
    for relative_path in checksums:
        corruption, severity, *_ = relative_path.split("/")
        if corruption in counts:
            counts[corruption][severity] += 1
    return counts


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code decides the bytes of the generated images."""
    import cv2  # imported by imagecorruptions anyway
    import scipy
    import skimage
    import sklearn

    def distribution_version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "numpy": np.__version__,
        "imagecorruptions": distribution_version("imagecorruptions-imaug"),
        "pillow": Image.__version__,
        "opencv": cv2.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "scikit-learn": sklearn.__version__,
    }


class Manifest(dict):  # type: ignore[type-arg]
    """What manifest.json holds, and how many of its files this call wrote (not in the file, which
    describes the data alone: a resumed build writes the same manifest as an uninterrupted one)."""

    def __init__(self, content: dict[str, Any], written: int):
        super().__init__(content)
        self.written = written


def _corruptions_present(plan: Plan, checksums: dict[str, str]) -> tuple[list[str], list[int]]:
    """The corruptions and severities among the files (an earlier call may have made others than
    this one's), in the papers' order."""
    corruptions, severities = set(plan.corruptions), set(plan.severities)
    for relative_path in checksums:
        corruption, severity, *_ = relative_path.split("/")
        if corruption in ALL_CORRUPTIONS and severity.isdigit():
            corruptions.add(corruption)
            severities.add(int(severity))
    return [name for name in ALL_CORRUPTIONS if name in corruptions], sorted(severities)


def write_manifest(plan: Plan, files: BuildFiles, description: dict[str, Any]) -> Manifest:
    """The dataset's own description plus what every build records: seed, corruptions,
    severities, counts, library versions and a sha256 per file. Written last, atomically."""
    corruptions, severities = _corruptions_present(plan, files.checksums)
    manifest = {
        **description,
        "seed": plan.seed,
        "image_size": list(plan.image_size) if plan.image_size else "native",
        "corruptions": corruptions,
        "severities": severities,
        "counts": corruption_counts(files.checksums, corruptions, severities),
        "versions": library_versions(),
        "files": dict(sorted(files.checksums.items())),
    }
    write_bytes_atomic(plan.output / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    (plan.output / UNFINISHED_MARKER).unlink(missing_ok=True)
    return Manifest(manifest, files.written)


def _earlier_manifest(output: Path) -> dict[str, Any]:
    """manifest.json in `output` as an earlier build wrote it; empty where there is none to read."""
    try:
        manifest = json.loads((output / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def listed_files(output: Path) -> dict[str, str]:
    """relative path → sha256 of the files that manifest.json in `output` lists; none without one."""
    listed = _earlier_manifest(output).get("files")
    if not isinstance(listed, dict):
        return {}
    # Only plain relative paths: a hand-edited manifest must not reach files outside `output`.
    paths = ((Path(name), digest) for name, digest in listed.items())
    return {path.as_posix(): digest for path, digest in paths if not path.is_absolute() and ".." not in path.parts}


def _stopped(output: Path) -> bool:
    """Whether a build in `output` stopped before writing its manifest (digits-c's rebuild deletes
    the earlier one's first); an empty or new folder is a build not yet begun."""
    return (output / UNFINISHED_MARKER).exists() or not (output / "manifest.json").is_file()


def _files_on_disk(output: Path) -> set[str]:
    """Relative paths of the files in `output`, but manifest.json and hidden ones (a build's records,
    the temporary files of atomic writes)."""
    found: set[str] = set()
    for folder, subfolders, names in os.walk(output):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(folder).relative_to(output)
        found.update((relative / name).as_posix() for name in names if not name.startswith("."))
    found.discard("manifest.json")
    return found


def unlisted_files(output: Path) -> set[str]:
    """The files a build stopped before its manifest left in `output` that no manifest lists
    (relative paths). None in a complete build, whose manifest is its record: its folder is not walked."""
    if not output.is_dir() or not _stopped(output):
        return set()
    return _files_on_disk(output) - set(listed_files(output))


def describe_files(paths: set[str]) -> str:
    """The folders the files are in (a split, or corruption/severity), e.g. "fog/3, fog/4 (160 files)"."""
    folders = sorted({path.rsplit("/", 2)[0] for path in paths})
    return f"{listed(folders)} ({len(paths)} files)"


# What a resumable build (imagenet-c, ade20k-c) over a stopped one of other corruptions says to do.
FINISH_FIRST = "run the stopped command again to finish it, delete them, or choose another --output"


def files_not_made(output: Path, earlier: Iterable[str], planned: set[str], remedy: str | None) -> set[str]:
    """The files of an earlier build in `output` (complete or stopped) that this build would not
    make. Where there are some and a `remedy` is given, the build is refused before any work: its
    manifest would not list them, yet a run would read them as data."""
    unmade = set(earlier) - planned
    if unmade and remedy is not None:
        build = "a stopped build" if _stopped(output) else "an earlier build"
        raise DusaError(f"{output} holds {build} with files this one would not make: {describe_files(unmade)}; {remedy}")
    return unmade


def check_apart(source: Path, output: Path) -> None:
    """Refuse an output inside the source (the next build from the source would read it, as a
    class folder) and a source inside the output."""
    real_source, real_output = source.resolve(), output.resolve()
    if real_output.is_relative_to(real_source):
        raise DusaError(f"--output {output} is inside --source {source}; choose an output outside it")
    if real_source.is_relative_to(real_output):
        raise DusaError(f"--source {source} is inside --output {output}; choose an output that does not hold it")


def earlier_files(output: Path, source: Path) -> dict[str, str]:
    """The files an earlier build of the same dataset in `output` made that are still there
    (relative path → sha256): a call for fewer corruptions keeps them, so its manifest lists them.
    An earlier build from another source is refused: its files would pass for this source's."""
    earlier_source = _earlier_manifest(output).get("source")
    if not isinstance(earlier_source, str):
        return {}
    _check_same_source(output, earlier_source, source)
    return {path: digest for path, digest in listed_files(output).items() if (output / path).is_file()}


def _check_same_source(output: Path, earlier_source: str, source: Path) -> None:
    # Older records stored the source as given, often relative: it is resolved from here.
    if absolute_path(Path(earlier_source)).resolve() != source.resolve():
        raise DusaError(f"{output} holds a build from {earlier_source}, not {source}; use that --source or a new --output")


# Records a resumable build's settings and source in its output directory, before any file.
SETTINGS_FILE = ".dusa-prepare.json"


def claim_output(output: Path, settings: dict[str, Any], source: Path) -> None:
    """Record the settings and the source in `output`, refusing to resume a build made with
    other ones (an interrupted first build has no manifest yet to say where its files came from)
    and to write into a folder that holds something else (a results directory, another dataset)."""
    record = settings | {"source": str(absolute_path(source))}
    check_writable(output, directory=True)  # not a file, nor under one; writable
    settings_path = output / SETTINGS_FILE
    if not settings_path.is_file() and output.is_dir() and any(output.iterdir()):
        raise DusaError(f"{output} is not empty and holds no build of `dusa prepare-data`; choose a new or empty --output")
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text())
        except (OSError, ValueError) as exc:
            raise DusaError(f"cannot read {settings_path}: {exc}") from exc
        earlier_source = previous.pop("source", None) if isinstance(previous, dict) else None
        if isinstance(earlier_source, str):
            _check_same_source(output, earlier_source, source)
        if previous != settings:
            raise DusaError(
                f"{output} holds files made with other settings ({previous}, see {settings_path}); "
                "use the same seed or a new output directory"
            )
        if isinstance(earlier_source, str):
            return
    # A settings file of a build before sources were recorded is completed (its manifest, if
    # written, is checked by earlier_files).
    write_bytes_atomic(settings_path, json.dumps(record).encode())
