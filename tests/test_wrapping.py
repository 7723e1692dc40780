"""Backends built on PooledWrapperMixin: what a subclass can rely on, and django-prometheus.

A subclass may keep state about its session and reset it in ``close()``
(django-tenants does, see test_tenants.py): whatever the ENGINE does to a
wrapper's connection goes through ``close()``, also when a forked child lets
go of the connection it inherited.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import InterfaceError, connection, connections, transaction
from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper

from django_pgpool import registry
from django_pgpool.checks import pooled_engine
from django_pgpool.wrapper import PooledWrapperMixin
from tests.conftest import backend_pid
from tests.helpers import scalar
from tests.test_fork import fork_child
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # fork() with threads running
]


class RecordingWrapper(PooledWrapperMixin, PostgresDatabaseWrapper):
    """A wrapping backend with state of its own about the session, reset in close()."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closes = 0
        self.session_note: str | None = None  # what it believes the session has

    def close(self) -> None:
        self.closes += 1
        self.session_note = None
        super().close()


@pytest.fixture
def recording() -> Iterator[RecordingWrapper]:
    wrapper = RecordingWrapper({**connections["default"].settings_dict}, alias="recording")
    yield wrapper
    wrapper.close()
    registry.close_pools(alias="recording")


def pid_of(wrapper: Any) -> int:
    with wrapper.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child; return what it returned (through a pipe)."""
    read_end, write_end = os.pipe()

    def child() -> int:
        os.close(read_end)
        os.write(write_end, json.dumps(body()).encode())
        return 0

    status = fork_child(child)
    os.close(write_end)
    data = os.read(read_end, 65536)
    os.close(read_end)
    assert status == 0, "the child failed (its traceback is above)"
    result: dict[str, Any] = json.loads(data)
    return result


def test_a_forked_child_lets_go_of_an_inherited_connection_through_close(
    recording: RecordingWrapper,
) -> None:
    parent_pid = pid_of(recording)
    recording.session_note = "SET on the parent's session"

    def child() -> dict[str, Any]:
        seen = {
            "closes": recording.closes,
            "note": recording.session_note,
            "connection": recording.connection is None,
        }
        seen["pid"] = pid_of(recording)
        recording.close()
        return seen

    seen = in_child(child)
    assert seen["closes"] == 1, "the subclass's close() didn't run in the child"
    assert seen["note"] is None
    assert seen["connection"] is True
    assert seen["pid"] != parent_pid
    # Nothing happened to the parent's wrapper or its session.
    assert recording.closes == 0
    assert recording.session_note == "SET on the parent's session"
    assert pid_of(recording) == parent_pid


def test_a_wrapper_of_another_parent_thread_is_closed_too(recording: RecordingWrapper) -> None:
    """close() checks the thread; in the child the wrapper's thread doesn't exist."""
    holding, release = threading.Event(), threading.Event()
    wrappers: list[RecordingWrapper] = []
    errors: list[str] = []

    def hold() -> None:
        try:
            wrapper = RecordingWrapper({**connections["default"].settings_dict}, alias="recording")
            wrappers.append(wrapper)
            pid_of(wrapper)
            holding.set()
            release.wait(30)
            wrapper.close()
        except BaseException:
            errors.append(traceback.format_exc())
            holding.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        assert not errors, errors[0]
        seen = in_child(lambda: {"closes": wrappers[0].closes, "gone": wrappers[0].connection})
    finally:
        release.set()
        thread.join(30)
    assert not errors, errors[0]
    assert seen == {"closes": 1, "gone": None}


def test_a_revoked_lease_is_let_go_through_close(recording: RecordingWrapper) -> None:
    """CONN_MAX_AGE=None, maxconn 1: another thread's borrow revokes the lease
    between requests; the owner's next request finds out and runs close()."""
    settings_dict = {
        **recording.settings_dict,
        "CONN_MAX_AGE": None,
        "OPTIONS": {**recording.settings_dict["OPTIONS"], "minconn": 0, "maxconn": 1},
    }
    owner = RecordingWrapper(settings_dict, alias="recording")
    try:
        owner_pid = pid_of(owner)
        owner.session_note = "SET on the leased session"
        owner.close_if_unusable_or_obsolete()  # a request ends: the lease goes idle
        assert owner.closes == 0

        def borrow() -> int:
            other = RecordingWrapper(settings_dict, alias="recording")
            try:
                return pid_of(other)  # maxconn 1: only by revoking the lease
            finally:
                other.close()

        pids: list[int] = []
        thread = threading.Thread(target=lambda: pids.append(borrow()))
        thread.start()
        thread.join(30)
        assert pids == [owner_pid]
        owner.close_if_unusable_or_obsolete()  # the next request starts
        assert owner.closes == 1, "the subclass's close() didn't run for the revoked lease"
        assert owner.session_note is None
        assert pid_of(owner) == owner_pid  # borrowed again: the same, now idle, session
    finally:
        owner.close()
        registry.close_pools(alias="recording")


def test_a_child_forked_inside_atomic_cannot_go_on_with_the_parents_transaction() -> None:
    """As after any close() inside atomic(): refused until the block ends, then a fresh session."""
    read_end, write_end = os.pipe()
    with transaction.atomic():
        Item.objects.create(name="parent's, uncommitted")
        parent_pid = backend_pid(connection.connection)
        pid = os.fork()
        if pid == 0:  # the child: leaves the block, reports, never returns
            seen: dict[str, Any] = {}
            try:
                Item.objects.count()
                seen["inside"] = "ran"
            except InterfaceError:
                seen["inside"] = "refused"
    if pid == 0:
        status = 70
        try:
            os.close(read_end)
            seen["after"] = Item.objects.count()
            seen["pid"] = scalar("SELECT pg_backend_pid()")
            connection.close()
            os.write(write_end, json.dumps(seen).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    _, wait_status = os.waitpid(pid, 0)
    data = os.read(read_end, 65536)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    seen = json.loads(data)
    assert seen["inside"] == "refused"
    # The child's own session sees only what the parent committed (the
    # block had not committed when the child counted, or had: 0 or 1), and
    # the parent's transaction was neither committed nor rolled back by it.
    assert seen["after"] in (0, 1)
    assert seen["pid"] != parent_pid
    assert Item.objects.filter(name="parent's, uncommitted").count() == 1


# -- django-prometheus: tests/wrapping/prometheus/base.py ---------------------------------


@pytest.fixture
def prometheus_alias(add_alias: Callable[..., str]) -> str:
    pytest.importorskip("django_prometheus", reason="django-prometheus is not installed")
    return add_alias("metered", ENGINE="tests.wrapping.prometheus")


def sample(name: str, alias: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, {"alias": alias, "vendor": "postgresql"})
    return value or 0.0


def test_django_prometheus_counts_the_statements_of_pooled_connections(
    prometheus_alias: str,
) -> None:
    alias = prometheus_alias
    assert pooled_engine("tests.wrapping.prometheus")
    wrapper = connections[alias]
    assert isinstance(wrapper, PooledWrapperMixin)
    before = sample("django_db_execute_total", alias)
    Item.objects.using(alias).create(name="counted")
    first = pid_of(wrapper)
    wrapper.close()  # back to the pool
    assert Item.objects.using(alias).filter(name="counted").count() == 1
    second = pid_of(wrapper)
    wrapper.close()
    assert second == first, "not pooled: a new session after close()"
    # INSERT, pg_backend_pid(), SELECT count(*), pg_backend_pid().
    assert sample("django_db_execute_total", alias) - before == 4
    # Counted per borrow by nobody: the pool, not django-prometheus, connects
    # (pgpool_* metrics count connections).
    assert sample("django_db_new_connections_total", alias) == 0


def test_django_prometheus_counts_errors_on_pooled_connections(prometheus_alias: str) -> None:
    from prometheus_client import REGISTRY

    alias = prometheus_alias
    labels = {"alias": alias, "vendor": "postgresql", "type": "UndefinedTable"}
    before = REGISTRY.get_sample_value("django_db_errors_total", labels) or 0.0
    with pytest.raises(Exception, match="no_such_table"), connections[alias].cursor() as cur:
        cur.execute("SELECT * FROM no_such_table")
    connections[alias].close()
    after = REGISTRY.get_sample_value("django_db_errors_total", labels) or 0.0
    assert after - before == 1
    # The pool took the failed session back clean: the next statement works.
    assert scalar("SELECT 1", using=alias) == 1
    connections[alias].close()
