"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import import_module
from typing import Any

from django.db import connections

from django_pgpool import base


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "", interval: float = 0.02
) -> float:
    """Wait until ``predicate()`` is true; return how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout} s: {what or predicate}")
        time.sleep(interval)
    return time.monotonic() - started


def server_connections(admin: Any, application_name: str) -> int:
    """Count the server's sessions with this exact application_name."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        count: int = cur.fetchone()[0]
    return count


def make_wrapper(alias: str, **changes: Any) -> Any:
    """A wrapper on a copy of 'default' with changes (Django allows such ad-hoc ones in tests)."""
    settings_dict = {**connections["default"].settings_dict, **changes}
    engine = settings_dict["ENGINE"]
    wrapper_class = import_module(f"{engine}.base").DatabaseWrapper if "." in engine else None
    return (wrapper_class or base.DatabaseWrapper)(settings_dict, alias=alias)


def scalar(sql: str, using: str = "default") -> Any:
    """Run ``sql`` on a Django alias and return the first column of the first row."""
    with connections[using].cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]
