"""The REQUIRE_MARKERS guard, run in a bare pytest on a file of skipping tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SKIPPING_MODULE = """
import pytest

pytest.importorskip("no_such_module_anywhere")

pytestmark = pytest.mark.{marker}


def test_never_runs():
    pass
"""

SKIPPING_TEST = """
import pytest

@pytest.mark.{marker}
def test_skips():
    pytest.skip("no server")
"""


def run(
    tmp_path: Path, source: str, marker: str, required: str
) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_guarded.py"
    test_file.write_text(source.format(marker=marker))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nmarkers =\n    {marker}: a marker\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.required_markers",
            "-p",
            "no:django",
            "-p",
            "no:cacheprovider",
            "-q",
            str(test_file),
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "REQUIRE_MARKERS": required,
            "PYTHONPATH": str(ROOT),
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # a bare pytest: quick to start
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("source", [SKIPPING_MODULE, SKIPPING_TEST], ids=["collection", "run"])
def test_a_skip_of_a_required_marker_fails_the_run(tmp_path: Path, source: str) -> None:
    result = run(tmp_path, source, "browser", "browser,multiprocess")
    assert result.returncode != 0, result.stdout
    assert "REQUIRE_MARKERS requires browser" in result.stdout


@pytest.mark.parametrize("source", [SKIPPING_MODULE, SKIPPING_TEST], ids=["collection", "run"])
def test_other_skips_stay_skips(tmp_path: Path, source: str) -> None:
    result = run(tmp_path, source, "browser", "multiprocess")
    # 5: nothing ran, the module being skipped; a skip, not a failure.
    assert result.returncode in {0, 5}, result.stdout
    assert "skipped" in result.stdout
