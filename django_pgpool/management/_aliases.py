"""Which databases the commands act on: the ``--database`` option, and the aliases it picks."""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError
from django.db import connections

from ..checks import ENGINES, pooled_engine
from ..wrapper import PooledWrapperMixin

__all__ = ["add_database_argument", "database_wrapper", "pool_config", "selected_aliases"]


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
    return [
        alias for alias in connections if pooled_engine(connections.settings[alias].get("ENGINE"))
    ]


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


def database_wrapper(alias: str) -> PooledWrapperMixin:
    """Return the alias's wrapper; raise CommandError if it is not one of this ENGINE's."""
    wrapper = connections[alias]
    if not isinstance(wrapper, PooledWrapperMixin):  # an ENGINE string we know, another class
        raise CommandError(f"database {alias!r} is not a django_pgpool DatabaseWrapper")
    return wrapper


def pool_config(alias: str) -> dict[str, Any]:
    """Return the validated pool options; raise CommandError if they are invalid."""
    try:
        return database_wrapper(alias).pool_options().shown()
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc
