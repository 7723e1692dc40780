"""OPTIONS['credentials']: fresh connect parameters for every new connection (a rotating password).

On a cluster of the tests' own that demands a SCRAM password (``password_server``),
a role's password is read from a file by the credentials callable, and
rotated (``ALTER ROLE`` and the file) while borrowers keep going.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.conf import settings
from django.core.checks import Error
from django.db import OperationalError, connections

from django_pgpool import checks, registry
from django_pgpool.pool import ConnectionPool
from tests.helpers import PoolLoad, wait_for
from tests.pgserver import ServerInfo

ROLE = "pgpool_rotating"
APP = "pgpool-rotating"


class PasswordFile:
    """The secret store: a file holding the current password, read at every call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls = 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return {"password": self.path.read_text().strip()}

    def rotate(self, admin: Any) -> str:
        new = "rot-" + secrets.token_hex(12)
        with admin.cursor() as cur:
            cur.execute(f"ALTER ROLE {ROLE} PASSWORD %s", [new])
        self.path.write_text(new)
        return new


@pytest.fixture
def server_admin(password_server: ServerInfo) -> Iterator[Any]:
    conn = psycopg2.connect(**password_server.connect_kwargs())
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def store(server_admin: Any, tmp_path: Path) -> Iterator[PasswordFile]:
    store = PasswordFile(tmp_path / "password")
    with server_admin.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {ROLE}")
        cur.execute(f"CREATE ROLE {ROLE} LOGIN")
    store.rotate(server_admin)
    yield store
    with server_admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [ROLE]
        )
        cur.execute(f"DROP ROLE IF EXISTS {ROLE}")


def rotating_pool(server: ServerInfo, store: PasswordFile, **options: Any) -> ConnectionPool:
    kwargs = {**server.connect_kwargs(), "user": ROLE, "application_name": APP}
    kwargs.pop("password")  # only the callable knows it
    return ConnectionPool(1, 4, credentials=store, timeout=5, **kwargs, **options)


def all_sessions_started_after(admin: Any, moment: float) -> bool:
    starts = session_starts(admin)
    return bool(starts) and min(starts) > moment


def session_starts(admin: Any) -> list[float]:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT extract(epoch FROM backend_start) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [APP],
        )
        return [float(row[0]) for row in cur.fetchall()]


def test_the_password_is_read_for_every_new_connection_and_rotates_under_load(
    password_server: ServerInfo, server_admin: Any, store: PasswordFile
) -> None:
    pool = rotating_pool(password_server, store)
    try:
        with PoolLoad(pool) as load:
            time.sleep(0.3)
            old_calls = store.calls
            old = store.path.read_text()
            store.rotate(server_admin)
            # The old password no longer opens a connection; the pool's open ones go on.
            with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
                as_role = {**password_server.connect_kwargs(), "user": ROLE, "password": old}
                psycopg2.connect(**as_role)
            time.sleep(0.3)
            rotated_at = time.time()
            pool.reconnect()  # as close_pools() and poolclose do: every connection replaced
            wait_for(
                lambda: all_sessions_started_after(server_admin, rotated_at - 0.05),
                what="every session opened after the rotation",
            )
            time.sleep(0.3)
    finally:
        pool.closeall()
    assert not load.errors, load.errors[:3]
    assert load.done > 100
    assert store.calls > old_calls  # asked again for the new connections, never cached


def test_with_a_short_max_lifetime_connections_move_to_the_new_password_by_themselves(
    password_server: ServerInfo, server_admin: Any, store: PasswordFile
) -> None:
    pool = rotating_pool(password_server, store, max_lifetime=1.0)
    try:
        with PoolLoad(pool) as load:
            time.sleep(0.3)
            store.rotate(server_admin)
            rotated_at = time.time()
            wait_for(
                lambda: all_sessions_started_after(server_admin, rotated_at),
                timeout=10,
                what="every session reopened with the new password",
            )
    finally:
        pool.closeall()
    assert not load.errors, load.errors[:3]


def test_a_password_from_credentials_is_never_shown(
    password_server: ServerInfo, store: PasswordFile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    password = store.path.read_text()
    pool = rotating_pool(password_server, store)
    try:
        conn = pool.getconn()
        pool.putconn(conn)
        pool.reconnect()
        shown = [repr(pool), repr(conn), str(conn.dsn), json.dumps(pool.activity()), caplog.text]
    finally:
        pool.closeall()
    assert all(password not in text for text in shown)


# -- through Django ------------------------------------------------------------------


def failing_credentials() -> dict[str, str]:
    raise RuntimeError("the secrets manager is unreachable")


@pytest.mark.django_db(transaction=True)
def test_credentials_that_raise_give_an_operational_error_naming_the_setting() -> None:
    from tests.helpers import make_wrapper

    path = f"{__name__}.failing_credentials"
    connections["rotating"] = make_wrapper(
        "rotating", OPTIONS={"credentials": path, "minconn": 0, "timeout": 2}
    )
    try:
        with pytest.raises(OperationalError) as caught:
            connections["rotating"].ensure_connection()
        message = str(caught.value)
        assert "OPTIONS['credentials']" in message
        assert "failing_credentials" in message
        assert "the secrets manager is unreachable" in message
    finally:
        connections["rotating"].close()
        del connections["rotating"]
        registry.close_pools(alias="rotating")


def test_the_shown_options_name_the_credentials_callable() -> None:
    from django_pgpool.options import parse_options

    options = parse_options("x", {"credentials": f"{__name__}.failing_credentials"})
    assert options.credentials is failing_credentials
    assert options.shown()["credentials"] == f"{__name__}.failing_credentials"
    json.dumps(options.shown())  # the status snapshot and poolstatus --format json use it


@pytest.mark.parametrize("key", ["credentials", "check"])
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("tests.test_credentials.no_such_function", "does not define"),
        ("no_such_module.function", "No module named"),
        (42, "not callable"),
    ],
)
def test_a_bad_callable_setting_fails_the_system_check(
    key: str, value: Any, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    databases = {"default": {**connections["default"].settings_dict, "OPTIONS": {key: value}}}
    monkeypatch.setattr(settings, "DATABASES", databases)
    errors = checks.check_pool_options()
    assert [e.id for e in errors] == ["django_pgpool.E005"]
    assert isinstance(errors[0], Error)
    assert f"['{key}']" in errors[0].msg and why in errors[0].msg
