"""The management commands (poolstatus, poolclose, poolpause, poolresume), in this process,
on the real server.

Other processes are stood in for here by snapshot files of live processes
and by plain sessions carrying a pool's application_name tag (as a pool on
another host would); tests/test_multiprocess.py runs the real thing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from pytest_django.fixtures import Settings

from django_pgpool import close_pools, registry, status
from django_pgpool.base import DatabaseWrapper
from django_pgpool.identity import HOSTNAME
from django_pgpool.pool import STATS_KEYS
from tests.conftest import backend_pid
from tests.helpers import own_snapshot, wait_for
from tests.settings import SERVER

DOCS = Path(__file__).resolve().parent.parent / "docs" / "commands.md"
NO_PROCESS = "no process on this host has a pool of this database"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def status_json(*args: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(run("poolstatus", "--format", "json", *args))
    return document


# -- the documented JSON shape (docs/commands.md), checked on real output ---------


class Nullable:
    def __init__(self, shape: Any) -> None:
        self.shape = shape


class MapOf:
    """A JSON object with any keys, each value of this shape."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


NUMBER = (int, float)
AGED_PID = Nullable({"pid": int, "age_s": NUMBER})
POOL_SHAPE: dict[Any, Any] = {
    "aliases": [str],
    "database": MapOf(str),
    "options": MapOf((int, float, str, type(None))),
    **dict.fromkeys(STATS_KEYS, int),
    "longest_wait_s": NUMBER,
    "oldest_checkout": Nullable({"age_s": NUMBER, "thread": Nullable(str)}),
    "retired_in_use": int,
    "wait_buckets": [int],
    "paused_since": Nullable(NUMBER),
    ...: object,  # any figure the pool adds later
}
COUNTS: dict[str, Any] = dict.fromkeys(
    ("connections", "active", "idle", "idle_in_transaction", "other"), Nullable(int)
)
STATUS_SHAPE = {
    "host": str,
    "pid": int,
    "time": NUMBER,
    "status_dir": str,
    "databases": MapOf(
        {
            "config": MapOf((int, float, str, type(None))),
            "database": {
                "NAME": str,
                "HOST": str,
                "PORT": str,
                "USER": str,
                "OPTIONS": MapOf((int, float, str, bool, type(None))),
                "libpq": MapOf((int, float, str, bool, type(None))),
                "session_settings": MapOf(str),
            },
            "pause": {"generation": int, "paused_since": Nullable(NUMBER)},
            "unreached": [
                {
                    "pid": int,
                    "sessions": int,
                    "uid": int,
                    "status_dir": Nullable(str),
                    "settings_module": Nullable(str),
                }
            ],
            "processes": [
                {
                    "pid": int,
                    "host": str,
                    "updated": Nullable(NUMBER),
                    "reconnect_seen": int,
                    "pause_seen": int,
                    "pools": [POOL_SHAPE],
                }
            ],
            "server": {
                "database": Nullable(str),
                "error": Nullable(str),
                **COUNTS,
                "processes": [
                    {
                        "host": str,
                        "pid": int,
                        **dict.fromkeys(COUNTS, int),
                        "oldest_backend": AGED_PID,
                        "longest_idle_in_transaction": AGED_PID,
                        "backend_pids": [int],
                    }
                ],
            },
        }
    ),
}


def check_shape(value: Any, shape: Any, path: str = "$") -> None:
    """Assert that a decoded JSON value has the documented shape."""
    if isinstance(shape, Nullable):
        if value is not None:
            check_shape(value, shape.shape, path)
    elif isinstance(shape, MapOf):
        assert isinstance(value, dict), f"{path}: {value!r} is not an object"
        for key, item in value.items():
            check_shape(item, shape.shape, f"{path}.{key}")
    elif isinstance(shape, dict):
        assert isinstance(value, dict), f"{path}: {value!r} is not an object"
        fixed = {key: item for key, item in shape.items() if key is not ...}
        missing = set(fixed) - set(value)
        assert not missing, f"{path}: missing {sorted(missing)}"
        for key, item in value.items():
            assert key in fixed or ... in shape, f"{path}: undocumented key {key!r}"
            check_shape(item, fixed.get(key, shape.get(...)), f"{path}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{path}: {value!r} is not an array"
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{path}[{i}]")
    else:
        types = shape if isinstance(shape, tuple) else (shape,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, f"{path}: {value!r} is not {shape}"


def documented_json_examples() -> list[Any]:
    """Return the poolstatus JSON documents of docs/commands.md's transcripts."""
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(
        r"```console\n\$ [^\n]*poolstatus[^\n]*--format json[^\n]*\n(.*?)```", text, re.S
    )
    return [json.loads(block) for block in blocks]


# -- helpers ---------------------------------------------------------------------


def query() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def host_table(output: str) -> list[dict[str, str]]:
    """Return the rows of poolstatus's host table as {heading: cell}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"alias\s+database\s+pid\s", line))
    headings = ["alias", "database", "pid", "size", "idle", "in_use", "leased", "waiting"]
    headings += ["max_wait", "paused"]
    headings += ["requests", "waits", "timeouts", "errors", "opened", "closed", "lost"]
    headings += ["expired", "oldest_checkout"]
    rows = []
    for line in lines[start + 2 :]:
        if not line:
            break
        cells = line.split(maxsplit=len(headings) - 1)
        rows.append(dict(zip(headings, cells, strict=False)))
    return rows


def own_process(document: dict[str, Any], alias: str = "default") -> dict[str, Any]:
    processes = document["databases"][alias]["processes"]
    return next(p for p in processes if p["pid"] == os.getpid())


@pytest.fixture(autouse=True)
def no_connection_of_a_closed_pool() -> Iterator[None]:
    """Give back this thread's connections (outside a test transaction) before and after.

    These tests close pools: a wrapper left holding a connection of a closed
    pool would keep using it, and surprise the tests that run next.
    """

    def give_back() -> None:
        for wrapper in connections.all(initialized_only=True):
            if not wrapper.in_atomic_block:
                wrapper.close()

    give_back()
    yield
    give_back()


@pytest.fixture
def no_pool_for_other() -> None:
    registry.close_pools(alias="other")


@pytest.fixture
def test_database() -> str:
    name: str = connections["default"].settings_dict["NAME"]
    return name


@pytest.fixture
def tagged_session(test_database: str) -> Iterator[Callable[..., Any]]:
    """Open plain sessions on the test database with a given application_name."""
    opened: list[Any] = []

    def open_session(application_name: str, **kwargs: Any) -> Any:
        conn = psycopg2.connect(
            **{**SERVER.connect_kwargs(), "dbname": test_database, **kwargs},
            application_name=application_name,
        )
        opened.append(conn)
        return conn

    yield open_session
    admin = psycopg2.connect(**SERVER.connect_kwargs())
    admin.autocommit = True
    with admin.cursor() as cursor:
        for conn in opened:
            if not conn.closed:
                cursor.execute("SELECT pg_cancel_backend(%s)", [conn.info.backend_pid])
    admin.close()
    for conn in opened:
        conn.close()


@pytest.fixture
def sleeping_session(tagged_session: Callable[..., Any]) -> Iterator[Callable[[str], int]]:
    """Open a session that stays active (in pg_sleep) until the test ends; return its pid."""
    threads: list[threading.Thread] = []
    sessions: list[Any] = []

    def start(application_name: str) -> int:
        conn = tagged_session(application_name)
        sessions.append(conn)
        conn.autocommit = True
        pid: int = conn.info.backend_pid

        def sleep() -> None:
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(30)")
            except psycopg2.Error:
                pass  # cancelled or terminated at the end of the test

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        threads.append(thread)
        wait_for(lambda: session_state(pid) == "active")
        return pid

    yield start
    for conn in sessions:
        if not conn.closed:
            conn.cancel()
    for thread in threads:
        thread.join(timeout=10)


def tagged_pids(dbname: str, alias: str) -> list[int]:
    """Return the server pids of this process's pooled sessions of an alias on a database."""
    admin = psycopg2.connect(**SERVER.connect_kwargs())
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s",
                [dbname, f"%[pgpool {alias}@%:{os.getpid()}]"],
            )
            return [pid for (pid,) in cursor.fetchall()]
    finally:
        admin.close()


def session_state(pid: int) -> str | None:
    admin = psycopg2.connect(**SERVER.connect_kwargs())
    try:
        with admin.cursor() as cursor:
            cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
            row = cursor.fetchone()
    finally:
        admin.close()
    return row[0] if row else None


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a live process that has no pool of its own."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


# -- poolstatus ----------------------------------------------------------------


@pytest.mark.django_db(databases=["default", "other"])
def test_poolstatus_lists_both_databases_with_their_configuration() -> None:
    output = run("poolstatus")

    for alias in ("default", "other"):
        name = re.escape(connections[alias].settings_dict["NAME"])
        assert re.search(rf"\n{alias}:\n  NAME +{name}\n", output)
    assert re.search(r"\n  maxconn +4\n", output)
    assert re.search(r"\n  timeout +5\.0\n", output)
    assert re.search(rf"\n  HOST +{re.escape(SERVER.host)}\n", output)
    assert re.search(rf"\n  USER +{re.escape(SERVER.user)}\n", output)
    assert output.startswith(f"Host {HOSTNAME}, ")


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
def test_poolstatus_shows_the_libpq_parameters_in_effect_with_the_engine_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not "OPTIONS -" while OPTIONS holds pool keys: what the pools connect with."""
    options = connections["other"].settings_dict["OPTIONS"]
    monkeypatch.setitem(options, "sslmode", "prefer")
    monkeypatch.setitem(options, "keepalives_idle", 45)  # the user's, not the default 30
    monkeypatch.setitem(options, "assume_role", SERVER.user)
    output = run("poolstatus", "--database", "other")
    document = status_json("--database", "other")

    line = re.search(r"\n  libpq in effect +(.*)\n", output)
    assert line is not None, output
    shown = dict(item.split("=", 1) for item in line[1].split(", "))
    assert shown == {
        "application_name": "[pgpool other@" + HOSTNAME[:24] + ":<pid>]",
        "client_encoding": "UTF8",
        "connect_timeout": "5",  # the pool's timeout
        "keepalives": "1",
        "keepalives_count": "3",
        "keepalives_idle": "45",
        "keepalives_interval": "10",
        "password": "<hidden>",
        "sslmode": "prefer",
    }
    assert re.search(r"\n  session settings +TimeZone=UTC, role=" + SERVER.user + r"\n", output)
    assert "\n  OPTIONS " not in output
    database = document["databases"]["other"]["database"]
    assert database["libpq"]["keepalives_interval"] == 10
    assert database["libpq"]["connect_timeout"] == 5
    assert database["libpq"]["password"] == "<hidden>"
    assert database["session_settings"] == {"TimeZone": "UTC", "role": SERVER.user}
    assert database["OPTIONS"] == {
        "sslmode": "prefer",
        "keepalives_idle": 45,
        "assume_role": SERVER.user,
    }
    assert SERVER.password not in output + json.dumps(document)
    # What poolstatus shows is what the pool of this process connects with.
    with connections["other"].cursor() as cursor:
        cursor.execute("SELECT current_setting('application_name')")
        (name,) = cursor.fetchone()
    assert name.replace(f":{os.getpid()}]", ":<pid>]") == shown["application_name"]
    dsn = connections["other"].connection.dsn
    for key in ("connect_timeout", "keepalives_idle", "keepalives_count", "sslmode"):
        assert f"{key}={shown[key]}" in dsn


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.usefixtures("no_pool_for_other")
def test_poolstatus_says_when_no_process_on_this_host_has_a_pool_of_a_database() -> None:
    output = run("poolstatus", "--database", "other")

    (row,) = host_table(output)
    assert row["alias"] == "other"
    name = re.escape(connections["other"].settings_dict["NAME"])
    assert re.search(rf"\nother\s+{name}\s+{NO_PROCESS}\n", output)
    document = status_json("--database", "other")
    assert document["databases"]["other"]["processes"] == []
    assert registry.entries("other") == []  # the command opened no pool to look


@pytest.mark.django_db(databases=["default", "other"])
def test_poolstatus_shows_this_process_with_the_figures_of_its_pool() -> None:
    query()

    rows = [r for r in host_table(run("poolstatus")) if r["alias"] == "default"]
    process = own_process(status_json())

    # The test's transaction holds a connection of this pool.
    row = next(r for r in rows if r["pid"] == str(os.getpid()) and r["in_use"] != "0")
    assert int(row["size"]) >= 1
    assert int(row["requests"]) >= 1
    assert row["oldest_checkout"].endswith(threading.current_thread().name)
    (pool,) = [p for p in process["pools"] if p["pool_in_use"]]
    assert pool["pool_size"] >= 1
    assert pool["requests_num"] >= 1
    assert pool["pool_in_use"] >= 1
    assert pool["oldest_checkout"]["thread"] == threading.current_thread().name
    assert pool["database"]["dbname"] == connection.settings_dict["NAME"]
    assert "default" in pool["aliases"]
    assert process["host"] == HOSTNAME


@pytest.mark.django_db(databases=["default", "other"])
def test_poolstatus_json_is_one_document_with_the_documented_shape() -> None:
    query()

    document = status_json()

    check_shape(document, STATUS_SHAPE)
    assert document["pid"] == os.getpid()
    assert document["host"] == HOSTNAME
    assert document["status_dir"] == str(status.status_dir())
    assert list(document["databases"]) == ["default", "other"]
    for alias, info in document["databases"].items():
        wrapper = connections[alias]
        assert isinstance(wrapper, DatabaseWrapper)
        assert info["config"] == wrapper.pool_options().as_dict()
        assert info["database"]["NAME"] == connections[alias].settings_dict["NAME"]
        assert info["database"]["PORT"] == str(SERVER.port)
        assert info["server"]["database"] == connections[alias].settings_dict["NAME"]
        assert info["server"]["error"] is None
    (pool,) = [p for p in own_process(document)["pools"] if p["pool_in_use"]]
    assert list(pool)[:3] == ["aliases", "database", "options"]
    assert list(pool)[3 : 3 + len(STATS_KEYS)] == list(STATS_KEYS)
    assert pool["pool_min"] == 1
    assert pool["pool_max"] == 4


def test_the_documented_json_examples_have_the_documented_shape() -> None:
    examples = documented_json_examples()

    assert examples, "docs/commands.md has no poolstatus --format json transcript"
    for example in examples:
        check_shape(example, STATUS_SHAPE)


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolstatus_shows_the_figures_other_processes_publish(live_pid: int) -> None:
    figures = dict.fromkeys(STATS_KEYS, 0)
    figures.update(pool_size=3, pool_available=1, pool_in_use=2, requests_num=57)
    figures.update(requests_waiting=1, requests_queued=4, connections_num=3)
    pool = {
        "aliases": ["default", "mirror"],
        "database": {"dbname": "shop", "host": "db", "port": "5432", "user": "shop"},
        "options": {"minconn": 1, "maxconn": 3},
        **figures,
        "longest_wait_s": 0.25,
        "oldest_checkout": {"age_s": 12.5, "thread": "worker-7"},
        "retired_in_use": 0,
    }
    snapshot = {"pid": live_pid, "host": HOSTNAME, "pools": [pool], "updated": time.time()}
    (status.status_dir() / f"{live_pid}.json").write_text(json.dumps(snapshot))

    output = run("poolstatus", "--database", "default")
    document = status_json("--database", "default")

    row = next(r for r in host_table(output) if r["pid"] == str(live_pid))
    assert row["database"] == "shop"
    assert (row["size"], row["idle"], row["in_use"], row["waiting"]) == ("3", "1", "2", "1")
    assert (row["max_wait"], row["requests"], row["waits"]) == ("0.25s", "57", "4")
    assert row["oldest_checkout"] == "12.5s worker-7"
    (process,) = [p for p in document["databases"]["default"]["processes"] if p["pid"] == live_pid]
    assert process["pools"][0]["requests_num"] == 57
    assert process["reconnect_seen"] == 0
    assert "mirror" not in status_json()["databases"]  # not an alias of these settings


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolstatus_shows_the_server_sessions_of_the_pools_from_every_host(
    tagged_session: Callable[..., Any], sleeping_session: Callable[[str], int]
) -> None:
    query()
    connection.close()  # this process's pool: one idle session
    idle = tagged_session("shop [pgpool default@web-2:4242]")
    in_transaction = tagged_session("[pgpool default@web-2:4242]")
    with in_transaction.cursor() as cursor:
        cursor.execute("SELECT 1")  # psycopg2 opened a transaction: idle in transaction
    active = sleeping_session("[pgpool default@web-2:4242]")
    tagged_session("[pgpool other@web-2:4242]")  # another alias
    tagged_session("[pgpool default@web-3:77]", dbname=SERVER.dbname)  # another database
    tagged_session("web-2:4242 without a tag")

    server = status_json("--database", "default")["databases"]["default"]["server"]
    output = run("poolstatus", "--database", "default")

    remote = next(p for p in server["processes"] if (p["host"], p["pid"]) == ("web-2", 4242))
    assert sorted(remote["backend_pids"]) == sorted(
        [idle.info.backend_pid, in_transaction.info.backend_pid, active]
    )
    assert (remote["connections"], remote["active"], remote["idle"]) == (3, 1, 1)
    assert (remote["idle_in_transaction"], remote["other"]) == (1, 0)
    assert remote["longest_idle_in_transaction"]["pid"] == in_transaction.info.backend_pid
    assert remote["oldest_backend"]["pid"] == idle.info.backend_pid
    own = next(p for p in server["processes"] if p["pid"] == os.getpid())
    assert own["host"] == HOSTNAME[:24]
    assert own["connections"] == own["idle"] >= 1
    assert "web-3" not in [p["host"] for p in server["processes"]]
    assert server["connections"] == 3 + own["connections"]
    name = re.escape(connection.settings_dict["NAME"])
    assert re.search(
        rf"\ndefault\s+{name}\s+web-2\s+4242\s+3\s+1\s+1\s+1\s+0"
        r"\s+[\d.]+s pid \d+\s+[\d.]+s pid \d+\n",
        output,
    )


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.usefixtures("no_pool_for_other")
def test_poolstatus_exits_non_zero_with_a_clear_message_when_the_database_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with closed_port() as port:
        monkeypatch.setitem(connections["other"].settings_dict, "PORT", str(port))
        out = io.StringIO()
        with pytest.raises(CommandError) as excinfo:
            call_command("poolstatus", stdout=out)
        with pytest.raises(CommandError):
            call_command("poolstatus", "--format", "json", "--database", "other", stdout=out)

    name = connections["other"].settings_dict["NAME"]
    message = str(excinfo.value)
    assert message.startswith(f"couldn't connect to database 'other' ({name} on {SERVER.host}:")
    assert f":{port} as {SERVER.user}) for the server's view: " in message
    assert "default" not in message  # that one was reached
    output = out.getvalue()
    assert re.search(rf"\nother\s+{re.escape(name)}\s+{NO_PROCESS}\n", output)
    assert re.search(rf"\nother\s+{re.escape(name)}\s+ERROR: {re.escape(message)}\n", output)
    document = json.loads(output[output.index("{") :])
    assert document["databases"]["other"]["server"]["error"] == message
    check_shape(document, STATUS_SHAPE)
    assert registry.entries("other") == []


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """Yield a loopback port nobody listens on (held bound, not listening, meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.django_db(databases=["default", "other"])
def test_watch_shows_the_status_again_until_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) % 3 == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    text = run("poolstatus", "--watch", "0.5", "--database", "default")
    lines = run("poolstatus", "--watch", "2", "--format", "json").splitlines()

    assert sleeps == [0.5, 0.5, 0.5, 2.0, 2.0, 2.0]
    assert text.count(f"Host {HOSTNAME}, ") == 3
    assert text.count("(every 0.5 s; Ctrl-C to stop)") == 3
    assert len(lines) == 3  # one document per line
    for line in lines:
        check_shape(json.loads(line), STATUS_SHAPE)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_watch_needs_a_positive_number_of_seconds(value: str) -> None:
    with pytest.raises(CommandError, match="--watch: must be a number of seconds > 0"):
        run("poolstatus", "--watch", value)


@pytest.mark.django_db(databases=["default", "other"])
def test_database_option_limits_the_output_to_that_database() -> None:
    output = run("poolstatus", "--database", "other")

    assert "\nother:\n" in output
    assert "default" not in output
    assert list(status_json("--database", "other")["databases"]) == ["other"]


@pytest.mark.django_db(databases=["default", "other"])
def test_database_option_can_be_repeated_and_keeps_the_order_given() -> None:
    document = status_json("--database", "other", "--database", "default", "--database", "other")

    assert list(document["databases"]) == ["other", "default"]


def test_unknown_database_raises_command_error_naming_the_valid_ones() -> None:
    with pytest.raises(CommandError) as excinfo:
        run("poolstatus", "--database", "nope")

    message = str(excinfo.value)
    assert "'nope'" in message
    assert "'default', 'other'" in message


def test_database_on_another_engine_raises_command_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connections.settings, "legacy", {"ENGINE": "django.db.backends.sqlite3"})

    for command in ("poolstatus", "poolclose"):
        with pytest.raises(CommandError) as excinfo:
            run(command, "--database", "legacy")
        message = str(excinfo.value)
        assert "'legacy' uses ENGINE 'django.db.backends.sqlite3'" in message
        assert "'default', 'other'" in message


@pytest.mark.django_db(databases=["default", "other"])
def test_databases_on_another_engine_are_left_out_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(connections.settings, "legacy", {"ENGINE": "django.db.backends.sqlite3"})

    assert list(status_json()["databases"]) == ["default", "other"]
    assert "legacy" not in run("poolclose")


def test_no_database_on_the_engine_is_reported_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for alias in ("default", "other"):
        monkeypatch.setitem(connections.settings[alias], "ENGINE", "django.db.backends.postgresql")

    assert "No database uses ENGINE 'django_pgpool'." in run("poolstatus")
    assert status_json()["databases"] == {}
    assert "No database uses ENGINE 'django_pgpool'." in run("poolclose")
    assert "No database uses ENGINE 'django_pgpool'." in run("poolclose", "--kill")


def test_invalid_pool_options_raise_command_error_with_the_setting_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(connections["other"].settings_dict["OPTIONS"], "maxconn", 0)

    with pytest.raises(CommandError, match=r"DATABASES\['other'\]\['OPTIONS'\]\['maxconn'\] is 0"):
        run("poolstatus")


@pytest.mark.django_db(databases=["default", "other"])
def test_options_that_may_hold_secrets_are_shown_by_name_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = connections["other"].settings_dict["OPTIONS"]
    secrets = {
        "password": "secret-password",
        "passfile": "/secret/pgpass",
        "sslpassword": "secret-sslpassword",
        "sslkey": "/secret/client.key",
        "service": "secret-service",
    }
    shown = {"sslmode": "prefer", "application_name": "poolstatus-test", "connect_timeout": 7}
    for key, value in {**secrets, **shown}.items():
        monkeypatch.setitem(options, key, value)

    out = io.StringIO()
    with pytest.raises(CommandError) as excinfo:  # libpq can't use those settings
        call_command("poolstatus", "--database", "other", stdout=out)
    with pytest.raises(CommandError):
        call_command("poolstatus", "--database", "other", "--format", "json", stdout=out)
    output = out.getvalue()
    document = json.loads(output[output.index("{") :])
    database = document["databases"]["other"]["database"]

    for key, value in secrets.items():
        assert f"{key}=<hidden>" in output
        assert database["OPTIONS"][key] == "<hidden>"
        assert value not in output
        assert value not in str(excinfo.value)
        assert value not in json.dumps(document)
    for key, value in shown.items():
        assert f"{key}={value}" in output
        assert database["OPTIONS"][key] == value
    assert "maxconn" not in database["OPTIONS"]  # pool keys are in "config"


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_a_name_that_is_a_connection_string_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"postgresql://someone:secret-in-uri@{SERVER.host}:{SERVER.port}/shop"
    monkeypatch.setitem(connections["other"].settings_dict, "NAME", name)

    out = io.StringIO()
    with pytest.raises(CommandError) as excinfo:  # someone can't log in
        call_command("poolstatus", "--database", "other", stdout=out)
    with pytest.raises(CommandError):
        call_command("poolstatus", "--database", "other", "--format", "json", stdout=out)
    output = out.getvalue()
    document = json.loads(output[output.index("{") :])

    assert "secret-in-uri" not in output + str(excinfo.value)
    assert "(<hidden> on " in str(excinfo.value)
    assert re.search(r"\n  NAME +<hidden>\n", output)
    assert document["databases"]["other"]["database"]["NAME"] == "<hidden>"


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
def test_the_server_password_never_appears_in_any_output() -> None:
    query()
    password = SERVER.password
    assert password
    assert connection.settings_dict["PASSWORD"] == password

    outputs = [
        run("poolstatus"),
        run("poolstatus", "--format", "json"),
        run("poolclose"),
        run("poolclose", "--kill", "--idle-for", "0", "--wait"),
        run("poolclose", "--this-process"),
        run("poolstatus", "--format", "json"),
    ]

    for output in outputs:
        assert password not in output


# -- poolclose: a graceful reconnect of every process on this host ----------------


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_asks_every_process_on_this_host_to_reconnect_and_waits_for_them() -> None:
    before = backend_pid(connection)
    connection.close()
    wait_for(own_snapshot)  # this process has looked at the requests once

    asked, done = run("poolclose", "--database", "default", "--wait", "10").splitlines()

    assert asked == (
        f"Asked 1 process on host {HOSTNAME} to reconnect database 'default' "
        f"(pids {os.getpid()}): idle connections close within about a second, "
        "connections in use when they are returned."
    )
    assert re.fullmatch(r"Database 'default': every process has reconnected \(\d+\.\d s\)\.", done)
    generation = status.read_reconnect_generations()["default"]
    assert (own_snapshot() or {})["reconnect_seen"]["default"] == generation
    assert backend_pid(connection) != before


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_wait_says_which_processes_still_hold_old_connections() -> None:
    borrowed = threading.Event()
    give_back = threading.Event()
    pids: list[int] = []

    def hold() -> None:
        pids.append(backend_pid(connections["default"]))
        borrowed.set()
        give_back.wait(10)
        connections["default"].close()

    query()
    connection.close()
    wait_for(own_snapshot)
    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    borrowed.wait(5)
    try:
        with pytest.raises(CommandError) as excinfo:
            run("poolclose", "--database", "default", "--wait", "1.5")
    finally:
        give_back.set()
        holder.join()

    assert re.fullmatch(
        rf"after \d+\.\d s, these processes on host {re.escape(HOSTNAME)} still hold "
        r"connections of database 'default' opened before the request: "
        rf"pid {os.getpid()} \(1 connection in use\)",
        str(excinfo.value),
    )
    # Returned, it was closed rather than reused.
    wait_for(lambda: session_state(pids[0]) is None)
    assert "every process has reconnected" in run("poolclose", "--database", "default", "--wait")


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.usefixtures("no_pool_for_other")
def test_poolclose_of_a_database_without_pools_is_not_an_error() -> None:
    wait_for(lambda: not tagged_pids(connections["other"].settings_dict["NAME"], "other"))
    expected = (
        f"No process on host {HOSTNAME} has a pool of database 'other': nothing to reconnect.\n"
    )
    assert run("poolclose", "--database", "other") == expected
    assert run("poolclose", "--database", "other", "--wait") == expected
    assert run("poolclose", "--database", "other", "--kill") == (
        f"No idle session of database 'other' ({connections['other'].settings_dict['NAME']}) "
        "to end.\n"
    )
    assert run("poolclose", "--database", "other", "--this-process") == (
        "Closed 0 pools of database 'other'.\n"
    )


def test_poolclose_of_an_unknown_database_raises_command_error() -> None:
    with pytest.raises(CommandError, match="unknown database 'nope'"):
        run("poolclose", "--database", "nope")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--include-active"], "--include-active goes with --kill"),
        (["--idle-for", "1"], "--idle-for goes with --kill"),
        (["--kill", "--this-process"], "--this-process and --kill can't be combined"),
        (["--this-process", "--wait"], "--wait can't be combined with --this-process"),
        (["--wait", "-1"], "--wait: must be a number of seconds >= 0"),
        (["--kill", "--idle-for", "soon"], "--idle-for: must be a number of seconds >= 0"),
    ],
)
def test_poolclose_refuses_options_that_do_not_go_together(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        run("poolclose", *args)


@pytest.mark.parametrize("fault", ["a file in its place", "below a file"])
@pytest.mark.parametrize("command", ["poolstatus", "poolclose", "poolpause", "poolresume"])
def test_a_failing_status_directory_is_a_command_error_naming_it_and_the_fix(
    tmp_path: Path, settings: Settings, fault: str, command: str
) -> None:
    squatter = tmp_path / "squatter"
    squatter.write_text("")
    where = squatter if fault == "a file in its place" else squatter / "status"
    settings.PGPOOL_STATUS_DIR = str(where)
    with pytest.raises(CommandError) as failure:
        run(command)
    assert str(where) in str(failure.value)
    assert "PGPOOL_STATUS_DIR" in str(failure.value)


# -- poolpause and poolresume, in this process --------------------------------------


@pytest.fixture
def resume_all() -> Iterator[None]:
    """Resume every alias this test paused, whatever happened."""
    yield
    paused = [alias for alias, s in status.read_pause_state().items() if s["paused_since"]]
    if paused:
        call_command(
            "poolresume", *(f"--database={alias}" for alias in paused), stdout=io.StringIO()
        )


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.usefixtures("no_pool_for_other", "resume_all")
def test_a_pool_created_while_its_alias_is_paused_is_paused_before_its_first_borrow() -> None:
    name = connections["other"].settings_dict["NAME"]
    wait_for(lambda: not tagged_pids(name, "other"))
    assert run("poolpause", "--database", "other", "--wait", "5") == (
        f"Paused database 'other' on host {HOSTNAME}; no process has a pool of it now "
        "(processes that start meanwhile are paused too, until poolresume).\n"
    )
    served: list[float] = []

    def borrow() -> None:
        started = time.monotonic()
        try:
            with connections["other"].cursor() as cursor:
                cursor.execute("SELECT 1")
            served.append(time.monotonic() - started)
        finally:
            connections["other"].close()

    borrower = threading.Thread(target=borrow, name="late-borrower")
    borrower.start()
    try:
        wait_for(lambda: registry.entries("other"), what="the pool of 'other' created")
        (entry,) = registry.entries("other")
        wait_for(lambda: entry.pool.get_stats()["requests_waiting"] == 1, what="it waits")
        time.sleep(1.5)  # a maintenance round or more
        assert entry.pool.paused_since is not None
        assert entry.pool.get_stats()["pool_size"] == 0
        assert not tagged_pids(name, "other")  # not even minconn was opened
        assert served == []
        (pool,) = own_process(status_json("--database", "other"), "other")["pools"]
        assert pool["paused_since"] == entry.pool.paused_since
        assert pool["requests_waiting"] == 1

        out = run("poolresume", "--database", "other", "--wait", "5")
    finally:
        borrower.join(10)

    assert len(served) == 1 and 1.5 < served[0] < 5  # served after the resume, in its timeout
    asked, was, done = out.splitlines()
    assert asked == (
        f"Asked 1 process on host {HOSTNAME} to resume database 'other' (pids {os.getpid()}): "
        "the borrowers waiting are served first, within about a second, on new connections."
    )
    assert re.fullmatch(
        rf"Database 'other' was paused on host {re.escape(HOSTNAME)} since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+, \d+\.\d s ago\.",
        was,
    )
    assert re.fullmatch(r"Database 'other': every process has resumed \(\d+\.\d s\)\.", done)
    assert entry.pool.paused_since is None


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
@pytest.mark.usefixtures("no_pool_for_other", "resume_all")
def test_the_pause_state_is_kept_by_alias_with_a_generation_and_since_when() -> None:
    before = status.read_pause_state().get("other", {"generation": 0})["generation"]
    run("poolpause", "--database", "other")
    first = status.read_pause_state()["other"]
    run("poolpause", "--database", "other")  # again: still paused since the first time
    again = status.read_pause_state()["other"]
    out = run("poolpause", "--database", "other")
    run("poolresume", "--database", "other")
    resumed = status.read_pause_state()["other"]
    out_resumed = run("poolresume", "--database", "other")

    assert first["generation"] == before + 1 and first["paused_since"] is not None
    assert again == {"generation": before + 2, "paused_since": first["paused_since"]}
    assert f"Database 'other' is paused on host {HOSTNAME} since " in out
    assert resumed == {"generation": before + 4, "paused_since": None}
    assert out_resumed == (
        f"Database 'other' was not paused on host {HOSTNAME}; no process has a pool of it now: "
        "nothing to resume.\n"
    )
    document = json.loads((status.status_dir() / status.PAUSE_FILE).read_text())
    assert document["other"] == {"generation": before + 5, "paused_since": None}


@pytest.mark.parametrize("command", ["poolpause", "poolresume"])
def test_poolpause_and_poolresume_refuse_unknown_databases_and_bad_waits(command: str) -> None:
    with pytest.raises(CommandError, match="unknown database 'nope'"):
        run(command, "--database", "nope")
    with pytest.raises(CommandError, match=re.escape("--wait: must be a number of seconds >= 0")):
        run(command, "--wait", "-1")


# -- poolclose --kill: the server-side way ---------------------------------------


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_kill_ends_the_idle_sessions_of_the_pools_on_the_server(
    tagged_session: Callable[..., Any], sleeping_session: Callable[[str], int]
) -> None:
    close_pools("default")  # one pool with one connection, below
    wait_for(lambda: not tagged_pids(connection.settings_dict["NAME"], "default"))
    own = backend_pid(connection)
    connection.close()  # idle in this process's pool
    remote = tagged_session("shop [pgpool default@web-2:4242]")
    busy = sleeping_session("[pgpool default@web-2:4242]")
    untagged = tagged_session("someone else")
    name = connection.settings_dict["NAME"]

    # By default only sessions idle for 5 s: none here.
    assert run("poolclose", "--kill", "--database", "default") == (
        f"No idle session of database 'default' ({name}) to end.\n"
        "Left 3 sessions alone: 1 in use, 2 idle for less than 5 s (--idle-for and "
        "--include-active end those too; a graceful poolclose replaces them when they are "
        "returned).\n"
    )
    output = run("poolclose", "--kill", "--idle-for", "0", "--database", "default", "--wait", "10")

    lines = output.splitlines()
    assert lines[0].startswith(f"Ended 2 idle sessions of database 'default' ({name}) on ")
    assert f"1 of {HOSTNAME[:24]}:{os.getpid()}" in lines[0]
    assert "1 of web-2:4242" in lines[0]
    assert lines[1] == (
        "Left 1 session alone: 1 in use (--idle-for and --include-active end those too; a "
        "graceful poolclose replaces them when they are returned)."
    )
    assert re.fullmatch(
        r"Database 'default': the ended sessions are gone \(\d+\.\d s\)\.", lines[2]
    )
    assert session_state(remote.info.backend_pid) is None
    assert session_state(own) is None
    assert session_state(busy) == "active"
    assert session_state(untagged.info.backend_pid) == "idle"
    # The pool replaces the ended session: the next query just works.
    assert backend_pid(connection) != own
    connection.close()

    output = run("poolclose", "--kill", "--include-active", "--database", "default", "--wait")
    assert "1 of web-2:4242" in output
    assert session_state(busy) is None
    assert session_state(untagged.info.backend_pid) == "idle"


@pytest.fixture
def weak_role() -> Iterator[tuple[str, str]]:
    """A role with LOGIN only: it may neither see nor end other roles' sessions."""
    admin = psycopg2.connect(**SERVER.connect_kwargs())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("DROP ROLE IF EXISTS pgpool_weak")
        cursor.execute("CREATE ROLE pgpool_weak LOGIN PASSWORD 'weak-password'")
    yield "pgpool_weak", "weak-password"
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'pgpool_weak'"
        )
        cursor.execute("DROP ROLE pgpool_weak")
    admin.close()


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_kill_without_the_privilege_is_a_clear_error(
    weak_role: tuple[str, str],
    tagged_session: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote = tagged_session("[pgpool default@web-2:4242]")  # the superuser's
    settings_dict = connections["default"].settings_dict
    monkeypatch.setitem(settings_dict, "USER", weak_role[0])
    monkeypatch.setitem(settings_dict, "PASSWORD", weak_role[1])

    with pytest.raises(CommandError) as hidden:
        run("poolclose", "--kill", "--database", "default")
    with pytest.raises(CommandError) as refused:
        run("poolclose", "--kill", "--include-active", "--database", "default")

    assert re.fullmatch(
        r"role 'pgpool_weak' can't see the state of \d+ sessions? of database 'default' "
        r"\(they belong to other roles\), so it can't tell the idle ones\. Run poolclose --kill "
        r"as the role the pools connect as or as a superuser, or GRANT pg_read_all_stats, "
        r"pg_signal_backend TO pgpool_weak \(pg_signal_backend never covers a superuser's "
        r"sessions\); --include-active ends them all, busy or not\.",
        str(hidden.value),
    )
    assert re.fullmatch(
        r"role 'pgpool_weak' may not end the sessions of database 'default' \(.+\)\. Run "
        r"poolclose --kill as the role the pools connect as or as a superuser, or GRANT "
        r"pg_signal_backend TO pgpool_weak \(pg_signal_backend never covers a superuser's "
        r"sessions\)\.",
        str(refused.value),
    )
    assert session_state(remote.info.backend_pid) == "idle"


# -- poolclose --this-process, and its Python API ---------------------------------


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_this_process_closes_this_process_pools_and_is_idempotent() -> None:
    query()
    connection.close()
    assert registry.entries("default")

    first = run("poolclose", "--this-process", "--database", "default")
    second = run("poolclose", "--this-process", "--database", "default")

    assert first == "Closed 1 pool of database 'default'.\n"
    assert second == "Closed 0 pools of database 'default'.\n"
    assert registry.entries("default") == []


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_the_next_query_after_poolclose_this_process_opens_a_new_pool() -> None:
    connection.ensure_connection()
    old_pid = backend_pid(connection.connection)
    (old_entry,) = registry.entries("default")
    connection.close()

    run("poolclose", "--this-process")
    query()

    (new_entry,) = registry.entries("default")
    assert new_entry.pool is not old_entry.pool
    assert old_entry.pool.closed
    assert backend_pid(connection.connection) != old_pid
    (pool,) = own_process(status_json("--database", "default"))["pools"]
    assert pool["requests_num"] == 1
    assert pool["connections_num"] == 1


def test_poolclose_this_process_closes_every_database_on_the_engine_by_default() -> None:
    output = run("poolclose", "--this-process")

    assert "of database 'default'." in output
    assert "of database 'other'." in output
    assert registry.entries() == []


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_close_pools_is_the_python_api_of_poolclose_this_process() -> None:
    query()
    connection.close()

    assert close_pools("default") == 1
    assert close_pools("default") == 0
    assert registry.entries("default") == []
