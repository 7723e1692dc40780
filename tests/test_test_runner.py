"""Django's test runner on the ENGINE: create, clone (--parallel), use, destroy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def databases(admin: Any) -> set[str]:
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE '%pgpool_runner%'")
        return {row[0] for row in cur.fetchall()}


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_django_test_runner_creates_uses_and_destroys_test_databases(
    parallel: str, admin: Any
) -> None:
    assert databases(admin) == set()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "test",
            "tests.runner.cases",
            "--settings=tests.runner.settings",
            "--noinput",
            f"--parallel={parallel}",
            "-v",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Ran 6 tests" in output
    if parallel == "2":
        assert "Cloning test database for alias 'default'" in output
    # Every test database was dropped; the real ones were never created or used.
    assert databases(admin) == set()
