"""The ENGINE under Django: borrowing, returning, settings, errors, round trips."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connection, connections, transaction
from django.test import override_settings

from django_pgpool import base, options, registry, wrapper
from django_pgpool.checks import check_pool_options
from tests.helpers import make_wrapper, run_python, scalar
from tests.pgserver import ServerInfo
from tests.tcpproxy import TcpProxy
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def test_connection_is_returned_on_close_and_reused() -> None:
    # From a borrow of this test's own: the first test of a run finds the
    # connection Django's test-database set-up left open. In CI (Django 6.0
    # and 6.1, after another tox env on the same server) that connection,
    # opened 64 backends earlier, was not reused after close(); why is not
    # known yet (not reproduced locally): the message below names the stats.
    connection.close()
    first = scalar("SELECT pg_backend_pid()")
    pool = connection._pgpool
    before = pool.get_stats()
    connection.close()
    assert connection.connection is None
    second = scalar("SELECT pg_backend_pid()")
    # Why it wasn't reused, if it wasn't: the stats say what the pool did.
    after = pool.get_stats()
    changed = {k: (before[k], after[k]) for k in before if after[k] != before[k]}
    assert second == first, f"a new session after close(); the pool's stats moved: {changed}"
    connection.close()
    connection.close()  # a second close is harmless


def test_queries_go_to_the_test_database() -> None:
    assert scalar("SELECT current_database()") == "test_pgpool"
    assert scalar("SELECT current_database()", using="other") == "test_pgpool_other"


def test_pool_keys_never_reach_libpq() -> None:
    params = connection.get_connection_params()
    assert not {"minconn", "maxconn", "timeout"} & params.keys()
    connection.ensure_connection()
    assert "maxconn" not in connection.connection.dsn


def test_pools_are_created_lazily_and_keyed_by_connect_parameters() -> None:
    registry.close_pools()
    assert registry.entries("default") == []
    scalar("SELECT 1")
    scalar("SELECT 1", using="other")
    default, other = registry.entries("default"), registry.entries("other")
    assert len(default) == len(other) == 1
    assert default[0].pool is not other[0].pool
    assert default[0].database["dbname"] == "test_pgpool"


def test_the_no_database_connection_is_never_pooled() -> None:
    before = len(registry.entries())
    with connection._nodb_cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone()[0] == "postgres"
    assert len(registry.entries()) == before
    assert not [e for e in registry.entries() if e.database.get("dbname") == "postgres"]


def test_json_field_round_trips() -> None:
    data = {"a": [1, 2, {"b": None}], "text": "é", "n": 1.5}
    item = Item.objects.create(name="json", data=data)
    assert Item.objects.get(pk=item.pk).data == data
    assert Item.objects.filter(data__a__0=1).count() == 1
    connection.close()  # and on a reused connection
    assert Item.objects.get(pk=item.pk).data == data


def test_atomic_blocks_commit_and_roll_back() -> None:
    with transaction.atomic():
        Item.objects.create(name="kept")
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        Item.objects.create(name="rolled back")
        1 / 0  # noqa: B018
    connection.close()
    assert list(Item.objects.values_list("name", flat=True)) == ["kept"]


def test_close_inside_atomic_never_lends_the_connection_to_anyone_else() -> None:
    with transaction.atomic():
        raw = connection.connection
        connection.close()
        assert raw.closed
    connection.close()
    assert scalar("SELECT 1") == 1


@override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo")
def test_override_settings_time_zone_reaches_the_session() -> None:
    assert scalar("SHOW TimeZone") == "Asia/Tokyo"
    connection.close()
    assert scalar("SHOW TimeZone") == "Asia/Tokyo"


def test_time_zone_is_restored_after_override_settings() -> None:
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        assert scalar("SHOW TimeZone") == "Asia/Tokyo"
    connection.close()
    assert scalar("SHOW TimeZone") == "UTC"


def test_assume_role_is_the_current_user(add_alias: Callable[..., str], admin: Any) -> None:
    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_assumed")
        cur.execute("CREATE ROLE pgpool_assumed")
    try:
        options = {**connections["default"].settings_dict["OPTIONS"]}
        alias = add_alias("assumed", OPTIONS={**options, "assume_role": "pgpool_assumed"})
        assert scalar("SELECT current_user", using=alias) == "pgpool_assumed"
        with connections[alias].cursor() as cur:
            cur.execute("RESET ROLE")
        connections[alias].close()
        assert scalar("SELECT current_user", using=alias) == "pgpool_assumed"
        connections[alias].close()
        registry.close_pools(alias=alias)
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS pgpool_assumed")


def test_exhausted_pool_raises_django_operational_error(add_alias: Callable[..., str]) -> None:
    options = {**connections["default"].settings_dict["OPTIONS"], "maxconn": 1, "timeout": 0.3}
    alias = add_alias("tiny", OPTIONS=options)
    holder = make_wrapper("tiny", OPTIONS=options)  # another thread's wrapper, same pool
    holder.inc_thread_sharing()
    holder.ensure_connection()
    try:
        with pytest.raises(OperationalError, match=r"maxconn=1, 1 in use"):
            scalar("SELECT 1", using=alias)
    finally:
        holder.close()
    assert scalar("SELECT 1", using=alias) == 1


def test_killed_backend_is_replaced_without_an_error(admin: Any) -> None:
    pid = scalar("SELECT pg_backend_pid()")
    connection.close()
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [pid])
    import time

    time.sleep(0.1)
    assert scalar("SELECT pg_backend_pid()") != pid


# -- configuration errors ---------------------------------------------------


def wrapper_with(**changes: Any) -> base.DatabaseWrapper:
    wrapper: base.DatabaseWrapper = make_wrapper("bad", **changes)
    return wrapper


@pytest.mark.parametrize("conn_max_age", [-1, True])
def test_a_conn_max_age_that_is_not_none_nor_seconds_is_refused(conn_max_age: object) -> None:
    wrapper = wrapper_with(CONN_MAX_AGE=conn_max_age)
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.ensure_connection()
    message = str(info.value)
    assert f"DATABASES['bad']['CONN_MAX_AGE'] is {conn_max_age!r}" in message
    assert "a number of seconds > 0 or None" in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"maxconn": "10"},
            "DATABASES['bad']['OPTIONS']['maxconn'] is '10'; it must be an integer",
        ),
        ({"maxconn": True}, "['maxconn'] is True; it must be an integer >= 1"),
        ({"maxconn": 0}, "['maxconn'] is 0; it must be an integer >= 1"),
        ({"minconn": -1}, "['minconn'] is -1; it must be an integer >= 0"),
        ({"minconn": 5, "maxconn": 2}, "['minconn'] (5) is greater than"),
        ({"timeout": -1}, "['timeout'] is -1; it must be a number of seconds > 0"),
        ({"timeout": "30"}, "['timeout'] is '30'"),
        ({"max_lifetime": float("nan")}, "['max_lifetime'] is nan"),
        ({"check_after": False}, "['check_after'] is False"),
        ({"reset": "sometimes"}, "['reset'] is 'sometimes'; it must be one of 'auto', 'always'"),
        ({"pool": True}, "Django's own pool option, which needs psycopg 3"),
    ],
)
def test_bad_pool_options_are_refused_with_the_setting_and_the_fix(
    options: dict[str, Any], message: str
) -> None:
    wrapper = wrapper_with(OPTIONS=options)
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.ensure_connection()
    assert message in str(info.value)


def test_system_checks_report_every_problem_with_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {
        **connections["default"].settings_dict,
        "CONN_MAX_AGE": -1,
        "OPTIONS": {"maxconn": "x", "minconn": 3, "pool": True},
    }
    monkeypatch.setattr(settings, "DATABASES", {"default": bad})
    errors = check_pool_options()
    ids = sorted(e.id for e in errors)
    assert ids == ["django_pgpool.E001", "django_pgpool.E003", "django_pgpool.E004"]
    assert all(e.hint and "DATABASES['default']" in e.hint for e in errors)


def test_system_checks_pass_on_valid_settings() -> None:
    assert check_pool_options() == []


TYPO_MESSAGE = (
    "DATABASES['bad']['OPTIONS']['max_conn'] is not an option of django_pgpool, nor of "
    "Django's postgresql backend, nor a connection parameter of libpq"
)


def test_a_misspelt_option_fails_manage_py_check_and_suggests_the_right_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = {**connections["default"].settings_dict, "OPTIONS": {"max_conn": 20, "timout": 5}}
    monkeypatch.setattr(settings, "DATABASES", {"bad": bad})
    errors = check_pool_options()
    assert [e.id for e in errors] == ["django_pgpool.E006", "django_pgpool.E006"]
    assert TYPO_MESSAGE in errors[0].msg
    assert "(invalid connection option 'max_conn'). Did you mean 'maxconn'?" in errors[0].msg
    assert "Did you mean 'timeout'?" in errors[1].msg
    assert errors[0].hint == "Fix DATABASES['bad']['OPTIONS']['max_conn']."


def test_a_misspelt_option_is_refused_at_first_use_with_the_same_message() -> None:
    wrapper = wrapper_with(OPTIONS={"minconn": 0, "max_conn": 20})
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.ensure_connection()
    assert TYPO_MESSAGE in str(info.value)
    assert "Did you mean 'maxconn'? Rename or remove it." in str(info.value)
    assert registry.entries("bad") == []  # no pool with maxconn 10 behind the user's back


@pytest.mark.parametrize(
    "key", ["sslmode", "target_session_attrs", "assume_role", "isolation_level", "cursor_factory"]
)
def test_options_of_libpq_django_and_psycopg2_pass_the_checks(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = {**connections["default"].settings_dict, "OPTIONS": {key: None}}
    monkeypatch.setattr(settings, "DATABASES", {"default": bad})
    assert check_pool_options() == []


def test_options_of_django_on_psycopg3_only_are_refused_with_the_reason() -> None:
    problems = options.option_problems("bad", {"prepare_threshold": None})
    assert [p.id for p in problems] == ["django_pgpool.E006"]
    assert "Django's postgresql backend on psycopg 3" in problems[0].message


# PostgreSQL version that introduced each keyword newer than 15.
LIBPQ_KEYWORD_SINCE = {
    "gssdelegation": 16,
    "load_balance_hosts": 16,
    "require_auth": 16,
    "sslcertmode": 16,
    "sslnegotiation": 17,
}


def test_the_libpq_keyword_list_matches_what_the_libpq_in_use_accepts() -> None:
    """The hard-coded list (for "did you mean") against libpq's own parser."""
    libpq_major = psycopg2.extensions.libpq_version() // 10000
    for key in options.LIBPQ_KEYWORDS:
        accepted = options._libpq_knows(key)
        if libpq_major >= LIBPQ_KEYWORD_SINCE.get(key, 15):
            assert accepted, key
    # What is not libpq's must never reach it: libpq refuses each of them.
    for key in options.POOL_KEYS | options.DJANGO_KEYS | options.PSYCOPG2_KEYS | {"max_conn"}:
        assert not options._libpq_knows(key), key
        with pytest.raises(psycopg2.ProgrammingError, match="invalid connection option"):
            psycopg2.extensions.parse_dsn(f"{key}=x")
    # The parameters the ENGINE adds by itself are libpq's.
    for key in [*wrapper.TCP_KEEPALIVE_DEFAULTS, "application_name", "connect_timeout"]:
        assert key in options.LIBPQ_KEYWORDS and options._libpq_knows(key)


def test_psycopg3_picked_by_django_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Installing psycopg 3 here would switch the whole suite to it; inject the flag.
    monkeypatch.setattr(wrapper, "is_psycopg3", True)
    with pytest.raises(ImproperlyConfigured, match="Django has picked psycopg 3") as info:
        wrapper_with()
    assert "pip uninstall psycopg" in str(info.value)


# -- round trips per request ------------------------------------------------


@pytest.fixture
def proxy(server: ServerInfo) -> Iterator[TcpProxy]:
    proxy = TcpProxy(server.host, server.port)
    yield proxy
    proxy.stop()


def simulated_request(alias: str, pk: int) -> None:
    """What a request does: Django's close_old_connections() around two ORM calls.

    (request_started/request_finished only visit the aliases in settings,
    so the ad-hoc alias is handled here the same way.)
    """
    connections[alias].close_if_unusable_or_obsolete()
    Item.objects.using(alias).get(pk=pk)
    with transaction.atomic(using=alias):
        Item.objects.using(alias).filter(pk=pk).update(name="visited")
    connections[alias].close_if_unusable_or_obsolete()


def round_trips(proxy: TcpProxy, alias: str, pk: int) -> list[str]:
    simulated_request(alias, pk)  # warm up: open and configure the connection
    with proxy.counting() as sent:
        simulated_request(alias, pk)
    return sent


def test_a_request_costs_the_same_round_trips_as_a_persistent_connection(
    add_alias: Callable[..., str], proxy: TcpProxy
) -> None:
    pk = Item.objects.create(name="x").pk
    pooled = add_alias("pooled_proxy", HOST="127.0.0.1", PORT=proxy.port)
    persistent = add_alias(
        "persistent_proxy",
        ENGINE="django.db.backends.postgresql",
        HOST="127.0.0.1",
        PORT=proxy.port,
        CONN_MAX_AGE=None,
        OPTIONS={},
    )
    persistent_sent = round_trips(proxy, persistent, pk)
    pooled_sent = round_trips(proxy, pooled, pk)
    assert len(persistent_sent) == 4  # SELECT, BEGIN, UPDATE, COMMIT
    assert pooled_sent == persistent_sent
    assert connections[pooled].connection is None  # it was returned after each request
    assert registry.entries(pooled)[0].pool.get_stats()["requests_num"] == 2


def test_reset_always_adds_exactly_one_round_trip(
    add_alias: Callable[..., str], proxy: TcpProxy
) -> None:
    pk = Item.objects.create(name="x").pk
    options = {**connections["default"].settings_dict["OPTIONS"], "reset": "always"}
    alias = add_alias("always_proxy", HOST="127.0.0.1", PORT=proxy.port, OPTIONS=options)
    sent = round_trips(proxy, alias, pk)
    assert len(sent) == 5
    # DISCARD ALL, in parts, with the time zone given at connect replayed: one round trip.
    assert sent[-1].startswith("CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL;")
    assert sent[-1].endswith("""SET "TimeZone" TO 'UTC';""")


def test_using_the_engine_without_the_app_installed_says_what_to_add(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(wrapper, "_warned_not_installed", False)
    with override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "tests.testapp"]):
        wrapper_with()
        wrapper_with()
    messages = [r.getMessage() for r in caplog.records if r.name == "django_pgpool"]
    assert messages == [wrapper.NOT_INSTALLED_MESSAGE]
    assert "Add 'django_pgpool' to INSTALLED_APPS" in messages[0]


def test_a_wrapper_closed_with_underscore_close_is_unusable_like_stock() -> None:
    """Django's own suite calls _close() alone (backends.tests, #21553)."""
    scalar("SELECT 1")
    connection._close()
    assert connection.is_usable() is False
    connection.close()
    assert scalar("SELECT 1") == 1


# A script, manage.py shell or a Celery prefork task: queries from the main
# thread, whose connection object Django builds while the apps load.
MAIN_THREAD_QUERIES = """
import django
django.setup()
from django.db import connection
for _ in range(3):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()
print("queried")
"""


@pytest.mark.parametrize(
    ("args", "done"),
    [
        (["-c", MAIN_THREAD_QUERIES], "queried"),
        (["-m", "django", "shell", "-c", MAIN_THREAD_QUERIES], "queried"),
        # Reads django_migrations (writes nothing): a management command's queries.
        (["-m", "django", "migrate", "--plan"], "Planned operations:"),
    ],
    ids=["script", "manage.py shell", "manage.py migrate"],
)
def test_the_missing_app_warning_fires_once_in_a_process_that_queries_from_its_main_thread(
    args: list[str], done: str
) -> None:
    environ = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.script_settings",
        "PGPOOL_TEST_WITHOUT_APP": "1",
    }
    proc = run_python(args, environ, timeout=60)
    assert done in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count(wrapper.NOT_INSTALLED_MESSAGE) == 1, proc.stderr


def test_no_missing_app_warning_when_the_app_is_installed() -> None:
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.script_settings"}
    proc = run_python(["-c", MAIN_THREAD_QUERIES], environ, timeout=60)
    assert "queried" in proc.stdout
    assert "INSTALLED_APPS" not in proc.stderr, proc.stderr
