"""The test command's crash handling: a test worker that dies takes no test
with it unnoticed (tests/finished_tests.py, tests/run_all_backends.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import once_in_jax_pass

REPO = Path(__file__).resolve().parents[1]

_CRASHES_ONCE = """
import os
from pathlib import Path

def test_first():
    pass

def test_crash_once():
    marker = Path(os.environ["CRASH_MARKER"])
    if not marker.exists():
        marker.touch()
        os.abort()

def test_after_the_crash():
    pass
"""

_PASSES = """
def test_one():
    pass

def test_two():
    pass
"""


def _run(folder: Path, marker: Path, *extra: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:faulthandler",
         "-n", "1", "--dist", "loadfile", "--max-worker-restart=0",
         "--rootdir", str(folder), "-c", str(folder / "pytest.ini"), *extra],
        cwd=folder, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CRASH_MARKER": str(marker),
             "PYTHONPATH": str(REPO)},
    )
    return done.returncode, done.stdout + done.stderr


def _counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


@once_in_jax_pass
def test_a_crashed_worker_leaves_its_tests_for_skip_finished(tmp_path):
    """After a worker crash, `--skip-finished` runs the crashed test and the
    ones its worker never reached, and nothing that passed."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "from tests.finished_tests import add_option as pytest_addoption\n"
        "from tests.finished_tests import register as pytest_configure\n"
    )
    (tmp_path / "test_a_crash.py").write_text(_CRASHES_ONCE)
    for name in ("b", "c", "d"):
        (tmp_path / f"test_{name}.py").write_text(_PASSES)
    marker = tmp_path / "crashed"

    code, output = _run(tmp_path, marker)
    assert code != 0 and "crashed while running" in output, output
    first = _counts(output)
    assert first["failed"] == 1 and first.get("passed", 0) < 8, output

    code, output = _run(tmp_path, marker, "--skip-finished")
    assert code == 0, output
    second = _counts(output)
    # Every test has now passed exactly once, apart from the crashed one.
    assert first["passed"] + second["passed"] == 9, (first, second)

    code, output = _run(tmp_path, marker, "--skip-finished")
    assert code == 5 and "no tests ran" in output, output  # nothing left
