"""No password ever appears in an exception, a log line, command output or a repr."""

from __future__ import annotations

import io
import json
import logging
import secrets
import traceback
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connections

from django_pgpool import base, registry
from tests.pgserver import ServerInfo

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

SENTINEL = "S3ntinel-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def secret_role(server: ServerInfo) -> Iterator[str]:
    conn = psycopg2.connect(**server.connect_kwargs())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_secret")
        cur.execute("CREATE ROLE pgpool_secret LOGIN SUPERUSER PASSWORD %s", [SENTINEL])
    yield "pgpool_secret"
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'pgpool_secret'"
        )
        cur.execute("DROP ROLE IF EXISTS pgpool_secret")
    conn.close()


def wrapper(alias: str, **changes: Any) -> base.DatabaseWrapper:
    settings_dict = {
        **connections["default"].settings_dict,
        "USER": "pgpool_secret",
        "PASSWORD": SENTINEL,
        **changes,
    }
    return base.DatabaseWrapper(settings_dict, alias=alias)


def text_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)


def test_no_error_path_shows_the_password(
    secret_role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    seen: list[str] = []

    # Works, then a pool timeout.
    options = {"maxconn": 1, "timeout": 0.2}
    holder = wrapper("secret", OPTIONS=options)
    holder.ensure_connection()
    other = wrapper("secret", OPTIONS=options)
    with pytest.raises(Exception) as timeout:
        other.ensure_connection()
    seen.append(text_of(timeout.value))
    holder.close()

    # The server refuses the connection; then a wrong password.
    for changes in ({"PORT": 1}, {"PASSWORD": SENTINEL + "-wrong"}):
        broken = wrapper("secret_broken", **changes)
        with pytest.raises(Exception) as failure:
            broken.ensure_connection()
        seen.append(text_of(failure.value))

    # A configuration error.
    with pytest.raises(ImproperlyConfigured) as config:
        wrapper("secret_bad", OPTIONS={"maxconn": "many"}).ensure_connection()
    seen.append(text_of(config.value))

    # What the pool and registry show of themselves.
    for entry in registry.entries():
        seen.append(repr(entry.pool) + entry.pool.name + repr(entry.database) + repr(entry.key))

    seen.extend(record.getMessage() for record in caplog.records)
    assert caplog.records, "the scenarios should have logged something"
    for text in seen:
        assert SENTINEL not in text
    registry.close_pools(alias="secret")
    registry.close_pools(alias="secret_broken")


def test_pool_commands_never_show_the_password(secret_role: str) -> None:
    password = connections["default"].settings_dict["PASSWORD"]
    with connections["default"].cursor() as cur:
        cur.execute("SELECT 1")
    for options in ({}, {"format": "json"}):
        out = io.StringIO()
        call_command("poolstatus", stdout=out, **options)
        assert password not in out.getvalue()
        if options:
            json.loads(out.getvalue())
    out = io.StringIO()
    call_command("poolclose", stdout=out)
    assert password not in out.getvalue()
