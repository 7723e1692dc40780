"""The strategies compared, and the Django DATABASES entry of each.

Stdlib only: imported by the runner, by the in-process worker and by the
gunicorn settings, in each strategy's own virtual environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: The database every strategy uses, on the one throwaway server.
DATABASE = "pgpool_bench"
#: Products the runner seeds in it (ids 1..PRODUCTS), which the workloads read and buy.
PRODUCTS = 100
#: Most connections every pool may hold per process (PgBouncer: in all).
DEFAULT_MAXCONN = 16


@dataclass(frozen=True)
class Strategy:
    key: str
    label: str
    #: Which virtual environment runs it: "main" (the runner's, psycopg2 +
    #: django_pgpool), "psycopg3" or "dbcp" (created by the runner).
    venv: str
    #: Whether it is a pool bounded by maxconn (the T=32 targets compare these).
    bounded_pool: bool
    #: One line for the docs: how it is configured.
    setup: str


STRATEGIES: tuple[Strategy, ...] = (
    Strategy(
        "nopool",
        "stock, CONN_MAX_AGE=0",
        "main",
        False,
        "django.db.backends.postgresql (psycopg2): a new connection per request",
    ),
    Strategy(
        "persistent",
        "stock, CONN_MAX_AGE=None",
        "main",
        False,
        "django.db.backends.postgresql (psycopg2): one connection per thread, kept forever",
    ),
    Strategy(
        "djangopool",
        "Django pool (psycopg 3)",
        "psycopg3",
        True,
        'django.db.backends.postgresql on psycopg 3, OPTIONS["pool"] = '
        '{"min_size": 1, "max_size": 16} (CONN_HEALTH_CHECKS off, the default)',
    ),
    Strategy(
        "dbcp",
        "django-db-connection-pool",
        "dbcp",
        True,
        "dj_db_conn_pool.backends.postgresql (psycopg2, SQLAlchemy QueuePool), "
        'POOL_OPTIONS = {"POOL_SIZE": 16, "MAX_OVERFLOW": 0}; its default PRE_PING=True kept',
    ),
    Strategy(
        "pgbouncer",
        "PgBouncer (transaction)",
        "main",
        True,
        "stock django.db.backends.postgresql (psycopg2) with CONN_MAX_AGE=None and "
        "DISABLE_SERVER_SIDE_CURSORS=True, to a local PgBouncer: pool_mode=transaction, "
        "default_pool_size=16, max_db_connections=16",
    ),
    Strategy(
        "pgpool",
        "django_pgpool",
        "main",
        True,
        'ENGINE "django_pgpool" with its defaults and OPTIONS = {"maxconn": 16}',
    ),
    Strategy(
        "pgpoollease",
        "django_pgpool, CONN_MAX_AGE=None",
        "main",
        True,
        'ENGINE "django_pgpool", OPTIONS = {"maxconn": 16} and CONN_MAX_AGE=None: each '
        "thread keeps its connection as a lease, revoked between requests for a waiter",
    ),
)

BY_KEY = {strategy.key: strategy for strategy in STRATEGIES}
#: The reference every ratio is computed against, within each round.
REFERENCE = "persistent"


def database_settings(key: str, maxconn: int | None = None) -> dict[str, Any]:
    """Return DATABASES["default"] for a strategy, from the environment the runner sets.

    PGHOST/PGPORT/PGUSER/PGPASSWORD name the server, BENCH_DATABASE the
    database, BENCH_PGBOUNCER_PORT PgBouncer's port, BENCH_MAXCONN the pool size.
    """
    env = os.environ
    if maxconn is None:
        maxconn = int(env.get("BENCH_MAXCONN") or DEFAULT_MAXCONN)
    settings: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env.get("BENCH_DATABASE") or DATABASE,
        "HOST": env["PGHOST"],
        "PORT": env["PGPORT"],
        "USER": env["PGUSER"],
        "PASSWORD": env["PGPASSWORD"],
        "CONN_MAX_AGE": 0,
        "OPTIONS": {},
    }
    if key == "nopool":
        pass
    elif key == "persistent":
        settings["CONN_MAX_AGE"] = None
    elif key == "djangopool":
        settings["OPTIONS"] = {"pool": {"min_size": 1, "max_size": maxconn}}
    elif key == "dbcp":
        settings["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
        settings["POOL_OPTIONS"] = {"POOL_SIZE": maxconn, "MAX_OVERFLOW": 0}
    elif key == "pgbouncer":
        settings["PORT"] = env["BENCH_PGBOUNCER_PORT"]
        settings["CONN_MAX_AGE"] = None
        settings["DISABLE_SERVER_SIDE_CURSORS"] = True
    elif key in ("pgpool", "pgpoollease"):
        settings["ENGINE"] = "django_pgpool"
        settings["OPTIONS"] = {"maxconn": maxconn}
        if key == "pgpoollease":
            settings["CONN_MAX_AGE"] = None
    else:
        raise ValueError(f"unknown strategy {key!r}; one of {', '.join(BY_KEY)}")
    return settings


def installed_apps(key: str) -> list[str]:
    """The apps of the in-process workload: the shop app (testproject's) and the ENGINE's."""
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
    if key in ("pgpool", "pgpoollease"):
        apps.append("django_pgpool")
    return apps
