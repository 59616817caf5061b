"""Atomic writes: flushed to the disk before they replace a file, with the mode the umask gives."""

import os
import stat
from pathlib import Path

import pytest

from dusa_cli import writing


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_written_file_has_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    """mkstemp's temporary file is 0600: results would be unreadable to a team sharing a folder."""
    previous = os.umask(umask)
    try:
        writing.write_json_atomic(tmp_path / "results.json", {"top1": 0.5})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode


@pytest.mark.parametrize(("durable", "events"), [(True, ["fsync", "replace"]), (False, ["replace"])])
def test_a_durable_write_reaches_the_disk_before_it_replaces_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, events: list[str]) -> None:
    happened: list[str] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(descriptor: int) -> None:
        happened.append("fsync")
        fsync(descriptor)

    def logged_replace(source: str, target: Path) -> None:
        happened.append("replace")
        replace(source, target)

    monkeypatch.setattr(writing.os, "fsync", logged_fsync)
    monkeypatch.setattr(writing.os, "replace", logged_replace)
    (tmp_path / "image.png").write_bytes(b"old")
    writing.write_bytes_atomic(tmp_path / "image.png", b"new", durable=durable)
    assert happened == events and (tmp_path / "image.png").read_bytes() == b"new"
    assert [path.name for path in tmp_path.iterdir()] == ["image.png"]  # no temporary file left
