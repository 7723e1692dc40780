"""OpenTelemetry metrics for the pools (needs opentelemetry-api: the ``opentelemetry`` extra).

The metrics of OpenTelemetry's semantic conventions for database client
connection pools (experimental), with the attribute
``db.client.connection.pool.name``::

    db.client.connection.count          {connection} UpDownCounter, by db.client.connection.state
                                                     (idle, used)
    db.client.connection.idle.max       {connection} UpDownCounter  maxconn (idle ones are kept
                                                                    up to maxconn)
    db.client.connection.idle.min       {connection} UpDownCounter  minconn
    db.client.connection.max            {connection} UpDownCounter  maxconn
    db.client.connection.pending_requests {request}  UpDownCounter  borrowers waiting
    db.client.connection.timeouts       {timeout}    Counter        borrows that timed out
    db.client.connection.create_time    s            Histogram      opening a new connection
    db.client.connection.wait_time      s            Histogram      getconn(), waiting included
    db.client.connection.use_time       s            Histogram      borrow to return

Enable it once per process, after configuring your MeterProvider::

    import django_pgpool.otel
    django_pgpool.otel.instrument()             # every pool Django's ENGINE creates
    django_pgpool.otel.instrument(pool)         # a ConnectionPool of your own

The counts are read from ``get_stats()`` at each collection (observable
instruments); the times are measured by ConnectionPool.observe() hooks,
installed only on instrumented pools, and recorded by the borrowing thread
outside the pool's lock. Nothing is measured for pools not instrumented.

Lock discipline: ``_lock`` guards ``_instruments`` (one set per
MeterProvider) and each ``_Instruments._pools``. No OpenTelemetry call is
made under a pool's lock (an SDK may hold its own lock while it calls the
observable callbacks, which take the pool's lock to read its stats).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

from . import __version__
from .pool import ConnectionPool
from .stats import WAIT_BUCKETS

if TYPE_CHECKING:
    from .registry import PoolEntry

__all__ = ["POOL_NAME", "STATE", "instrument", "uninstrument"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

_lock = threading.Lock()
_instruments: dict[int, _Instruments] = {}  # by id() of the MeterProvider (kept in the value)


class _Instruments:
    """The instruments of one MeterProvider, and the pools they report."""

    def __init__(self, provider: MeterProvider) -> None:
        self.provider = provider  # keeps the id() used as key alive
        self.stopped = False  # by uninstrument(); under _lock
        meter: Meter = provider.get_meter("django_pgpool", __version__)
        # Pool -> its attributes. Weak: a pool closed and dropped stops being reported.
        self._pools: weakref.WeakKeyDictionary[ConnectionPool, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        gauges = (
            ("db.client.connection.count", "{connection}", "Connections by state.", self._counts),
            (
                "db.client.connection.idle.max",
                "{connection}",
                "The maximum number of idle open connections allowed (maxconn).",
                self._figure("pool_max"),
            ),
            (
                "db.client.connection.idle.min",
                "{connection}",
                "The minimum number of idle open connections allowed (minconn).",
                self._figure("pool_min"),
            ),
            (
                "db.client.connection.max",
                "{connection}",
                "The maximum number of open connections allowed (maxconn).",
                self._figure("pool_max"),
            ),
            (
                "db.client.connection.pending_requests",
                "{request}",
                "The number of pending requests for an open connection.",
                self._figure("requests_waiting"),
            ),
        )
        for name, unit, description, callback in gauges:
            meter.create_observable_up_down_counter(
                name, callbacks=[callback], unit=unit, description=description
            )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self.times = {
            event: meter.create_histogram(
                name,
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
            )
            for event, name, description in (
                (
                    ConnectionPool.CREATE,
                    "db.client.connection.create_time",
                    "The time it took to create a new connection.",
                ),
                (
                    ConnectionPool.WAIT,
                    "db.client.connection.wait_time",
                    "The time it took to obtain an open connection from the pool.",
                ),
                (
                    ConnectionPool.USE,
                    "db.client.connection.use_time",
                    "The time between borrowing a connection and returning it to the pool.",
                ),
            )
        }

    def add(self, pool: ConnectionPool, name: str) -> None:
        """Report ``pool`` under ``name`` (once: a second call does nothing). Lock held."""
        if self.stopped or pool in self._pools:
            return
        self._pools[pool] = {POOL_NAME: name}
        pool.observe(self.observe)

    def pools(self) -> list[ConnectionPool]:
        """Return the pools reported. Lock held."""
        return list(self._pools)

    def clear(self) -> None:
        """Report no pool any more. Lock held."""
        self._pools.clear()

    def adopt_registry_pools(self) -> None:
        """Report the ENGINE's pools not reported yet (a registry.on_pool_created listener)."""
        from . import registry

        entries = registry.entries()
        with _lock:
            for entry in entries:
                self.add(entry.pool, _alias_name(entry))

    def observe(self, pool: ConnectionPool, event: str, seconds: float) -> None:
        # Read without _lock (a dict read is atomic): called at every borrow and return.
        attributes = self._pools.get(pool)
        if attributes is None:
            return
        if event == ConnectionPool.TIMEOUT:
            self.timeouts.add(1, attributes)
        else:
            self.times[event].record(seconds, attributes)

    def _stats(self) -> dict[str, dict[str, int]]:
        """Return the stats of the open pools, summed by name (e.g. one alias's pools
        before and after an override_settings)."""
        with _lock:
            pools = [(pool, attributes[POOL_NAME]) for pool, attributes in self._pools.items()]
        by_name: dict[str, dict[str, int]] = {}
        for pool, name in pools:
            if pool.closed:
                continue
            stats = pool.get_stats()  # takes the pool's lock; no OpenTelemetry lock held by us
            total = by_name.setdefault(name, dict.fromkeys(stats, 0))
            for key, value in stats.items():
                total[key] += value
        return by_name

    def _counts(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, stats in self._stats().items():
            yield Observation(stats["pool_available"], {POOL_NAME: name, STATE: "idle"})
            yield Observation(stats["pool_in_use"], {POOL_NAME: name, STATE: "used"})

    def _figure(self, key: str) -> _Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for name, stats in self._stats().items():
                yield Observation(stats[key], {POOL_NAME: name})

        return observe


if TYPE_CHECKING:
    from collections.abc import Callable

    _Callback = Callable[[CallbackOptions], Iterable[Observation]]


def instrument(
    *pools: ConnectionPool, meter_provider: MeterProvider | None = None, name: str | None = None
) -> None:
    """Report pools' metrics to ``meter_provider`` (default: the global one).

    Without ``pools``: every pool Django's ENGINE has created in this process
    and every one it creates later, named after the alias that created it
    (``default``). With pools: those, named ``name`` or their ``name``
    (``ConnectionPool(..., name="orders")``). Safe to call more than once.
    """
    provider = meter_provider or metrics.get_meter_provider()
    with _lock:
        instruments = _instruments.get(id(provider))
        if instruments is None:
            instruments = _instruments[id(provider)] = _Instruments(provider)
        for pool in pools:
            instruments.add(pool, name or pool.name)
    if not pools:
        _instrument_registry(instruments)


def uninstrument(meter_provider: MeterProvider | None = None) -> None:
    """Stop reporting to ``meter_provider`` (default: the global one): its pools
    are no longer observed, and the ENGINE's new pools no longer instrumented."""
    provider = meter_provider or metrics.get_meter_provider()
    with _lock:
        instruments = _instruments.pop(id(provider), None)
        if instruments is None:
            return
        instruments.stopped = True
        pools = list(instruments.pools())
        instruments.clear()
    for pool in pools:
        pool.unobserve(instruments.observe)


def _instrument_registry(instruments: _Instruments) -> None:
    """Instrument the ENGINE's pools, now and as they are created."""
    from . import registry  # imports Django: only for the ENGINE's pools

    # A bound method: registered once however often instrument() is called.
    registry.on_pool_created(instruments.adopt_registry_pools)
    instruments.adopt_registry_pools()


def _alias_name(entry: PoolEntry) -> str:
    """Name an ENGINE pool after its alias(es): ``default``, or ``default,replica``."""
    return ",".join(sorted(entry.aliases)) or entry.pool.name
