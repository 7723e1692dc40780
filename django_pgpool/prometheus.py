"""Prometheus metrics for the pools, named in HikariCP's style (needs prometheus_client).

Register once, e.g. in a ``ready()`` or your metrics view module:

    from django_pgpool.prometheus import register
    register()

In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set,
gunicorn and the like) the collector reports every live process on this host
from the status snapshots (labelled by ``pid``), so whichever worker answers
the scrape shows them all; otherwise it reports this process's pools.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import status
from .pool import WAIT_BUCKETS

__all__ = ["PoolCollector", "register"]

LABELS = ["alias", "database", "pid"]


class PoolCollector(Collector):
    """Collect the figures of the pools of this process, or of every process."""

    def _snapshots(self) -> list[dict[str, Any]]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return status.read_snapshots()
        return [status.snapshot()]

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "pgpool_connections",
            "Connections by state: active (in use), leased (kept by a thread between "
            "requests, CONN_MAX_AGE), idle, pending (borrowers waiting).",
            labels=[*LABELS, "state"],
        )
        total = GaugeMetricFamily(
            "pgpool_connections_total_open", "Open connections.", labels=LABELS
        )
        maximum = GaugeMetricFamily("pgpool_connections_max", "maxconn.", labels=LABELS)
        minimum = GaugeMetricFamily("pgpool_connections_min", "minconn.", labels=LABELS)
        timeouts = CounterMetricFamily(
            "pgpool_connections_timeout", "Borrowers that timed out.", labels=LABELS
        )
        created = CounterMetricFamily(
            "pgpool_connections_created", "Connections opened.", labels=LABELS
        )
        lost = CounterMetricFamily(
            "pgpool_connections_lost", "Connections found dead.", labels=LABELS
        )
        acquire = HistogramMetricFamily(
            "pgpool_connections_acquire_seconds",
            "Time borrowers waited for a connection.",
            labels=LABELS,
        )
        for snapshot in self._snapshots():
            pid = str(snapshot["pid"])
            for pool in snapshot["pools"]:
                labels = [",".join(pool["aliases"]), pool["database"].get("dbname", ""), pid]
                leased = pool.get("pool_leased", 0)  # absent from older processes' status
                connections.add_metric([*labels, "active"], pool["pool_in_use"] - leased)
                connections.add_metric([*labels, "leased"], leased)
                connections.add_metric([*labels, "idle"], pool["pool_available"])
                connections.add_metric([*labels, "pending"], pool["requests_waiting"])
                total.add_metric(labels, pool["pool_size"])
                maximum.add_metric(labels, pool["pool_max"])
                minimum.add_metric(labels, pool["pool_min"])
                timeouts.add_metric(labels, pool["requests_timeouts"])
                created.add_metric(labels, pool["connections_num"])
                lost.add_metric(labels, pool["connections_lost"])
                acquire.add_metric(labels, *_histogram(pool))
        yield from (connections, total, maximum, minimum, timeouts, created, lost, acquire)


def _histogram(pool: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Return cumulative buckets and the sum of waits; immediate borrows count as 0 s."""
    counts = list(pool["wait_buckets"])
    counts[0] += pool["requests_num"] - pool["requests_queued"]
    buckets, running = [], 0
    for bound, count in zip([*map(str, WAIT_BUCKETS), "+Inf"], counts, strict=True):
        running += count
        buckets.append((bound, float(running)))
    return buckets, pool["requests_wait_ms"] / 1000


def register(registry: CollectorRegistry = REGISTRY) -> PoolCollector:
    """Register the pool collector with ``registry`` (the default one unless given)."""
    collector = PoolCollector()
    registry.register(collector)
    return collector
