"""OPTIONS['credentials']: fresh connect parameters for every new connection (a rotating password).

On a cluster of the tests' own that demands a SCRAM password (``password_server``),
a role's password is read from a file by the credentials callable, and
rotated (``ALTER ROLE`` and the file) while borrowers keep going: on a bare
ConnectionPool, then through the ENGINE (an alias of DATABASES whose
requests read and write from several threads) with ``close_pools()`` and
``manage.py poolclose`` run as another process.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.conf import settings
from django.core import signals
from django.core.checks import Error
from django.db import OperationalError, connections, transaction

from django_pgpool import base, checks, close_pools, registry, status
from django_pgpool.identity import HOSTNAME
from django_pgpool.pool import ConnectionPool
from tests.helpers import PoolLoad, Workers, own_snapshot, run_python, wait_for
from tests.pgserver import ServerInfo
from tests.settings import SERVER

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


# -- a rotation through the ENGINE: close_pools(), then manage.py poolclose --------------

ALIAS = "rotating"
PASSWORD_FILE = "PGPOOL_TEST_PASSWORD_FILE"  # names the file, here and in the commands' runs
ALIAS_SETTINGS = "PGPOOL_TEST_ROTATING_DATABASE"  # the alias, as JSON, for the commands' runs
COMMAND_SETTINGS = f'''\
"""The commands' settings: the suite's script settings and the test's '{ALIAS}' alias."""

import json
import os

from tests.script_settings import *  # noqa: F403
from tests.script_settings import DATABASES

DATABASES = {{**DATABASES, "{ALIAS}": json.loads(os.environ["{ALIAS_SETTINGS}"])}}
'''


def password_from_file() -> dict[str, str]:
    """The alias's OPTIONS['credentials']: the password in the file the environment names."""
    return {"password": Path(os.environ[PASSWORD_FILE]).read_text().strip()}


class Requests(Workers):
    """Threads serving requests on ALIAS until stopped: each, between Django's request
    signals, INSERTs a row in a transaction, then SELECTs; ``written`` keeps the
    acknowledged ids, ``errors`` every failure. A watcher keeps every pool the registry
    has held for the alias, and the most it held at once.
    """

    def __init__(self, threads: int) -> None:
        serving = [threading.Thread(target=self._serve) for _ in range(threads)]
        super().__init__([*serving, threading.Thread(target=self._watch)])
        self.written: list[int] = []
        self.errors: list[BaseException] = []
        self.pools: list[ConnectionPool] = []
        self.most_pools = 0

    @property
    def done(self) -> int:
        return len(self.written)

    def _request(self) -> int:
        with transaction.atomic(using=ALIAS), connections[ALIAS].cursor() as cur:
            cur.execute("INSERT INTO rotating_writes DEFAULT VALUES RETURNING id")
            (row_id,) = cur.fetchone()
        with connections[ALIAS].cursor() as cur:
            cur.execute("SELECT count(*) FROM rotating_writes")
        return int(row_id)

    def _serve(self) -> None:
        while not self._stop.is_set():
            signals.request_started.send(sender=base.DatabaseWrapper, environ={})
            try:
                row_id = self._request()
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)
            else:
                with self._lock:
                    self.written.append(row_id)
            finally:
                signals.request_finished.send(sender=base.DatabaseWrapper)
        connections[ALIAS].close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            held = [entry.pool for entry in registry.entries(ALIAS)]
            self.most_pools = max(self.most_pools, len(held))
            self.pools.extend(p for p in held if not any(p is q for q in self.pools))
            time.sleep(0.002)

    def wait_for_more(self, count: int = 20) -> None:
        target = self.done + count
        wait_for(lambda: self.done >= target or self.errors, what=f"{count} more requests")


@dataclass(frozen=True)
class RotatingAlias:
    """The test's alias: its settings, and what a command run needs to reach it."""

    settings: dict[str, Any]  # as DATABASES has it
    environ: dict[str, str]  # of a ``python -m django`` command run


@pytest.fixture
def rotating_alias(
    password_server: ServerInfo,
    server_admin: Any,
    store: PasswordFile,
    monkeypatch: pytest.MonkeyPatch,
    django_db_blocker: Any,
) -> Iterator[RotatingAlias]:
    """ALIAS in DATABASES, on the password server as the rotating role, whose password only
    OPTIONS['credentials'] knows; a table it writes to. Outside Django's test cases, as a
    server's threads use it."""
    with server_admin.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS rotating_writes")
        cur.execute("CREATE TABLE rotating_writes (id bigserial PRIMARY KEY)")
        cur.execute(f"GRANT SELECT, INSERT ON rotating_writes TO {ROLE}")
        cur.execute(f"GRANT USAGE ON SEQUENCE rotating_writes_id_seq TO {ROLE}")
    monkeypatch.setenv(PASSWORD_FILE, str(store.path))
    settings_dict = {
        "ENGINE": "django_pgpool",
        "NAME": password_server.dbname,
        "USER": ROLE,
        "PASSWORD": "",
        "HOST": password_server.host,
        "PORT": str(password_server.port),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "minconn": 1,
            "maxconn": 4,
            "timeout": 5,
            "credentials": f"{__name__}.password_from_file",
        },
    }
    connections.settings[ALIAS] = {**connections["default"].settings_dict, **settings_dict}
    try:
        with django_db_blocker.unblock():
            environ = command_environ(settings_dict, store.path.parent)
            yield RotatingAlias(settings_dict, environ)
    finally:
        del connections.settings[ALIAS]
        registry.close_pools(alias=ALIAS)
        with server_admin.cursor() as cur:
            cur.execute("DROP TABLE rotating_writes")


def command_environ(alias_settings: dict[str, Any], directory: Path) -> dict[str, str]:
    """The environment of a ``python -m django`` command run: the suite's script settings
    with ALIAS, this process's status directory (so that it finds this process)."""
    (directory / "rotating_command_settings.py").write_text(COMMAND_SETTINGS)
    return {
        **os.environ,
        **SERVER.env(),
        "DJANGO_SETTINGS_MODULE": "rotating_command_settings",
        "PYTHONPATH": str(directory),
        "DJANGO_PGPOOL_STATUS_DIR": str(status.status_dir()),
        ALIAS_SETTINGS: json.dumps(alias_settings),
    }


def alias_session_starts(admin: Any) -> list[float]:
    """Return when each of the server's pooled sessions of ALIAS (this process's) started."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT extract(epoch FROM backend_start) FROM pg_stat_activity "
            "WHERE usename = %s AND application_name LIKE %s",
            [ROLE, f"[pgpool {ALIAS}@%:{os.getpid()}]"],
        )
        return [float(row[0]) for row in cur.fetchall()]


def only_sessions_started_after(admin: Any, moment: float) -> bool:
    starts = alias_session_starts(admin)
    return bool(starts) and min(starts) > moment


def own_pools() -> list[dict[str, Any]]:
    """Return the pools of this process's published snapshot (none before the first)."""
    own = own_snapshot()
    return list(own["pools"]) if own else []


def opens_a_session(server: ServerInfo, password: str) -> bool:
    """Whether the role logs in with this password (a connection of its own)."""
    try:
        psycopg2.connect(**{**server.connect_kwargs(), "user": ROLE, "password": password}).close()
    except psycopg2.OperationalError as exc:
        assert "password authentication failed" in str(exc)
        return False
    return True


def test_a_rotation_through_the_engine_then_close_pools_then_poolclose_fails_no_request(
    password_server: ServerInfo,
    server_admin: Any,
    store: PasswordFile,
    rotating_alias: RotatingAlias,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")

    def manage(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_python(["-m", "django", *args], rotating_alias.environ, check=check)

    passwords = [store.path.read_text()]
    # More threads than connections (maxconn 4): requests wait in line, and
    # close_pools() sends them to the pool that replaces the closed one.
    with Requests(threads=6) as requests:
        requests.wait_for_more()
        (first,) = requests.pools

        # The rotation: the pool's sessions go on; a new one would need the new password.
        passwords.append(store.rotate(server_admin))
        assert not opens_a_session(password_server, passwords[0])
        assert opens_a_session(password_server, passwords[1])
        requests.wait_for_more()
        assert [e.pool for e in registry.entries(ALIAS)] == [first]  # no second pool

        # close_pools(): the next borrows open a fresh pool, whose sessions, all opened
        # after the rotation, could only log in with the new password.
        closed_at = time.time()
        assert close_pools() >= 1
        wait_for(
            lambda: only_sessions_started_after(server_admin, closed_at),
            what="every session of the alias opened after close_pools()",
        )
        requests.wait_for_more()
        (second,) = [e.pool for e in registry.entries(ALIAS)]
        assert second is not first

        # Again, then poolclose from another process: the same pool, all new sessions.
        passwords.append(store.rotate(server_admin))
        assert not opens_a_session(password_server, passwords[1])
        assert opens_a_session(password_server, passwords[2])
        wait_for(
            lambda: any(ALIAS in pool["aliases"] for pool in own_pools()),
            what="this process's snapshot with the alias's pool",
        )
        asked_at = time.time()
        closed = manage("poolclose", "--database", ALIAS, "--wait", "10")
        asked, done = closed.stdout.splitlines()
        assert asked.startswith(
            f"Asked 1 process on host {HOSTNAME} to reconnect database '{ALIAS}' "
            f"(pids {os.getpid()})"
        )
        assert done.startswith(f"Database '{ALIAS}': every process has reconnected (")
        wait_for(
            lambda: only_sessions_started_after(server_admin, asked_at),
            what="every session of the alias opened after poolclose",
        )
        requests.wait_for_more()
        assert [e.pool for e in registry.entries(ALIAS)] == [second]

        # poolstatus reaches the server with the password of the credentials callable.
        shown = [
            manage("poolstatus", "--database", ALIAS),
            manage("poolstatus", "--database", ALIAS, "--format", "json"),
        ]

    assert not requests.errors, requests.errors[:3]
    assert requests.most_pools == 1
    assert len(requests.pools) == 2  # the first, and the one after close_pools()
    assert opens_a_session(password_server, passwords[2])
    with server_admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM rotating_writes WHERE id = ANY(%s)", [requests.written])
        assert cur.fetchone()[0] == len(requests.written)  # no acknowledged write lost
    texts = [closed.stdout, closed.stderr, *(p.stdout + p.stderr for p in shown)]
    texts += [record.getMessage() for record in caplog.records]
    assert caplog.records  # the pool logged its connections (DEBUG)
    for password in passwords:
        assert all(password not in text for text in texts)


# -- a request waiting in line at close_pools(); the commands' own session -----------------


def test_close_pools_sends_a_request_waiting_in_line_to_the_next_pool(
    rotating_alias: RotatingAlias,
) -> None:
    # A server busier than its pool: every connection lent, one more request in line.
    maxconn = rotating_alias.settings["OPTIONS"]["maxconn"]
    lent = threading.Barrier(maxconn + 1)
    give_back = threading.Event()
    answers: list[object] = []

    def hold() -> None:
        connections[ALIAS].ensure_connection()
        lent.wait(5)
        give_back.wait(10)
        connections[ALIAS].close()

    def request() -> None:
        try:
            with connections[ALIAS].cursor() as cur:
                cur.execute("SELECT 1")
                answers.append(cur.fetchone()[0])
        except BaseException as exc:
            answers.append(exc)
        finally:
            connections[ALIAS].close()

    holders = [threading.Thread(target=hold) for _ in range(maxconn)]
    for thread in holders:
        thread.start()
    lent.wait(5)
    waiter = threading.Thread(target=request)
    waiter.start()
    (entry,) = registry.entries(ALIAS)
    wait_for(lambda: entry.pool.get_stats()["requests_waiting"] == 1, what="a request in line")
    close_pools()
    give_back.set()
    for thread in [*holders, waiter]:
        thread.join(10)
    (answer,) = answers
    if isinstance(answer, BaseException):
        raise answer  # before: "connection pool database 'rotating' is closed"
    assert answer == 1


def test_poolstatus_reaches_a_server_whose_password_only_the_credentials_know(
    rotating_alias: RotatingAlias,
) -> None:
    connections[ALIAS].ensure_connection()  # a pooled session for the server's view
    try:
        shown = run_python(
            ["-m", "django", "poolstatus", "--database", ALIAS, "--format", "json"],
            rotating_alias.environ,
            timeout=60,
            check=False,
        )
    finally:
        connections[ALIAS].close()
    assert shown.returncode == 0, shown.stderr
    server = json.loads(shown.stdout)["databases"][ALIAS]["server"]
    assert server["error"] is None and server["connections"] >= 1
