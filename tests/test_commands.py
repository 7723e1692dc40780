"""The poolstatus and poolclose management commands, on the real server."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections

from django_pgpool import registry
from django_pgpool.base import DatabaseWrapper
from django_pgpool.pool import STATS_KEYS
from tests.conftest import backend_pid
from tests.settings import SERVER


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def status_json(*args: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(run("poolstatus", "--format", "json", *args))
    return document


def table_row(output: str, alias: str) -> dict[str, str]:
    """Return the poolstatus table row of an alias as {heading: cell}."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("alias "))
    headings = ["alias", "database", "size", "idle", "in_use", "waiting", "requests"]
    headings += ["timeouts", "errors", "opened", "closed", "lost"]
    for line in lines[header + 2 :]:
        if not line:
            break
        cells = line.split()
        if cells[0] == alias:
            return dict(zip(headings, cells, strict=False))
    raise AssertionError(f"no row for {alias!r} in:\n{output}")


def query() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


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


# -- poolstatus ----------------------------------------------------------------


def test_poolstatus_lists_both_databases_with_their_configuration() -> None:
    output = run("poolstatus")

    for alias in ("default", "other"):
        assert table_row(output, alias)
        assert f"\n{alias}:\n  NAME          {connections[alias].settings_dict['NAME']}\n" in output
    assert "  maxconn       4\n" in output
    assert "  timeout       5.0\n" in output
    assert f"  HOST          {SERVER.host}\n" in output
    assert f"  USER          {SERVER.user}\n" in output


@pytest.mark.usefixtures("no_pool_for_other")
def test_poolstatus_says_when_a_database_has_no_pool_in_this_process() -> None:
    output = run("poolstatus", "--database", "other")

    assert "no pool in this process yet" in output
    assert status_json("--database", "other")["databases"]["other"]["pools"] == []


@pytest.mark.django_db(databases=["default"])
def test_poolstatus_shows_the_figures_of_the_pool_a_query_borrowed_from() -> None:
    query()

    row = table_row(run("poolstatus"), "default")
    pools = status_json()["databases"]["default"]["pools"]

    assert int(row["size"]) >= 1
    assert int(row["requests"]) >= 1
    assert int(row["in_use"]) >= 1  # the test's transaction holds its connection
    assert len(pools) == 1
    assert pools[0]["pool_size"] >= 1
    assert pools[0]["requests_num"] >= 1
    assert pools[0]["pool_in_use"] >= 1
    assert pools[0]["database"]["dbname"] == connection.settings_dict["NAME"]
    assert "default" in pools[0]["aliases"]


@pytest.mark.django_db(databases=["default"])
def test_poolstatus_json_is_one_document_with_the_documented_shape() -> None:
    query()

    document = status_json()

    assert document["pid"] == os.getpid()
    assert list(document["databases"]) == ["default", "other"]
    for alias, info in document["databases"].items():
        assert set(info) == {"config", "database", "pools"}
        wrapper = connections[alias]
        assert isinstance(wrapper, DatabaseWrapper)
        assert info["config"] == wrapper.pool_options().as_dict()
        assert set(info["database"]) == {"NAME", "HOST", "PORT", "USER", "OPTIONS"}
        assert info["database"]["NAME"] == connections[alias].settings_dict["NAME"]
        assert info["database"]["PORT"] == str(SERVER.port)
    (pool,) = document["databases"]["default"]["pools"]
    assert list(pool)[:2] == ["aliases", "database"]
    assert set(STATS_KEYS) <= set(pool)
    assert all(isinstance(pool[key], int) for key in STATS_KEYS)
    assert pool["pool_min"] == 1
    assert pool["pool_max"] == 4


def test_database_option_limits_the_output_to_that_database() -> None:
    output = run("poolstatus", "--database", "other")

    assert "\nother:\n" in output
    assert "default" not in output
    assert list(status_json("--database", "other")["databases"]) == ["other"]


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


def test_invalid_pool_options_raise_command_error_with_the_setting_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(connections["other"].settings_dict["OPTIONS"], "maxconn", 0)

    with pytest.raises(CommandError, match=r"DATABASES\['other'\]\['OPTIONS'\]\['maxconn'\] is 0"):
        run("poolstatus")


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

    output = run("poolstatus", "--database", "other")
    database = status_json("--database", "other")["databases"]["other"]["database"]

    for key, value in secrets.items():
        assert f"{key}=<hidden>" in output
        assert database["OPTIONS"][key] == "<hidden>"
        assert value not in output
        assert value not in json.dumps(database)
    for key, value in shown.items():
        assert f"{key}={value}" in output
        assert database["OPTIONS"][key] == value
    assert "maxconn" not in database["OPTIONS"]  # pool keys are in "config"


def test_a_name_that_is_a_connection_string_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "postgresql://someone:secret-in-uri@db.example.com/shop"
    monkeypatch.setitem(connections["other"].settings_dict, "NAME", name)

    output = run("poolstatus", "--database", "other")
    document = status_json("--database", "other")

    assert "secret-in-uri" not in output
    assert "  NAME          <hidden>\n" in output
    assert document["databases"]["other"]["database"]["NAME"] == "<hidden>"


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_the_server_password_never_appears_in_any_output() -> None:
    query()
    password = SERVER.password
    assert password
    assert connection.settings_dict["PASSWORD"] == password

    outputs = [
        run("poolstatus"),
        run("poolstatus", "--format", "json"),
        run("poolclose"),
        run("poolclose"),
        run("poolstatus", "--format", "json"),
    ]

    for output in outputs:
        assert password not in output


# -- poolclose -----------------------------------------------------------------


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_poolclose_closes_this_process_pools_and_is_idempotent() -> None:
    query()
    connection.close()
    assert registry.entries("default")

    first = run("poolclose", "--database", "default")
    second = run("poolclose", "--database", "default")

    assert first == "Closed 1 pool of database 'default'.\n"
    assert second == "Closed 0 pools of database 'default'.\n"
    assert registry.entries("default") == []
    assert status_json("--database", "default")["databases"]["default"]["pools"] == []


@pytest.mark.django_db(databases=["default"], transaction=True)
def test_the_next_query_after_poolclose_opens_a_new_pool() -> None:
    connection.ensure_connection()
    old_pid = backend_pid(connection.connection)
    (old_entry,) = registry.entries("default")
    connection.close()

    run("poolclose")
    query()

    (new_entry,) = registry.entries("default")
    assert new_entry.pool is not old_entry.pool
    assert old_entry.pool.closed
    assert backend_pid(connection.connection) != old_pid
    pools = status_json("--database", "default")["databases"]["default"]["pools"]
    assert pools[0]["requests_num"] == 1
    assert pools[0]["connections_num"] == 1


@pytest.mark.usefixtures("no_pool_for_other")
def test_poolclose_of_a_database_without_pools_closes_none() -> None:
    assert run("poolclose", "--database", "other") == "Closed 0 pools of database 'other'.\n"


def test_poolclose_closes_every_database_on_the_engine_by_default() -> None:
    output = run("poolclose")

    assert "of database 'default'." in output
    assert "of database 'other'." in output
    assert registry.entries() == []


def test_poolclose_of_an_unknown_database_raises_command_error() -> None:
    with pytest.raises(CommandError, match="unknown database 'nope'"):
        run("poolclose", "--database", "nope")
