"""Shared fixtures: a small real digits-C built once per session, and hooks into the processes
of the runs that tests start."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dusa_cli._compat  # noqa: F401  (torchvision shim before timm)
from dusa_cli.data.digits import build_digits_c

TINY_CORRUPTIONS = ("gaussian_noise", "fog")

# Imported by every process of a run started with the `hooks` environment: logs each results
# write with the writer's rank, and the sum of the trained parameters after each update.
# DUSA_TEST_FAULT=RANK:FAULT:N makes the process of that rank (0 when alone) die (kill: SIGKILL)
# or hang (hang) after N adaptation steps, or hang in its write after the Nth (hang-write), with
# the write's temporary file filled but not yet in place; a process hangs once (hang-writes: in
# every write from then on, the stop's own too), and says so in the hang log first.
HOOKS = '''
import os
if os.environ.get("DUSA_TEST_HOOKS"):
    import signal, time
    import dusa_cli.writing as io
    from dusa_cli.engine.adapter import OnlineAdapter

    write, step, flush, counts = io.write_atomic, OnlineAdapter.step, OnlineAdapter.flush, {"step": 0, "write": 0}

    def fail(event):
        counts[event] += 1
        rank, fault, after = os.environ.get("DUSA_TEST_FAULT", "::").split(":")
        if os.environ.get("RANK", "0") != rank or counts[event] <= int(after or 0):
            return
        if (event, fault) == ("step", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        again = fault == "hang-writes"  # else once: the writes of the stop that ends the hang go through
        if (event, fault) in (("step", "hang"), ("write", "hang-write"), ("write", "hang-writes")) and (again or not counts.get("hung")):
            counts["hung"] = 1
            with open(os.environ["DUSA_TEST_HANG_LOG"], "a") as log:
                log.write(f"{rank} {event}\\n")
            time.sleep(3600)

    def logged_flush(self):
        updates = self.pending
        flush(self)
        if updates:
            with open(os.environ["DUSA_TEST_PARAMETER_LOG"], "a") as log:
                log.write(f"{os.environ.get('RANK')} {sum(float(p.detach().double().sum()) for p in self.params)!r}\\n")

    def logged_write(path, fill, *args, **kwargs):
        with open(os.environ["DUSA_TEST_WRITE_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK')} {path}\\n")

        def faulty_fill(stream):
            fill(stream)
            fail("write")

        return write(path, faulty_fill, *args, **kwargs)

    def faulty_step(self, *args, **kwargs):
        fail("step")
        return step(self, *args, **kwargs)

    io.write_atomic, OnlineAdapter.step, OnlineAdapter.flush = logged_write, faulty_step, logged_flush
'''


@pytest.fixture(scope="session")
def digits_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full clean train split, 4 test images per class, two corruptions at severity 5."""
    root = tmp_path_factory.mktemp("digits-c")
    build_digits_c(root, seed=0, corruptions=TINY_CORRUPTIONS, severities=[5], workers=1, limit_per_class=4)
    return root


@pytest.fixture
def hooks(tmp_path: Path) -> dict[str, str]:
    """The environment that installs HOOKS in a run's processes (logs and faults in tmp_path)."""
    folder = tmp_path / "hooks"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HOOKS)
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
        "DUSA_TEST_HOOKS": "1",
        "DUSA_TEST_WRITE_LOG": str(tmp_path / "writes.log"),
        "DUSA_TEST_PARAMETER_LOG": str(tmp_path / "parameters.log"),
        "DUSA_TEST_HANG_LOG": str(tmp_path / "hangs.log"),
        "DUSA_DIST_TIMEOUT_S": "20",
        "COLUMNS": "200",
    }


@pytest.fixture()
def imagenet_source(tmp_path: Path) -> Path:
    """Four small photos-to-be in two wnid folders, as JPEG and PNG, landscape and portrait."""
    source = tmp_path / "val"
    rng = np.random.default_rng(0)
    sizes_per_class = {"n01440764": [(300, 200), (180, 260)], "n15075141": [(256, 256), (500, 240)]}
    for wnid, sizes in sizes_per_class.items():
        for number, size in enumerate(sizes):
            (source / wnid).mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            suffix = ".JPEG" if number == 0 else ".png"
            Image.fromarray(noise).save(source / wnid / f"img{number}{suffix}")
    return source
