"""django-tenants over the pooled ENGINE (``ORIGINAL_BACKEND = "django_pgpool"``).

django-tenants' settings are process-wide (its backend reads ORIGINAL_BACKEND
when imported), so the project (tests/tenantsproject) runs in subprocesses,
each on a database of its own that the test makes and drops.

The isolation test is the bug of issue 13: a process forked inside
``tenant_context(t)`` with ``TENANT_LIMIT_SET_CALLS = True`` read and wrote
``public`` instead of ``t``, because the ENGINE dropped the inherited
connection without going through ``close()``, where django-tenants forgets
the search_path it believes the session has.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg2 import sql

from tests.helpers import ROOT, admin_execute, run_python, scratch_database

SETTINGS = "--settings=tests.tenantsproject.settings"
TENANTS, THREADS, ROUNDS, FORK_EVERY = 5, 6, 40, 4
MAXCONN = 3  # fewer than THREADS: threads wait for each other's connections


@pytest.fixture
def database() -> Iterator[str]:
    with scratch_database("pgpool_tenants") as name:
        yield name


def project_env(database: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.tenantsproject.settings",
        "TENANTS_DATABASE": database,
        "PGPOOL_TENANTS_MAXCONN": str(MAXCONN),
        **extra,
    }


def rows_by_schema(database: str, schemas: list[str]) -> dict[str, Counter[tuple[str, str]]]:
    """Return, per schema, how many rows of notes_note carry each (tag, kind of writer)."""
    rows: dict[str, Counter[tuple[str, str]]] = {}
    for schema in schemas:
        query = sql.SQL("SELECT tag, writer FROM {}.notes_note").format(sql.Identifier(schema))
        rows[schema] = Counter(
            (tag, writer.split("/")[0] if writer.startswith("thread") else writer)
            for tag, writer in admin_execute(query, dbname=database)
        )
    return rows


def test_the_tenants_backend_over_ours_is_pooled(database: str) -> None:
    result = run_python(["-m", "tests.tenantsproject.recipe"], project_env(database))
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert report["engine_is_pooled"] is True
    assert report["wrapper_is_pooled"] is True
    (first_pid, first_path), (second_pid, second_path) = report["first"], report["second"]
    # The same server session, borrowed again after close(): pooled.
    assert second_pid == first_pid
    assert first_path == second_path == "acme, public"
    assert report["acme_tags"] == ["acme"]
    # The next borrower of that session doesn't inherit acme's search_path:
    # the pool saw the SET and reset the session at return.
    assert report["next_borrower"] == [first_pid, '"$user", public']
    # public's notes table has none of acme's rows.
    assert report["public"][1] == "public"
    assert report["public_tags"] == []


def test_manage_py_check_validates_the_pool_options_under_django_tenants(database: str) -> None:
    check = ["-m", "django", "check", SETTINGS]
    good = run_python(check, project_env(database), check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run_python(check, project_env(database, PGPOOL_TENANTS_MAXCONN="0"), check=False)
    assert bad.returncode != 0
    assert "django_pgpool.E001" in bad.stderr, bad.stdout + bad.stderr


def test_no_tenant_sees_another_tenants_rows_across_threads_and_forks(database: str) -> None:
    result = run_python(
        ["-m", "tests.tenantsproject.isolation", *map(str, (TENANTS, THREADS, ROUNDS, FORK_EVERY))],
        project_env(database),
        timeout=300,
    )
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert report["forks"] == THREADS * (ROUNDS // FORK_EVERY), report
    assert report["requests"] == THREADS * ROUNDS
    # Every read (current_schema() and the rows) in every thread and child
    # saw its own tenant and nothing else.
    assert report["leaks"] == [], "\n".join(report["leaks"])
    # On the server: every row is in its tenant's schema, and public holds
    # its sentinel only (nothing written there by mistake).
    schemas = [f"t{i}" for i in range(TENANTS)]
    rows = rows_by_schema(database, ["public", *schemas])
    assert rows["public"] == Counter({("public", "sentinel"): 1})
    for schema in schemas:
        tags = {tag for tag, _ in rows[schema]}
        assert tags == {schema}, f"{schema} holds rows of {tags - {schema}}"
        assert sum(rows[schema].values()) == report["expected_rows"][schema]
    print(
        f"{TENANTS} tenants x {THREADS} threads, {report['requests']} requests, "
        f"{report['forks']} forks, {report['queries_checked']} queries checked, 0 leaks"
    )
