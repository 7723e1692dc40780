"""What the management commands share: choosing the databases, and what may be shown of one.

Nothing here ever returns a password: the PASSWORD setting is never read, and
OPTIONS values are shown only for keys known to hold no secret.
"""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Iterable, Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError
from django.db import connections

from ..base import DatabaseWrapper
from ..options import POOL_KEYS
from ..pool import STATS_KEYS
from ..registry import PoolEntry

__all__ = [
    "ENGINES",
    "HIDDEN",
    "add_database_argument",
    "database_identity",
    "pool_config",
    "pool_stats",
    "selected_aliases",
    "shown_options",
]

#: The ENGINE values that select this backend.
ENGINES = ("django_pgpool", "django_pgpool.base")

#: What is shown in place of an OPTIONS value that may hold a secret.
HIDDEN = "<hidden>"

#: OPTIONS keys (besides the pool's own) whose values are shown. Any other
#: key may hold a secret (password, passfile, sslpassword, sslkey, a service
#: file...) and is shown by name only.
SHOWN_OPTIONS = frozenset(
    {
        "application_name",
        "assume_role",
        "client_encoding",
        "connect_timeout",
        "gssencmode",
        "isolation_level",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "server_side_binding",
        "sslmode",
        "target_session_attrs",
    }
)


def add_database_argument(parser: ArgumentParser, action: str) -> None:
    """Add the repeatable ``--database ALIAS`` option; ``action`` says what it does."""
    parser.add_argument(
        "--database",
        action="append",
        dest="databases",
        metavar="ALIAS",
        help=f"{action}; repeat it for several. Default: every database whose ENGINE is "
        f"{ENGINES[0]!r}.",
    )


def _pooled_aliases() -> list[str]:
    return [alias for alias in connections if connections.settings[alias].get("ENGINE") in ENGINES]


def selected_aliases(requested: Iterable[str] | None) -> list[str]:
    """Return the aliases asked for (default: all on this ENGINE); raise CommandError if one
    is unknown or on another ENGINE."""
    pooled = _pooled_aliases()
    if not requested:
        return pooled
    valid = ", ".join(repr(alias) for alias in pooled) or "none"
    chosen: list[str] = []
    for alias in requested:
        if alias not in connections.settings:
            raise CommandError(
                f"unknown database {alias!r}; databases on ENGINE {ENGINES[0]!r}: {valid}"
            )
        if alias not in pooled:
            engine = connections.settings[alias].get("ENGINE")
            raise CommandError(
                f"database {alias!r} uses ENGINE {engine!r}, not {ENGINES[0]!r}; "
                f"databases on ENGINE {ENGINES[0]!r}: {valid}"
            )
        if alias not in chosen:
            chosen.append(alias)
    return chosen


def _wrapper(alias: str) -> DatabaseWrapper:
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):  # an ENGINE string we know, another class
        raise CommandError(f"database {alias!r} is not a django_pgpool DatabaseWrapper")
    return wrapper


def pool_config(alias: str) -> dict[str, Any]:
    """Return the validated pool options; raise CommandError if they are invalid."""
    try:
        return _wrapper(alias).pool_options().as_dict()
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc


def shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the OPTIONS that go to libpq, with every value that may be a secret hidden."""
    return {
        str(key): (value if key in SHOWN_OPTIONS else HIDDEN)
        for key, value in options.items()
        if key not in POOL_KEYS
    }


def _shown_name(name: str) -> str:
    # libpq takes a dbname holding "=" or a postgres:// URI as a connection
    # string, which may carry a password.
    return HIDDEN if "=" in name or "://" in name else name


def database_identity(alias: str) -> dict[str, Any]:
    """Return the database an alias reaches (NAME, HOST, PORT, USER, OPTIONS), no password."""
    settings_dict = _wrapper(alias).settings_dict
    identity: dict[str, Any] = {
        key: str(settings_dict.get(key) or "") for key in ("NAME", "HOST", "PORT", "USER")
    }
    identity["NAME"] = _shown_name(identity["NAME"])
    identity["OPTIONS"] = shown_options(settings_dict.get("OPTIONS") or {})
    return identity


def pool_stats(entry: PoolEntry) -> dict[str, Any]:
    """Return a pool's identity and every figure of get_stats() (0 for unset counters)."""
    stats = entry.pool.get_stats()
    figures = {key: stats[key] for key in STATS_KEYS}
    figures.update(stats)  # keep any figure added to the pool after this list
    database = dict(entry.database)
    if "dbname" in database:
        database["dbname"] = _shown_name(database["dbname"])
    return {"aliases": sorted(entry.aliases), "database": database, **figures}
