"""The pool's counters and the histogram of how long queued borrowers waited.

Key names are psycopg_pool's (``get_stats()``), plus a few of our own.

Lock discipline: a ``PoolStats`` belongs to one pool and is read and written
only under that pool's lock; it has no lock of its own.
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = [
    "COUNTER_KEYS",
    "GAUGE_KEYS",
    "STATS_KEYS",
    "WAIT_BUCKETS",
    "PoolStats",
]

REQUESTS_NUM = "requests_num"
REQUESTS_QUEUED = "requests_queued"
REQUESTS_WAIT_MS = "requests_wait_ms"
REQUESTS_ERRORS = "requests_errors"
REQUESTS_TIMEOUTS = "requests_timeouts"
USAGE_MS = "usage_ms"
RETURNS_BAD = "returns_bad"
RETURNS_RESET = "returns_reset"
CONNECTIONS_NUM = "connections_num"
CONNECTIONS_MS = "connections_ms"
CONNECTIONS_ERRORS = "connections_errors"
CONNECTIONS_LOST = "connections_lost"
CONNECTIONS_EXPIRED = "connections_expired"
CONNECTIONS_CLOSED = "connections_closed"
CONNECTIONS_RECLAIMED = "connections_reclaimed"
CONNECTIONS_LEAKED = "connections_leaked"
LEASES_REVOKED = "leases_revoked"

#: Every figure get_stats() returns, in display order: gauges, then counters.
GAUGE_KEYS = (
    "pool_min",
    "pool_max",
    "pool_size",
    "pool_available",
    "pool_in_use",
    # Of pool_in_use: kept by their borrower between requests (CONN_MAX_AGE),
    # which the pool takes back for a borrower that would otherwise wait.
    "pool_leased",
    "requests_waiting",
)
COUNTER_KEYS = (
    REQUESTS_NUM,
    REQUESTS_QUEUED,
    REQUESTS_WAIT_MS,
    REQUESTS_ERRORS,
    REQUESTS_TIMEOUTS,
    USAGE_MS,
    RETURNS_BAD,
    RETURNS_RESET,
    CONNECTIONS_NUM,
    CONNECTIONS_MS,
    CONNECTIONS_ERRORS,
    CONNECTIONS_LOST,
    CONNECTIONS_EXPIRED,
    CONNECTIONS_CLOSED,
    CONNECTIONS_RECLAIMED,
    CONNECTIONS_LEAKED,
    LEASES_REVOKED,
)
STATS_KEYS = GAUGE_KEYS + COUNTER_KEYS

#: Upper bounds (seconds) of the wait-time buckets of queued borrowers.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


class PoolStats(Counter[str]):
    """The counters (a Counter by key) and the wait histogram, cleared together."""

    def __init__(self) -> None:
        super().__init__()
        # Counts per WAIT_BUCKETS upper bound (the last one is +Inf). Borrowers
        # served at once are not counted here, only queued ones.
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)

    def record_wait(self, waited: float) -> None:
        """Count one queued borrow that waited ``waited`` seconds (served or given up)."""
        self[REQUESTS_WAIT_MS] += int(waited * 1000)
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS, waited)] += 1

    def counters(self) -> dict[str, int]:
        return {key: self[key] for key in COUNTER_KEYS}

    def clear(self) -> None:
        """Reset the counters and the histogram: a histogram kept alone would
        report waits with no requests behind them."""
        super().clear()
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)
