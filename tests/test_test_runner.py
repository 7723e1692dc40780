"""Django's test runner on the ENGINE: create, clone (--parallel), use, destroy."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers import ROOT, run_python


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
    result = run_python(
        [
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
        env,
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
