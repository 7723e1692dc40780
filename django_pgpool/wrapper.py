"""The pooled behaviour of a Django database wrapper, as a mixin.

``PooledWrapperMixin`` goes first in the bases of any wrapper derived from
Django's postgresql one (the plain ENGINE in ``base.py``, PostGIS in
``postgis/base.py``, a third party's subclass of either): it replaces
``get_new_connection()`` and ``_close()`` with a borrow from and a return to
a process-global pool. Only what pooling changes is overridden; everything
else (operations, introspection, schema editor, test-database creation) is
the wrapped backend's own.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extras
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
from django.db.utils import DEFAULT_DB_ALIAS
from django.utils.asyncio import async_unsafe
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from . import forking, registry, status
from .errors import PoolClosed
from .identity import application_name
from .options import POOL_KEYS, PoolOptions, parse_options
from .pool import ConnectionPool, fresh_credentials
from .session import PooledConnection

__all__ = ["PooledWrapperMixin"]

logger = logging.getLogger("django_pgpool")

# Every pool the ENGINE creates publishes its status from then on (the pool
# core and the registry know nothing of Django's settings or of status files).
registry.on_pool_created(status.start_publishing)

# django.db.backends.base.base.NO_DB_ALIAS: the alias of the short-lived
# connection Django opens for CREATE/DROP DATABASE. Never pooled: it must
# not linger on the maintenance database.
NO_DB_ALIAS = "__no_db__"

PSYCOPG3_MESSAGE = (
    "django_pgpool runs on psycopg2, but Django has picked psycopg 3 because the "
    "'psycopg' package is installed in this environment. Uninstall it "
    "(pip uninstall psycopg psycopg-binary psycopg-c psycopg-pool) to use "
    "ENGINE 'django_pgpool', or use ENGINE 'django.db.backends.postgresql' with "
    "OPTIONS['pool'] for Django's own psycopg 3 pool."
)


NOT_INSTALLED_MESSAGE = (
    "DATABASES uses a django_pgpool ENGINE but 'django_pgpool' is not in INSTALLED_APPS: "
    "manage.py poolstatus, manage.py poolclose and the pool's system checks are "
    "unavailable. Add 'django_pgpool' to INSTALLED_APPS."
)
_warned_not_installed = False


def _warn_if_app_not_installed() -> None:
    """Say once per process that the commands and checks need the app installed."""
    global _warned_not_installed
    if _warned_not_installed:
        return
    if apps.apps_ready:  # all app configs imported (models maybe not): it knows
        installed = apps.is_installed("django_pgpool")
    else:
        # The main thread's wrapper is often built while the apps load (a
        # model's Meta asks connection.ops): the setting tells, not the registry.
        from django.conf import settings

        installed = any(
            str(entry) == "django_pgpool" or str(entry).startswith("django_pgpool.")
            for entry in settings.INSTALLED_APPS
        )
    if installed:
        return
    _warned_not_installed = True
    logger.warning(NOT_INSTALLED_MESSAGE)


TCP_KEEPALIVE_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def _json_passthrough(value: Any) -> Any:
    return value


def _prepare_new_connection(conn: PooledConnection, isolation_level: int | None) -> None:
    """Do once per physical connection what Django does on every connect."""
    if isolation_level is not None:
        conn.isolation_level = isolation_level
    # As Django's postgresql get_new_connection(): JSONField decodes itself.
    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=_json_passthrough)
    # Django's default; its set_autocommit(True) at each borrow then costs nothing.
    conn.autocommit = True


class _ReturnedConnection:
    """Stands in for a connection that _close() gave back to the pool.

    Django's close() then forgets it; code that calls _close() alone and keeps
    using the wrapper finds it unusable, as a closed psycopg2 connection.
    """

    closed = 1
    pool_pid = 0  # not inherited from another process (see ensure_connection)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise psycopg2.InterfaceError("connection already closed (returned to the pool)")


RETURNED = _ReturnedConnection()


@dataclass
class _BorrowPlan:
    """What a wrapper worked out for one state of its settings (see _plan())."""

    # Not in the repr: both hold the password.
    signature: tuple[Any, ...] = field(repr=False)
    params: dict[str, Any] = field(repr=False)
    options: PoolOptions
    session_settings: dict[str, str]
    pool: ConnectionPool | None = None


def _sharing_check(wrapper: PooledWrapperMixin) -> Callable[[], bool]:
    """Return a check of whether ``wrapper`` lets other threads use its connection."""
    ref = weakref.ref(wrapper)

    def shared() -> bool:
        owner = ref()
        return owner is not None and owner.allow_thread_sharing

    return shared


# Every live wrapper, so that a forked child can make them forget the
# connections they hold (the sessions are the parent's). Not overriding
# ensure_connection() for this keeps Django's own test patches working.
_wrappers: weakref.WeakSet[PooledWrapperMixin] = weakref.WeakSet()


class _InheritedConnection(_ReturnedConnection):
    """Stands in for a connection inherited through fork(), so that close() can forget it."""

    def __getattr__(self, name: str) -> Any:
        raise psycopg2.InterfaceError("connection already closed (inherited from the parent)")


INHERITED = _InheritedConnection()


def _forget_inherited_connections() -> None:
    pid = os.getpid()
    for wrapper in list(_wrappers):
        # The plan holds the parent's pool: worked out again at the next borrow.
        wrapper._pgpool_plan = None
        # The raw attribute: a lease is never claimed from the parent's pool.
        connection = wrapper._pgpool_connection
        if connection is None or getattr(connection, "pool_pid", 0) in (0, pid):
            continue
        # Another parent thread may have been inside a query on it: never
        # close it here (see ConnectionPool.after_fork_in_child).
        forking.detach_inherited(connection, close=False)
        # Then forget it through close(), as a subclass expects: its own
        # close() must run (django-tenants' forgets there the search_path it
        # believes the session has). With this stand-in and no pool, _close()
        # returns nothing to a pool and sends nothing to the parent's session.
        wrapper.connection, wrapper._pgpool = INHERITED, None
        # A thread of the parent may have held this lock at fork time, and
        # none but this one exists here; close() takes it.
        wrapper._thread_sharing_lock = threading.Lock()  # type: ignore[attr-defined]
        try:
            # The wrapper may be another parent thread's: close() checks.
            wrapper.inc_thread_sharing()
            try:
                wrapper.close()
            finally:
                wrapper.dec_thread_sharing()
        except Exception:  # e.g. forked in a thread running an event loop
            logger.exception("django_pgpool: close() of %r after fork failed", wrapper.alias)
        if wrapper.connection is INHERITED and not wrapper.closed_in_transaction:
            # close() failed before forgetting it. (Inside atomic() it keeps
            # the stand-in: queries fail until the block ends, as after any
            # close() there: the parent's transaction can't go on here.)
            wrapper.connection = None


forking.register("wrappers", after_in_child=_forget_inherited_connections)


if TYPE_CHECKING:
    from django.db.backends.postgresql.base import DatabaseWrapper as _Base
else:
    _Base = object


class PooledWrapperMixin(_Base):
    """Pooling for any DatabaseWrapper derived from Django's postgresql one.

    List it before the wrapper it pools (at run time its base is ``object``):

        from django.db.backends.postgresql import base
        from django_pgpool.wrapper import PooledWrapperMixin

        class DatabaseWrapper(PooledWrapperMixin, base.DatabaseWrapper):
            pass

    That is all ``django_pgpool.base`` and ``django_pgpool.postgis.base`` are.
    A subclass may keep state about its session and reset it in ``close()``:
    whatever the ENGINE does to the connection (a return, a revoked lease, a
    fork) goes through ``close()``.

    With ``CONN_MAX_AGE`` other than 0 the connection is kept across requests
    as a lease: still the pool's loan, which the pool may revoke between
    requests (where Django runs ``close_if_unusable_or_obsolete()``: its
    request signals, Celery's fixup around each task) for a borrower that
    would otherwise wait. The next use finds out, runs ``close()`` and
    borrows again. Threads that never run it (commands, scripts) keep their
    lease for good, as with Django's persistent connections.
    """

    # Lock discipline of a lease: ``_pgpool_between_requests`` is read and
    # written only by the thread using the wrapper (a thread it is shared
    # with never marks it: see ``_pgpool_end_of_request()``); the lease's
    # state in the pool is under the pool's lock. The wrapper's flag is set
    # before the pool is told, and cleared after the pool agreed:
    # interrupted in between, the wrapper claims a lease that was never
    # revocable (harmless), never uses one the pool could revoke. Every use
    # goes through the ``connection`` property, which claims the lease back
    # first (``lease_claim()``, one lock round per request).

    # The raw connection behind Django's ``connection`` attribute (a property here).
    _pgpool_connection: Any = None
    _pgpool_between_requests = False
    # The pool the current connection was borrowed from: it may no longer be
    # the registry's pool for these settings when it is returned.
    _pgpool: ConnectionPool | None = None
    _pgpool_loan = 0  # the loan number of the current connection
    # Which of Django's checks is deciding whether to close the connection
    # ("health", "obsolete"; "" for none): see _discard_on_close().
    _pgpool_judging = ""

    @property
    def connection(self) -> Any:
        """Django's connection attribute: a lease between requests is claimed back first."""
        if self._pgpool_between_requests:
            return self._pgpool_claim_lease()
        return self._pgpool_connection

    @connection.setter
    def connection(self, value: Any) -> None:
        self._pgpool_connection = value
        self._pgpool_between_requests = False

    def _pgpool_claim_lease(self) -> Any:
        """Return the leased connection if the pool didn't revoke it, else forget it."""
        connection, pool = self._pgpool_connection, self._pgpool
        if (
            connection is not None
            and pool is not None
            and pool.lease_claim(connection, self._pgpool_loan)
        ):
            self._pgpool_between_requests = False
            return connection
        # Revoked: the pool reset it and lent it on. Forgotten first (never
        # touched again, even if interrupted here), then close() runs with
        # nothing to close: a subclass's close() (django-tenants forgets its
        # search_path there) still sees the connection go.
        self._pgpool_connection = None
        self._pgpool = None
        self._pgpool_between_requests = False
        self.close()
        return None

    def _pgpool_end_of_request(self) -> None:
        """Let the pool revoke this wrapper's lease until its next use (a request's end).

        Not inside a transaction or atomic(), nor while the wrapper is shared
        with other threads (a live test server's): those keep it in use.
        """
        connection, pool = self._pgpool_connection, self._pgpool
        if (
            connection is None
            or pool is None
            or self._pgpool_between_requests
            or self.in_atomic_block
            or not self.autocommit
            # allow_thread_sharing without its lock: a stale read is the
            # owner's own (only this thread shares or stops sharing it).
            or self._thread_sharing_count  # type: ignore[attr-defined]
            or connection.closed
            or connection.get_transaction_status() != TRANSACTION_STATUS_IDLE
        ):
            return
        self._pgpool_between_requests = True  # first: see the class docstring
        if not pool.lease_idle(connection, self._pgpool_loan):
            # A borrower waits, or the connection is retired: returned now.
            self._pgpool_between_requests = False
            self.close()

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        if is_psycopg3:
            raise ImproperlyConfigured(PSYCOPG3_MESSAGE)
        super().__init__(settings_dict, alias)
        _warn_if_app_not_installed()
        self._pgpool = None
        self._pgpool_loan = 0
        self._pgpool_plan: _BorrowPlan | None = None
        self._pgpool_sharing = _sharing_check(self)
        _wrappers.add(self)

    @property
    def pooled(self) -> bool:
        """False for Django's ``NO_DB_ALIAS`` wrappers (test-database creation), which
        connect directly: their sessions must not outlive the command."""
        return self.alias != NO_DB_ALIAS

    def pool_options(self) -> PoolOptions:
        """Return the validated pool options; raise ImproperlyConfigured if they are wrong."""
        # Parsed again only when the settings change: _plan() keeps the result.
        return parse_options(
            self.alias, self.settings_dict["OPTIONS"], self.settings_dict.get("CONN_MAX_AGE", 0)
        )

    @property
    def pool(self) -> None:
        """Django's psycopg 3 pool: never used here (truthy would change Django's code paths)."""
        return None

    def _settings_signature(self) -> tuple[Any, ...]:
        """Return what the connect parameters are made of (cheap to compare)."""
        sd = self.settings_dict
        return (
            os.getpid(),
            sd["NAME"],
            sd["USER"],
            sd["PASSWORD"],
            sd["HOST"],
            sd["PORT"],
            sd.get("CONN_MAX_AGE", 0),
            self.timezone_name,
            sd["OPTIONS"],
        )

    def _plan(self) -> _BorrowPlan:
        """Return the validated options, connect parameters and pool for the current settings.

        Worked out again only when the settings change (the test runner's NAME
        switch, override_settings, fork), not at every borrow.
        """
        signature = self._settings_signature()
        plan = self._pgpool_plan
        if plan is None or plan.signature != signature:
            # Validate before Django reads OPTIONS (e.g. its own 'pool').
            options = self.pool_options()
            params = self._pooled_connection_params(options)
            frozen = (*signature[:-1], copy.deepcopy(signature[-1]))
            plan = self._pgpool_plan = _BorrowPlan(
                frozen, params, options, self._session_settings()
            )
        return plan

    def get_connection_params(self) -> dict[str, Any]:
        if self.pooled:
            return dict(self._plan().params)
        return self._libpq_params()

    def _libpq_params(self) -> dict[str, Any]:
        """Return Django's connect parameters without the pool's own OPTIONS."""
        params: dict[str, Any] = super().get_connection_params()
        for key in POOL_KEYS:
            params.pop(key, None)
        return params

    def _pooled_connection_params(self, options: PoolOptions) -> dict[str, Any]:
        params = self._libpq_params()
        params["application_name"] = application_name(
            self.alias, params.get("application_name") or os.environ.get("PGAPPNAME")
        )
        # libpq waits forever for an unreachable server by default; a borrower
        # opening a connection must give up in about the pool's timeout.
        params.setdefault("connect_timeout", max(2, math.ceil(min(options.timeout, 10))))
        # A query in flight to a server host that vanished (no RST) would wait
        # for Linux's 2-hour keepalive default; these notice it in about 60 s.
        for key, value in TCP_KEEPALIVE_DEFAULTS.items():
            params.setdefault(key, value)
        return params

    def _session_settings(self) -> dict[str, str]:
        """Return what every pooled session is given when it is opened.

        The time zone and the role: Django then finds nothing to SET at each
        borrow. The pool gives them with SET right after connecting (one
        round trip per new connection), as Django's own backend does, so
        RESET and errors behave the same; the reset replays them after
        DISCARD ALL in its own round trip.
        """
        settings = {}
        if self.timezone_name:
            settings["TimeZone"] = self.timezone_name
        if role := self.settings_dict["OPTIONS"].get("assume_role"):
            settings["role"] = str(role)
        return settings

    def _isolation_level(self) -> int | None:
        """Set and return the isolation level from OPTIONS, as Django's get_new_connection."""
        options = self.settings_dict["OPTIONS"]
        if "isolation_level" not in options:
            self.isolation_level = IsolationLevel.READ_COMMITTED
            return None
        try:
            self.isolation_level = IsolationLevel(options["isolation_level"])
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {options['isolation_level']} "
                f"specified. Use one of the psycopg.IsolationLevel values."
            ) from None
        return int(self.isolation_level)

    @async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self.pooled:
            # Django's own short-lived connections (test-database creation,
            # the commands' look at the server) need the password too.
            credentials = self.pool_options().credentials
            if credentials is not None:
                fresh = fresh_credentials(credentials, f"database {self.alias!r}")
                conn_params = {**conn_params, **fresh}
            return super().get_new_connection(conn_params)
        plan = self._plan()
        isolation_level = self._isolation_level()
        pool = self._pool_of(plan, conn_params, isolation_level)
        connection = None
        try:
            try:
                connection = pool.getconn()
            except PoolClosed:
                # close_pools() closed it while this borrower waited in line
                # (or just before): the pool that replaces it serves the
                # borrow. Once: a pool closed again at once is an error.
                closed, pool = pool, self._pool_of(plan, conn_params, isolation_level)
                if pool is closed:
                    raise
                connection = pool.getconn()
            # Recorded before anything else can interrupt: close() returns it.
            self._pgpool, self._pgpool_loan = pool, connection.loan
            connection.shared = self._pgpool_sharing
        except BaseException:
            # Interrupted (a signal handler's exception): Django never sees
            # this connection, so it goes back now.
            if connection is not None:
                self._pgpool = None
                pool.putconn(connection, close=True, loan=connection.loan)
            raise
        return connection

    def _pool_of(
        self, plan: _BorrowPlan, conn_params: dict[str, Any], isolation_level: int | None
    ) -> ConnectionPool:
        """Return the open pool that lends for ``conn_params`` (the registry's, cached)."""
        pool = plan.pool
        if pool is None or pool.closed or conn_params != plan.params:
            pool = registry.get_pool(
                self.alias,
                conn_params,
                plan.options,
                configure=lambda conn: _prepare_new_connection(conn, isolation_level),
                extra_key=(isolation_level,),
                session_settings=plan.session_settings,
            )
            if conn_params == plan.params:
                plan.pool = pool
        return pool

    def _set_autocommit(self, autocommit: bool) -> None:
        # Pooled connections are already in autocommit mode at each borrow;
        # psycopg2's setter releases the GIL even when nothing changes.
        if self.pooled and self.connection.autocommit == autocommit:
            return
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _configure_role(self, connection: Any) -> bool:
        # Pooled connections got the role at connect time (libpq options).
        if self.pooled:
            return False
        result: bool = super()._configure_role(connection)  # type: ignore[misc]
        return result

    def close_if_health_check_failed(self) -> None:
        # Django calls this before every cursor; with nothing to check (its
        # own first test, without claiming a lease: the cursor will) it
        # returns at once.
        if not self.health_check_enabled or self.health_check_done:  # type: ignore[attr-defined]
            return
        # Django closes the connection here only when is_usable() said it is
        # broken: then the pool must not lend it again either.
        self._pgpool_judging = "health"
        try:
            super().close_if_health_check_failed()
        finally:
            self._pgpool_judging = ""

    def close_if_unusable_or_obsolete(self) -> None:
        # Django calls this at request_started and at request_finished
        # (Celery's fixup around each task too). A lease between requests
        # here means a request starts (super() claims it back at its first
        # look); one in use, that a request ends: the connection Django keeps
        # goes between requests. A wrong guess costs a lock round, never
        # safety: every use claims the lease first.
        ending = not self._pgpool_between_requests
        # Django closes here a connection that is broken (errors_occurred and
        # not is_usable()), whose autocommit was left changed, or that reached
        # CONN_MAX_AGE: the first two are closed, the last goes back to the pool.
        self._pgpool_judging = "obsolete"
        try:
            super().close_if_unusable_or_obsolete()
        finally:
            self._pgpool_judging = ""
        if ending:
            self._pgpool_end_of_request()

    def _discard_on_close(self) -> bool:
        """Return True if the connection being closed must not be lent again."""
        if self.in_atomic_block:
            # Django keeps self.connection after close() inside atomic(): it
            # must never be lent to anyone else.
            return True
        if self._pgpool_judging == "health":
            return True  # it closes only what failed is_usable()
        if self._pgpool_judging == "obsolete":
            # Broken (errors_occurred is cleared when is_usable() passes) or
            # autocommit left changed; an aged one has neither.
            return self.errors_occurred or self.autocommit != self.settings_dict["AUTOCOMMIT"]
        return False

    def _close(self) -> None:
        connection = self.connection  # a lease between requests is claimed first
        pool, self._pgpool = self._pgpool, None
        if pool is None or connection is None:
            super()._close()  # type: ignore[misc]
            return None
        discard = self._discard_on_close()
        self.connection = RETURNED
        with self.wrap_database_errors:
            pool.putconn(connection, close=discard, loan=self._pgpool_loan)
        if self.in_atomic_block:
            # Django keeps self.connection inside atomic(): the closed one.
            self.connection = connection
        return None

    def close_pool(self) -> None:
        """Close every pool of this process that reaches this database.

        Django's test-database code calls this before CREATE DATABASE ...
        TEMPLATE and DROP DATABASE, which need no other session on it.
        """
        if not self.pooled:
            return
        database = registry.database_of(self._libpq_params())
        database.pop("user", None)
        registry.close_pools(database=database)
