"""The seeds' measurement, redone: 1,000 ``SELECT 1``, reconnecting each time vs pooled.

    python benchmarks/seeds.py                        # the server of the PG* variables
    python benchmarks/seeds.py --dsn "host=... dbname=..." --queries 1000 --rounds 5

The 2008 post this project grew from measured 18.2 s reconnecting and 0.68 s
with a pool (27x). Four ways, each ``--rounds`` times, interleaved; the
median round of each is reported, with the ratio to reconnecting:

* reconnect: ``psycopg2.connect()``, one query, ``close()``, every time;
* psycopg2 pool: ``SimpleConnectionPool`` with ``getconn()``/``putconn()``;
* ConnectionPool: ``getconn()``/``putconn()`` (health checks and reset at return);
* ConnectionPool.cursor(): ``with pool.cursor() as cur``, a transaction each
  (so one more round trip, the COMMIT).

Each query runs in a transaction as psycopg2 opens it (BEGIN, SELECT; the
pools then roll it back or reset it), as the seeds' code did.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import psycopg2.pool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from django_pgpool.pool import ConnectionPool  # noqa: E402

SEED_RECONNECT_S = 18.2
SEED_POOLED_S = 0.68


def reconnecting(dsn: str, queries: int) -> float:
    started = time.perf_counter()
    for _ in range(queries):
        conn = psycopg2.connect(dsn)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchone()
        conn.close()
    return time.perf_counter() - started


def psycopg2_pool(dsn: str, queries: int) -> float:
    pool = psycopg2.pool.SimpleConnectionPool(1, 1, dsn)
    try:
        started = time.perf_counter()
        for _ in range(queries):
            conn = pool.getconn()
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchone()
            pool.putconn(conn)
        return time.perf_counter() - started
    finally:
        pool.closeall()


def our_pool(dsn: str, queries: int) -> float:
    with ConnectionPool(1, 1, dsn) as pool:
        pool.putconn(pool.getconn())  # opened before the clock starts, as psycopg2's
        started = time.perf_counter()
        for _ in range(queries):
            conn = pool.getconn()
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchone()
            pool.putconn(conn)
        return time.perf_counter() - started


def our_pool_cursor(dsn: str, queries: int) -> float:
    with ConnectionPool(1, 1, dsn) as pool:
        pool.putconn(pool.getconn())
        started = time.perf_counter()
        for _ in range(queries):
            with pool.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        return time.perf_counter() - started


WAYS: dict[str, Callable[[str, int], float]] = {
    "reconnect (psycopg2.connect each time)": reconnecting,
    "psycopg2 SimpleConnectionPool": psycopg2_pool,
    "ConnectionPool getconn/putconn": our_pool,
    "ConnectionPool.cursor() (with COMMIT)": our_pool_cursor,
}


def server_version(dsn: str) -> str:
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SHOW server_version")
        row = cur.fetchone()
        return str(row[0]) if row else "?"
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dsn", default="", help="libpq connection string (default: PG* env)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    dsn: str = args.dsn
    where = dsn or f"host={os.environ.get('PGHOST', '(libpq default)')} port=" + os.environ.get(
        "PGPORT", "5432"
    )
    print(f"server: PostgreSQL {server_version(dsn)} at {where}")
    print(
        f"client: Python {platform.python_version()}, psycopg2 "
        f"{psycopg2.__version__.split()[0]}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{args.queries} x SELECT 1, median of {args.rounds} rounds (interleaved)\n")
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            times[name].append(way(dsn, args.queries))

    baseline = statistics.median(next(iter(times.values())))
    width = max(map(len, WAYS))
    print(f"{'':{width}}  {'total':>9}  {'per query':>10}  {'vs reconnect':>12}")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(
            f"{name:{width}}  {median:8.3f}s  {median / args.queries * 1000:8.3f}ms"
            f"  {baseline / median:11.1f}x"
        )
    print(
        f"\n2008 post: {SEED_RECONNECT_S} s reconnecting, {SEED_POOLED_S} s pooled "
        f"({SEED_RECONNECT_S / SEED_POOLED_S:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
