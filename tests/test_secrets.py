"""No password ever appears in an exception, a log line, command output or a repr.

These tests need a server that asks for the password: against one that
trusts every connection (the suite's server may be any server named by
PGHOST, e.g. a local socket with ``trust`` in pg_hba.conf) a wrong password
works and the password never reaches an error message, so they would prove
nothing. So they start a cluster of their own (tests/pgserver.py: initdb
``--auth-host=scram-sha-256``, reached over TCP) and first check that it
refuses a wrong password.
"""

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
ROLE = "pgpool_secret"
ALIAS = "secret_alias"


@pytest.fixture(scope="module")
def secret_role(password_server: ServerInfo) -> str:
    """A role whose password is SENTINEL, on a server that demands it (checked)."""
    conn = psycopg2.connect(**password_server.connect_kwargs())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD %s", [SENTINEL])
    conn.close()
    as_role = {**password_server.connect_kwargs(), "user": ROLE}
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**{**as_role, "password": SENTINEL + "-wrong"})
    psycopg2.connect(**{**as_role, "password": SENTINEL}).close()
    return ROLE


def secret_settings(server: ServerInfo, **changes: Any) -> dict[str, Any]:
    """Settings of a database on ``server`` reached as the secret role, with its password."""
    return {
        **connections["default"].settings_dict,
        "HOST": server.host,
        "PORT": server.port,
        "NAME": server.dbname,
        "USER": ROLE,
        "PASSWORD": SENTINEL,
        **changes,
    }


@pytest.fixture
def wrapper(password_server: ServerInfo, secret_role: str) -> Iterator[Any]:
    """Build wrappers on the password server; their pools are closed after the test."""
    aliases = set()

    def make(alias: str, **changes: Any) -> base.DatabaseWrapper:
        aliases.add(alias)
        return base.DatabaseWrapper(secret_settings(password_server, **changes), alias=alias)

    yield make
    for alias in aliases:
        registry.close_pools(alias=alias)


@pytest.fixture
def secret_alias(password_server: ServerInfo, secret_role: str) -> Iterator[str]:
    """An alias of DATABASES on the password server, with a pool in this process; removed after.

    The pool's connection is made before the alias is added: Django's test
    case forbids connecting to an alias of DATABASES it was not told of.
    """
    holder = base.DatabaseWrapper(secret_settings(password_server), alias=ALIAS)
    holder.ensure_connection()
    connections.settings[ALIAS] = secret_settings(password_server)
    yield ALIAS
    del connections.settings[ALIAS]
    holder.close()
    registry.close_pools(alias=ALIAS)


def text_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)


def test_no_error_path_shows_the_password(wrapper: Any, caplog: pytest.LogCaptureFixture) -> None:
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
    assert "password authentication failed" in seen[-1]

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


def test_pool_commands_never_show_the_password(secret_alias: str) -> None:
    password = connections["default"].settings_dict["PASSWORD"]
    outputs = []
    for options in ({}, {"format": "json"}):
        out = io.StringIO()
        call_command("poolstatus", stdout=out, **options)
        outputs.append(out.getvalue())
    # The command connected (with the password) and saw the pool's session.
    server = json.loads(outputs[-1])["databases"][secret_alias]["server"]
    assert (server["error"], server["connections"]) == (None, 1)
    for options in ({}, {"kill": True}):
        out = io.StringIO()
        call_command("poolclose", stdout=out, **options)
        outputs.append(out.getvalue())
    for output in outputs:
        assert SENTINEL not in output
        assert not password or password not in output
