"""The pool's own settings: read once from a database's OPTIONS, validated, frozen.

Validation lives here and nowhere else: the ENGINE raises the first problem as
``ImproperlyConfigured``, the system checks (``checks.py``) report every one.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

import psycopg2
import psycopg2.extensions
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .pool import callable_name

__all__ = [
    "DJANGO_KEYS",
    "LIBPQ_KEYWORDS",
    "POOL_KEYS",
    "PSYCOPG2_KEYS",
    "RESET_MODES",
    "PoolOptions",
    "Problem",
    "option_problems",
    "parse_options",
]

RESET_MODES = ("auto", "always")
ResetMode = Literal["auto", "always"]


@dataclass(frozen=True)
class PoolOptions:
    """The validated pool settings of one database (OPTIONS keys of the same name)."""

    minconn: int = 1
    maxconn: int = 10
    timeout: float = 30.0
    failover_timeout: float = 5.0
    max_waiting: int = 0
    max_lifetime: float = 3600.0
    max_idle: float = 600.0
    check_after: float = 1.0
    reset: ResetMode = "auto"
    leak_timeout: float | None = None
    # Called before every new connection for fresh libpq parameters (a
    # rotating password): resolved from a dotted path by parse_options().
    credentials: Callable[[], Mapping[str, Any]] | None = None
    # Run with the health check, on the raw connection; raising rejects it
    # (e.g. a pg_is_in_recovery() test after a failover).
    check: Callable[[Any], object] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the options as ConnectionPool's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def shown(self) -> dict[str, Any]:
        """Return the options as they may be shown (JSON-safe: a callable by its name)."""
        shown = self.as_dict()
        for key in _CALLABLE_KEYS:
            if shown[key] is not None:
                shown[key] = callable_name(shown[key])
        return shown


DEFAULTS = PoolOptions()

#: The OPTIONS keys that belong to the pool and must never reach libpq.
POOL_KEYS = frozenset(f.name for f in fields(PoolOptions))

#: OPTIONS keys that Django's postgresql backend takes for itself and never
#: passes to libpq (its get_connection_params() pops them), Django 5.2-6.1.
DJANGO_KEYS = frozenset({"assume_role", "isolation_level", "pool", "server_side_binding"})

#: Keyword arguments of psycopg2.connect() that are psycopg2's, not libpq's
#: (Django sets cursor_factory itself).
PSYCOPG2_KEYS = frozenset({"connection_factory", "cursor_factory", "async", "async_"})

# Django's OPTIONS keys for psycopg 3 only: under psycopg2 they reach libpq.
_PSYCOPG3_KEYS = frozenset({"prepare_threshold"})

#: libpq's connection parameters, PostgreSQL 15 to 17 (the documentation's
#: "Parameter Key Words", 32.1.2), for the "did you mean" of a misspelt key.
#: Whether a key is one is asked of the libpq psycopg2 runs on (_libpq_knows()):
#: it is the one that refuses an unknown key at connect.
LIBPQ_KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",  # 16
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",  # 16
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",  # 16
        "requirepeer",
        "requiressl",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",  # 16
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslmode",
        "sslnegotiation",  # 17
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)


@functools.cache
def _libpq_knows(key: str) -> bool:
    """Return True if the libpq in use takes ``key`` as a connection parameter."""
    if not key.isidentifier():  # "max conn", "a=b": never one, and not to be parsed
        return False
    try:
        psycopg2.extensions.parse_dsn(f"{key}=x")
    except psycopg2.ProgrammingError:  # invalid dsn: invalid connection option "..."
        return False
    return True


def _libpq_version() -> str:
    version = psycopg2.extensions.libpq_version()
    return f"{version // 10000}.{version % 10000}"


def _unknown_key_problem(alias: str, key: object) -> Problem | None:
    """Return the problem with an OPTIONS key nobody takes, or None if someone does."""
    if isinstance(key, str) and (
        key in POOL_KEYS or key in DJANGO_KEYS or key in PSYCOPG2_KEYS or _libpq_knows(key)
    ):
        return None
    if not isinstance(key, str):
        path = f"DATABASES[{alias!r}]['OPTIONS']"
        return Problem(E_UNKNOWN_KEY, path, f"{path} has the key {key!r}; keys are strings.")
    path = _path(alias, key)
    if key in _PSYCOPG3_KEYS:
        message = (
            f"{path} is an option of Django's postgresql backend on psycopg 3; django_pgpool "
            "runs on psycopg2, whose libpq would refuse to connect (invalid connection option "
            f"{key!r}). Remove it."
        )
        return Problem(E_UNKNOWN_KEY, path, message)
    known = sorted(POOL_KEYS | DJANGO_KEYS | LIBPQ_KEYWORDS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    fix = f"Did you mean {close[0]!r}? Rename or remove it." if close else "Remove it."
    message = (
        f"{path} is not an option of django_pgpool, nor of Django's postgresql backend, nor "
        f"a connection parameter of libpq {_libpq_version()}, which would refuse to connect "
        f"(invalid connection option {key!r}). {fix}"
    )
    return Problem(E_UNKNOWN_KEY, path, message)


# key -> (lowest allowed value, text of the allowed range)
_INT_KEYS = {
    "minconn": (0, "an integer >= 0"),
    "maxconn": (1, "an integer >= 1"),
    "max_waiting": (0, "an integer >= 0 (0 means no limit)"),
}
# key -> text of the allowed range (>= 0, and > 0 for those in _STRICTLY_POSITIVE)
_SECONDS_KEYS = {
    "timeout": "a number of seconds > 0",
    "failover_timeout": "a number of seconds >= 0 (0 fails at the first refused connect)",
    "max_lifetime": "a number of seconds > 0",
    "max_idle": "a number of seconds > 0",
    "check_after": "a number of seconds >= 0 (0 checks every borrow)",
}
_STRICTLY_POSITIVE = {"timeout", "max_lifetime", "max_idle"}


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class Problem(NamedTuple):
    """One invalid setting: its check id, its setting path and what to do."""

    id: str
    setting: str
    message: str


# Check ids, one per kind of problem (documented in docs/checks.md).
E_VALUE = "django_pgpool.E001"  # a pool option has a wrong type or is out of range
E_MIN_MAX = "django_pgpool.E002"  # minconn > maxconn
E_DJANGO_POOL = "django_pgpool.E003"  # OPTIONS['pool'] (Django's psycopg 3 pool)
E_CONN_MAX_AGE = "django_pgpool.E004"  # CONN_MAX_AGE not None nor a number >= 0
E_CALLABLE = "django_pgpool.E005"  # OPTIONS['credentials'] or ['check'] can't be imported or called
E_UNKNOWN_KEY = "django_pgpool.E006"  # an OPTIONS key that is no one's (a typo of 'maxconn')

# key -> what the callable must do (for the error message)
_CALLABLE_KEYS = {
    "credentials": "taking no arguments and returning a dict of libpq connect parameters, "
    "e.g. {'password': token}",
    "check": "taking the psycopg2 connection and raising if it must not be used, e.g. when "
    "SELECT pg_is_in_recovery() is true",
}


def _path(alias: str, key: str) -> str:
    return f"DATABASES[{alias!r}]['OPTIONS'][{key!r}]"


def option_problems(alias: str, options: Mapping[str, Any], conn_max_age: Any = 0) -> list[Problem]:
    """Return every problem in a database's settings."""
    problems: list[Problem] = [
        problem for key in options if (problem := _unknown_key_problem(alias, key)) is not None
    ]

    def bad(key: str, allowed: str) -> None:
        path = _path(alias, key)
        message = f"{path} is {options[key]!r}; it must be {allowed}."
        problems.append(Problem(E_VALUE, path, message))

    for key, (low, allowed) in _INT_KEYS.items():
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            bad(key, allowed)
    for key, allowed in _SECONDS_KEYS.items():
        if key not in options:
            continue
        value = options[key]
        if not _is_finite_number(value) or value < 0 or (key in _STRICTLY_POSITIVE and value == 0):
            bad(key, allowed)
    leak_timeout = options.get("leak_timeout")
    if leak_timeout is not None and (not _is_finite_number(leak_timeout) or leak_timeout <= 0):
        bad("leak_timeout", "None (off) or a number of seconds > 0")
    if "reset" in options and options["reset"] not in RESET_MODES:
        bad("reset", "one of " + ", ".join(repr(m) for m in RESET_MODES))
    for key, does in _CALLABLE_KEYS.items():
        if options.get(key) is None:
            continue
        try:
            _callable(options[key])
        except (ImportError, TypeError) as exc:
            path = _path(alias, key)
            problems.append(
                Problem(
                    E_CALLABLE,
                    path,
                    f"{path} is {options[key]!r}: {exc}. It must be a callable, or the "
                    f"dotted path of one, {does}.",
                )
            )

    minconn, maxconn = (
        options.get("minconn", DEFAULTS.minconn),
        options.get("maxconn", DEFAULTS.maxconn),
    )
    if (
        not any(p.setting in (_path(alias, "minconn"), _path(alias, "maxconn")) for p in problems)
        and minconn > maxconn
    ):
        problems.append(
            Problem(
                E_MIN_MAX,
                _path(alias, "minconn"),
                f"{_path(alias, 'minconn')} ({minconn}) is greater than "
                f"{_path(alias, 'maxconn')} ({maxconn}); set minconn <= maxconn.",
            )
        )
    if options.get("pool"):  # Django's own test helpers set pool=False: "no pool"
        problems.append(
            Problem(
                E_DJANGO_POOL,
                _path(alias, "pool"),
                "Database pooling requires psycopg >= 3: "
                f"{_path(alias, 'pool')} is Django's own pool option, which needs psycopg 3; "
                "django_pgpool pools by itself: remove 'pool' and size the pool with "
                "OPTIONS['minconn'] and OPTIONS['maxconn'].",
            )
        )
    if conn_max_age is not None and (
        isinstance(conn_max_age, bool)
        or not isinstance(conn_max_age, int | float)
        or not conn_max_age >= 0
    ):
        problems.append(
            Problem(
                E_CONN_MAX_AGE,
                f"DATABASES[{alias!r}]['CONN_MAX_AGE']",
                f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {conn_max_age!r}; it must be 0 (each "
                "request borrows a connection and gives it back), a number of seconds > 0 or "
                "None (a thread keeps the connection it borrowed across requests, as a lease "
                "the pool takes back for a borrower that would otherwise wait).",
            )
        )
    return problems


def parse_options(alias: str, options: Mapping[str, Any], conn_max_age: Any = 0) -> PoolOptions:
    """Return the validated PoolOptions, or raise ImproperlyConfigured for the first problem."""
    problems = option_problems(alias, options, conn_max_age)
    if problems:
        raise ImproperlyConfigured(problems[0].message)
    given = {key: options[key] for key in POOL_KEYS if key in options}
    for key in (*_SECONDS_KEYS, "leak_timeout"):
        if given.get(key) is not None:
            given[key] = float(given[key])
    for key in _CALLABLE_KEYS:
        if given.get(key) is not None:
            given[key] = _callable(given[key])
    return PoolOptions(**given)


def _callable(value: Any) -> Callable[..., Any]:
    """Return the callable a setting names; raise ImportError or TypeError if it is none."""
    function = import_string(value) if isinstance(value, str) else value
    if not callable(function):
        raise TypeError(f"{callable_name(type(function))} object is not callable")
    return function  # type: ignore[no-any-return]
