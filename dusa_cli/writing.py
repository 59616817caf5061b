"""Atomic writes, for every file dusa writes (results, caches, weights, datasets): a file either
holds its previous content or the complete new one; and a check that a path can be written."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dusa_cli.errors import DusaError


def check_writable(path: Path, *, directory: bool = False) -> None:
    """Fail now, before the work, if `path` cannot be written: a file (or with `directory`, a
    folder) whose nearest existing ancestor is not a writable folder. Nothing is left behind."""
    if path.exists() and path.is_dir() != directory:
        raise DusaError(f"cannot write {path}: it is {'a file' if directory else 'a directory'}")
    place = path if directory and path.exists() else path.parent
    while not place.exists():
        place = place.parent
    try:
        if not place.is_dir():
            raise NotADirectoryError(f"{place} is a file")
        tempfile.TemporaryFile(dir=place).close()  # what the atomic writes will do there
    except OSError as error:
        raise DusaError(f"cannot write {path}: {error.strerror or error}") from None


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> None:
    """`write` fills a hidden temporary file beside `path` (`.NAME.xxxx`: no reader takes it for
    data), which then replaces `path`. `durable`: flushed to the disk first, so that a power
    loss leaves the old or the new file; a dataset's images skip it (hundreds of thousands of
    files, each checked by decoding when a build resumes)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:  # a read-only place, a file where a folder should be: the user's to fix
        raise DusaError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a quota
        Path(temporary).unlink(missing_ok=True)
        raise DusaError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    write_atomic(path, lambda stream: stream.write(data), durable=durable)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(_json_ready(data), indent=2, allow_nan=False) + "\n")


def _json_ready(value: Any) -> Any:
    """JSON has no NaN or infinity (Python writes them, most readers refuse them): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value
