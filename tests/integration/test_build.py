"""The installed command runs the build that the tests run: compiled hot path, importable anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxy


def test_compiled_build_runs_from_any_directory(tmp_path: Path) -> None:
    """Outside the checkout only the installed import machinery applies: the compiled modules and
    their shared library (a top-level module) must be found there too, by `python -m` and the script."""
    expected = f"uvgate {proxy.__version__} ({'mypyc-compiled' if proxy.compiled() else 'pure Python'})"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    script = shutil.which("uvgate", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the uvgate console script is not installed next to this interpreter")
    out = subprocess.run([script, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_hot_path_is_compiled_unless_asked_not_to() -> None:
    """`make build` compiles the request path; only UVGATE_PURE_PYTHON=1 builds leave it interpreted."""
    if os.environ.get("UVGATE_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("pure-Python build requested")
    assert proxy.compiled()
