"""One measurement of one strategy, in a process of its own; prints one JSON line.

    python benchmarks/worker.py inprocess --strategy pgpool --threads 8 --requests 200
    python benchmarks/worker.py django-micro --strategy pgpool
    python benchmarks/worker.py pool-micro --strategy pgpool

Run by benchmarks/run.py, with the interpreter of the strategy's virtual
environment (psycopg 3 for Django's own pool) and the environment it sets:
PGHOST/PGPORT/PGUSER/PGPASSWORD, BENCH_DATABASE, BENCH_PGBOUNCER_PORT.

inprocess: T threads each send Django's request_started signal, read one
product by primary key through the ORM, update one in atomic() and send
request_finished, R times, after a warm-up; every thread starts its measured
requests at the same instant (a barrier).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# The repository root (django_pgpool and tests.tcpproxy from the checkout, in
# every venv), testproject/ (the shop app) and this directory.
for _path in (BENCH_DIR, REPO_ROOT / "testproject", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import strategies  # noqa: E402
from strategies import PRODUCTS  # noqa: E402

# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #


def start_counting_proxy(host: str, port: int) -> Any:
    """Start tests.tcpproxy.TcpProxy in front of ``host:port``, counting every round trip.

    The proxy counts simple-query ('Q') messages; psycopg 3 may use the
    extended protocol, whose round trips end with a Sync ('S') message, so
    those are counted too (as "<sync>").
    """
    import struct

    from tests import tcpproxy

    class RoundTripCounter(tcpproxy._QueryCounter):  # type: ignore[misc]
        syncs = 0

        def feed(self, data: bytes) -> None:
            # Count the complete Sync messages before the base parser consumes
            # them (it keeps only an incomplete message in its buffer).
            if self.typed:
                pending, offset = self.buffer + data, 0
                while len(pending) - offset >= 5:
                    (length,) = struct.unpack("!i", pending[offset + 1 : offset + 5])
                    if len(pending) - offset < 1 + length:
                        break
                    if pending[offset : offset + 1] == b"S":
                        self.syncs += 1
                    offset += 1 + length
            super().feed(data)

    # Looked up by the proxy when it accepts a connection.
    tcpproxy._QueryCounter = RoundTripCounter
    return tcpproxy.TcpProxy(host, port)


def statement_kind(sql: str) -> str:
    words = sql.lstrip().split(None, 1)
    return words[0].upper() if words else "<empty>"


# --------------------------------------------------------------------------- #
# Django
# --------------------------------------------------------------------------- #


def setup_django(key: str, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Configure Django for one strategy (optionally through a proxy at host:port)."""
    import django
    from django.conf import settings

    database = strategies.database_settings(key)
    if host is not None and port is not None:
        database["HOST"], database["PORT"] = host, str(port)
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        SECRET_KEY="benchmark",
        INSTALLED_APPS=strategies.installed_apps(key),
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()
    return database


def versions(key: str) -> dict[str, str]:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    found = {
        "python": platform.python_version(),
        "django": metadata.version("django"),
        "driver": "psycopg " + metadata.version("psycopg")
        if is_psycopg3
        else "psycopg2 " + metadata.version("psycopg2-binary"),
    }
    for package in ("psycopg-pool", "django-db-connection-pool", "SQLAlchemy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    if key in ("pgpool", "pgpoollease"):
        import django_pgpool

        found["django-pgpool"] = django_pgpool.__version__
    return found


class BenchHandler:
    """The sender of the request signals (Django's handlers send their own class)."""


def error_kind(exc: BaseException) -> str:
    """The class and the first line of the message, numbers blanked, so like errors group."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', first)[:80]}"


def percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    proxy = None
    if args.count_round_trips:
        database = strategies.database_settings(args.strategy)
        proxy = start_counting_proxy(database["HOST"], int(database["PORT"]))
        setup_django(args.strategy, "127.0.0.1", proxy.port)
    else:
        setup_django(args.strategy)

    from django.core.signals import request_finished, request_started
    from django.db import transaction
    from django.db.models import F
    from shop.models import Product

    def one_request(pk: int) -> None:
        request_started.send(sender=BenchHandler)
        try:
            Product.objects.get(pk=pk)
            with transaction.atomic():
                Product.objects.filter(pk=pk).update(stock=F("stock") + 1)
        finally:
            request_finished.send(sender=BenchHandler)

    threads = args.threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    ends: list[list[float]] = [[] for _ in range(threads)]
    errors: list[Counter[str]] = [Counter() for _ in range(threads)]
    warmup_errors: Counter[str] = Counter()
    counted: dict[str, Any] = {}

    def start_measuring() -> None:
        # Runs once, before any thread is released from the barrier.
        counted["started"] = time.perf_counter()
        counted["cpu_started"] = time.process_time()
        if proxy is not None:
            counted["connections_before"] = proxy.connections
            proxy.reset_counts()
            for counter in proxy._counters:
                counter.syncs = 0

    barrier = threading.Barrier(threads, action=start_measuring)

    def body(index: int) -> None:
        rng = random.Random(index)
        for _ in range(args.warmup):
            try:
                one_request(rng.randint(1, PRODUCTS))
            except Exception as exc:
                warmup_errors[error_kind(exc)] += 1
        barrier.wait()
        my_latencies, my_ends, my_errors = latencies[index], ends[index], errors[index]
        for _ in range(args.requests):
            pk = rng.randint(1, PRODUCTS)
            began = time.perf_counter()
            try:
                one_request(pk)
            except Exception as exc:
                my_errors[error_kind(exc)] += 1
            finished = time.perf_counter()
            my_latencies.append(finished - began)
            my_ends.append(finished)

    workers = [threading.Thread(target=body, args=(i,), name=f"bench-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    cpu_seconds = time.process_time() - counted["cpu_started"]
    started = counted["started"]
    finished = max(e[-1] for e in ends)
    total = threads * args.requests
    error_counts: Counter[str] = sum(errors, Counter())
    failed = sum(error_counts.values())
    ordered = sorted(x for thread in latencies for x in thread)
    # Fairness: requests each thread completed while all of them were running
    # (until the first one finished); a starved thread shows up here even
    # though every thread completes its R requests in the end.
    common_end = min(e[-1] for e in ends)
    served = [sum(1 for t in e if t <= common_end) for e in ends]
    mean_served = statistics.fmean(served)
    result: dict[str, Any] = {
        "mode": "inprocess",
        "strategy": args.strategy,
        "threads": threads,
        "requests_per_thread": args.requests,
        "requests": total,
        "seconds": finished - started,
        "rps": (total - failed) / (finished - started),
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "least_served_share": min(served) / mean_served if mean_served else 0.0,
        # This process's CPU time (all threads, user + system) per request:
        # less sensitive to the other tenants of a shared machine than req/s.
        "cpu_us_per_request": cpu_seconds / total * 1e6,
        "errors": dict(error_counts),
        "warmup_errors": dict(warmup_errors),
        "versions": versions(args.strategy),
    }
    if proxy is not None:
        queries = proxy.queries
        syncs = sum(getattr(c, "syncs", 0) for c in proxy._counters)
        kinds = Counter(statement_kind(q) for q in queries)
        if syncs:
            kinds["<sync>"] = syncs
        result["round_trips_per_request"] = (len(queries) + syncs) / total
        result["statements_per_request"] = {k: n / total for k, n in sorted(kinds.items())}
        result["connections_per_request"] = (
            proxy.connections - counted["connections_before"]
        ) / total
    return result


# --------------------------------------------------------------------------- #
# Microbenchmarks
# --------------------------------------------------------------------------- #


def per_operation(operation: Callable[[], None], batches: int, batch_seconds: float) -> list[float]:
    """Seconds per call of ``operation``: the median of individually timed calls, per batch.

    The batch size is calibrated so each batch lasts about ``batch_seconds``.
    Each call is timed on its own, so a call that the scheduler interrupts
    (this machine's cores are shared with other tenants) is an outlier that
    the median ignores, not a share of every batch's mean. The clock's own
    cost (two ``perf_counter_ns()`` calls, about 0.1 µs) is included.
    """
    size = 1
    while True:
        began = time.perf_counter()
        for _ in range(size):
            operation()
        took = time.perf_counter() - began
        if took >= batch_seconds / 4 or size >= 1 << 20:
            break
        size *= 4
    size = max(1, round(size * batch_seconds / max(took, 1e-9)))
    clock = time.perf_counter_ns
    figures = []
    for _ in range(batches):
        calls = []
        for _ in range(size):
            began_ns = clock()
            operation()
            calls.append(clock() - began_ns)
        figures.append(statistics.median(calls) / 1e9)
    return figures


def summary_us(figures: list[float]) -> dict[str, float]:
    ordered = sorted(figures)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "min_us": ordered[0] * 1e6,
        "max_us": ordered[-1] * 1e6,
        "batches": len(ordered),
    }


def run_django_micro(args: argparse.Namespace) -> dict[str, Any]:
    """Django-level borrow + return (or connect + close), and an empty request cycle."""
    setup_django(args.strategy)
    from django.core.signals import request_finished, request_started
    from django.db import connection

    def ensure_and_close() -> None:
        connection.ensure_connection()
        connection.close()

    def request_cycle() -> None:
        request_started.send(sender=BenchHandler)
        connection.ensure_connection()
        request_finished.send(sender=BenchHandler)

    ensure_and_close()  # opens the pool (and its first connection)
    return {
        "mode": "django-micro",
        "strategy": args.strategy,
        "ensure_connection_close": summary_us(per_operation(ensure_and_close, args.batches, 0.1)),
        "request_cycle": summary_us(per_operation(request_cycle, args.batches, 0.1)),
        "versions": versions(args.strategy),
    }


def run_pool_micro(args: argparse.Namespace) -> dict[str, Any]:
    """The pool library alone: borrow + return with no query, and a new connection."""
    env = os.environ
    database = env.get("BENCH_DATABASE") or strategies.DATABASE
    kwargs: dict[str, Any] = {
        "host": env["PGHOST"],
        "port": int(env["PGPORT"]),
        "user": env["PGUSER"],
        "password": env["PGPASSWORD"],
        "dbname": database,
    }
    measured: dict[str, Any] = {}
    if args.strategy == "pgpool":
        import psycopg2

        from django_pgpool.pool import ConnectionPool

        pool = ConnectionPool(1, 16, **kwargs)
        checked = ConnectionPool(1, 16, check_after=0, **kwargs)

        def borrow_return() -> None:
            pool.putconn(pool.getconn())

        def borrow_return_checked() -> None:
            checked.putconn(checked.getconn())

        def new_connection() -> None:
            psycopg2.connect(**kwargs).close()

        library = "django_pgpool.pool.ConnectionPool (defaults, maxconn=16)"
        checked_label = "check_after=0: SELECT 1 at every borrow"
        cleanup: Callable[[], object] = lambda: (pool.closeall(), checked.closeall())  # noqa: E731
    elif args.strategy == "djangopool":
        import psycopg
        import psycopg_pool

        pool = psycopg_pool.ConnectionPool(
            kwargs={**kwargs, "autocommit": True}, min_size=1, max_size=16, open=True
        )
        checked = psycopg_pool.ConnectionPool(
            kwargs={**kwargs, "autocommit": True},
            min_size=1,
            max_size=16,
            open=True,
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        pool.wait()
        checked.wait()

        def borrow_return() -> None:
            pool.putconn(pool.getconn())

        def borrow_return_checked() -> None:
            checked.putconn(checked.getconn())

        def new_connection() -> None:
            psycopg.connect(**kwargs).close()

        library = "psycopg_pool.ConnectionPool (min_size=1, max_size=16)"
        checked_label = "check=check_connection (Django's CONN_HEALTH_CHECKS=True)"
        cleanup = lambda: (pool.close(), checked.close())  # noqa: E731
    elif args.strategy == "dbcp":
        import psycopg2
        from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
        from sqlalchemy.pool import QueuePool

        def creator() -> Any:
            return psycopg2.connect(**kwargs)

        # The dialect pings and resets, as django-db-connection-pool's pools do.
        dialect = PGDialect_psycopg2(dbapi=psycopg2)
        pool = QueuePool(creator, pool_size=16, max_overflow=0, dialect=dialect)
        checked = QueuePool(creator, pool_size=16, max_overflow=0, pre_ping=True, dialect=dialect)

        def borrow_return() -> None:
            pool.connect().close()

        def borrow_return_checked() -> None:
            checked.connect().close()

        def new_connection() -> None:
            psycopg2.connect(**kwargs).close()

        library = "sqlalchemy.pool.QueuePool (pool_size=16, max_overflow=0, pre_ping=False)"
        checked_label = "pre_ping=True (django-db-connection-pool's default)"
        cleanup = lambda: (pool.dispose(), checked.dispose())  # noqa: E731
    else:
        raise SystemExit(f"pool-micro has no pool library for {args.strategy!r}")

    borrow_return()
    borrow_return_checked()
    measured["borrow_return"] = summary_us(per_operation(borrow_return, args.batches, 0.05))
    measured["borrow_return_checked"] = summary_us(
        per_operation(borrow_return_checked, args.batches, 0.05)
    )
    measured["new_connection"] = summary_us(per_operation(new_connection, args.batches, 0.05))
    cleanup()
    return {
        "mode": "pool-micro",
        "strategy": args.strategy,
        "library": library,
        "checked_label": checked_label,
        **measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("inprocess", "django-micro", "pool-micro"))
    parser.add_argument("--strategy", required=True, choices=list(strategies.BY_KEY))
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per thread")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per thread")
    parser.add_argument("--batches", type=int, default=15, help="microbenchmark batches")
    parser.add_argument("--count-round-trips", action="store_true")
    args = parser.parse_args(argv)
    runner = {
        "inprocess": run_inprocess,
        "django-micro": run_django_micro,
        "pool-micro": run_pool_micro,
    }[args.mode]
    result = runner(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
