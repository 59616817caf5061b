"""Running the real `dusa` command in a subprocess, and what its errors must look like."""

import os
import subprocess
import sys
from pathlib import Path


def dusa(*args: str, cwd: Path | None = None, columns: int = 200) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": str(columns), "DUSA_DEBUG": "0"}
    return subprocess.run(
        [sys.executable, "-m", "dusa_cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr
