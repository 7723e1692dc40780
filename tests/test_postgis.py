"""``"ENGINE": "django_pgpool.postgis"``: GeoDjango on PostGIS, pooled, on a real server.

A small GeoDjango project (tests/gisproject) runs in a subprocess, as the
plain ENGINE does in test_test_runner.py: Django's test runner creates the
test database (``CREATE EXTENSION postgis``), clones it for ``--parallel
2``, runs a geometry round trip and spatial queries through the pool, and
destroys every test database. PostGIS and GDAL/GEOS are installed with apt
when missing (tests/postgis.py).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from django_pgpool.checks import pooled_engine
from tests import apt, postgis
from tests.helpers import ROOT, run_python
from tests.pgserver import ServerInfo

SETTINGS = "--settings=tests.gisproject.settings"


@pytest.fixture(scope="module")
def with_postgis(server: ServerInfo) -> None:
    postgis.require_postgis(server)


def gis_databases(admin: Any) -> set[str]:
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE '%pgpool_gis%'")
        return {row[0] for row in cur.fetchall()}


def project_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_the_postgis_engine_is_recognised_as_pooled() -> None:
    assert pooled_engine("django_pgpool.postgis")
    assert pooled_engine("django_pgpool.postgis.base")


@pytest.mark.usefixtures("with_postgis")
@pytest.mark.parametrize("parallel", ["1", "2"])
def test_django_test_runner_on_postgis_creates_clones_uses_and_destroys_test_databases(
    parallel: str, admin: Any
) -> None:
    assert gis_databases(admin) == set()
    args = ["-m", "django", "test", "tests.gisproject.cases", SETTINGS, "--noinput"]
    result = run_python(
        [*args, f"--parallel={parallel}", "-v", "2"], project_env(), timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Ran 8 tests" in output
    assert "OK" in output
    if parallel == "2":
        assert "Cloning test database for alias 'default'" in output
    # Every test database was dropped; the real one was never created or used.
    assert gis_databases(admin) == set()


@pytest.mark.usefixtures("with_postgis")
def test_manage_py_check_validates_the_pool_options_of_the_postgis_engine() -> None:
    good = run_python(["-m", "django", "check", SETTINGS], project_env(), check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run_python(
        ["-m", "django", "check", SETTINGS], project_env(PGPOOL_GIS_MAXCONN="0"), check=False
    )
    assert bad.returncode != 0
    assert "django_pgpool.E001" in bad.stderr, bad.stdout + bad.stderr
    assert "maxconn" in bad.stderr


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_root_the_postgis_tests_skip_naming_the_package_but_fail_under_ci(
    server: ServerInfo, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    # Not being root can't be produced for real here (the suite may run as root).
    monkeypatch.setattr(postgis, "missing", lambda server: ["libgdal"])
    monkeypatch.setattr(apt, "why_not_installable", lambda: "not running as root")
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        postgis.require_postgis(server)
    message = str(raised.value)
    assert postgis.postgis_package(server) in message
    assert "not running as root" in message
