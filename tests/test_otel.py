"""OpenTelemetry metrics, read with the SDK's InMemoryMetricReader from real pools."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)

from django_pgpool import otel
from django_pgpool.errors import PoolTimeout
from django_pgpool.pool import ConnectionPool

MakePool = Callable[..., ConnectionPool]

NAME = otel.POOL_NAME


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.provider = provider  # type: ignore[attr-defined]
    yield reader
    otel.uninstrument(meter_provider=provider)
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    if data is None:  # nothing to report
        return {}
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def points(metric: Metric, **attributes: str) -> list[Any]:
    assert isinstance(metric.data, Sum | Gauge | Histogram)
    return [
        point
        for point in metric.data.data_points
        if all(point.attributes.get(k) == v for k, v in attributes.items())
    ]


def value(metrics: dict[str, Metric], name: str, **attributes: str) -> float:
    (point,) = points(metrics[name], **attributes)
    assert isinstance(point, NumberDataPoint)
    return point.value


def histogram(metrics: dict[str, Metric], name: str, pool: str) -> HistogramDataPoint:
    (point,) = points(metrics[name], **{NAME: pool})
    assert isinstance(point, HistogramDataPoint)
    return point


def provider_of(reader: InMemoryMetricReader) -> MeterProvider:
    provider: MeterProvider = reader.provider  # type: ignore[attr-defined]
    return provider


def test_counts_and_limits_follow_the_pool(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(1, 3, name="orders")
    otel.instrument(pool, meter_provider=provider_of(reader))
    held = [pool.getconn(), pool.getconn()]
    pool.putconn(held.pop())
    metrics = collect(reader)
    assert value(metrics, "db.client.connection.count", **{NAME: "orders", otel.STATE: "used"}) == 1
    assert value(metrics, "db.client.connection.count", **{NAME: "orders", otel.STATE: "idle"}) == 1
    assert value(metrics, "db.client.connection.max", **{NAME: "orders"}) == 3
    assert value(metrics, "db.client.connection.idle.max", **{NAME: "orders"}) == 3
    assert value(metrics, "db.client.connection.idle.min", **{NAME: "orders"}) == 1
    assert value(metrics, "db.client.connection.pending_requests", **{NAME: "orders"}) == 0
    for name in ("db.client.connection.count", "db.client.connection.max"):
        data = metrics[name].data
        assert isinstance(data, Sum)
        assert not data.is_monotonic  # an UpDownCounter, as the conventions say
    assert metrics["db.client.connection.count"].unit == "{connection}"
    assert metrics["db.client.connection.pending_requests"].unit == "{request}"
    pool.putconn(held.pop())
    metrics = collect(reader)
    assert value(metrics, "db.client.connection.count", **{NAME: "orders", otel.STATE: "used"}) == 0
    pool.check_invariants(quiescent=True)


def test_pending_requests_counts_borrowers_waiting(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(0, 1, name="busy", timeout=5)
    otel.instrument(pool, meter_provider=provider_of(reader))
    conn = pool.getconn()
    waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    waiter.start()
    deadline = time.monotonic() + 5
    while pool.get_stats()["requests_waiting"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics = collect(reader)
    assert value(metrics, "db.client.connection.pending_requests", **{NAME: "busy"}) == 1
    pool.putconn(conn)
    waiter.join()
    metrics = collect(reader)
    assert value(metrics, "db.client.connection.pending_requests", **{NAME: "busy"}) == 0
    pool.check_invariants(quiescent=True)


def test_create_wait_and_use_times_are_histograms_in_seconds(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(0, 2, name="timed")
    otel.instrument(pool, meter_provider=provider_of(reader))
    conn = pool.getconn()  # opens one: a create and a wait
    time.sleep(0.05)
    pool.putconn(conn)  # a use of at least 50 ms
    with pool.cursor() as cur:  # a second wait and use, no create
        cur.execute("SELECT 1")
    metrics = collect(reader)
    create = histogram(metrics, "db.client.connection.create_time", "timed")
    wait = histogram(metrics, "db.client.connection.wait_time", "timed")
    use = histogram(metrics, "db.client.connection.use_time", "timed")
    assert (create.count, wait.count, use.count) == (1, 2, 2)
    assert 0 < create.sum < 5
    assert wait.sum >= create.sum  # the first borrow waited for the connect
    assert 0.05 <= use.sum < 5
    assert list(use.explicit_bounds) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0]
    for name in ("create_time", "wait_time", "use_time"):
        assert metrics[f"db.client.connection.{name}"].unit == "s"
    pool.check_invariants(quiescent=True)


def test_timeouts_are_counted(make_pool: MakePool, reader: InMemoryMetricReader) -> None:
    pool = make_pool(0, 1, name="tight", timeout=0.1)
    otel.instrument(pool, meter_provider=provider_of(reader))
    conn = pool.getconn()
    for _ in range(2):
        with pytest.raises(PoolTimeout):
            pool.getconn()
    pool.putconn(conn)
    metrics = collect(reader)
    timeouts = metrics["db.client.connection.timeouts"]
    assert isinstance(timeouts.data, Sum) and timeouts.data.is_monotonic
    assert timeouts.unit == "{timeout}"
    assert value(metrics, "db.client.connection.timeouts", **{NAME: "tight"}) == 2
    # A timed-out borrow is not a wait_time observation: only the one served.
    assert histogram(metrics, "db.client.connection.wait_time", "tight").count == 1
    pool.check_invariants(quiescent=True)


def test_instrumenting_twice_reports_once(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(0, 1, name="twice")
    otel.instrument(pool, meter_provider=provider_of(reader))
    otel.instrument(pool, meter_provider=provider_of(reader))
    pool.putconn(pool.getconn())
    metrics = collect(reader)
    assert histogram(metrics, "db.client.connection.use_time", "twice").count == 1


def test_a_closed_pool_is_no_longer_reported(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(0, 1, name="gone")
    otel.instrument(pool, meter_provider=provider_of(reader))
    pool.closeall()
    metrics = collect(reader)
    if "db.client.connection.max" in metrics:
        assert points(metrics["db.client.connection.max"], **{NAME: "gone"}) == []


def test_an_observer_that_raises_never_breaks_a_borrow(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(0, 1)

    def broken(pool: ConnectionPool, event: str, seconds: float) -> None:
        raise RuntimeError("observer bug")

    pool.observe(broken)
    with caplog.at_level("ERROR", logger="django_pgpool"), pool.cursor() as cur:
        cur.execute("SELECT 1")
    assert "observer bug" in caplog.text
    pool.check_invariants(quiescent=True)
    assert pool.get_stats()["pool_in_use"] == 0


def test_uninstrument_stops_the_reports(make_pool: MakePool, reader: InMemoryMetricReader) -> None:
    pool = make_pool(0, 1, name="stopped")
    otel.instrument(pool, meter_provider=provider_of(reader))
    pool.putconn(pool.getconn())
    otel.uninstrument(meter_provider=provider_of(reader))
    pool.putconn(pool.getconn())
    metrics = collect(reader)
    # One use recorded before, none after; the pool no longer observed.
    assert histogram(metrics, "db.client.connection.use_time", "stopped").count == 1
    assert pool._observers == ()
    if "db.client.connection.max" in metrics:
        assert points(metrics["db.client.connection.max"], **{NAME: "stopped"}) == []
    pool.check_invariants(quiescent=True)


def test_an_unobserved_pool_has_its_plain_methods() -> None:
    pool = ConnectionPool(0, 1, dbname="unused")
    try:
        assert "getconn" not in vars(pool)
        assert "putconn" not in vars(pool)
    finally:
        pool.closeall()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_instrument_without_pools_covers_every_pool_the_engine_creates(
    reader: InMemoryMetricReader,
) -> None:
    from django.db import connections

    from django_pgpool import registry
    from tests.helpers import scalar

    scalar("SELECT 1")  # the default alias's pool exists before instrument()
    otel.instrument(meter_provider=provider_of(reader))
    try:
        check_engine_pools_are_reported(reader)
    finally:
        otel.uninstrument(meter_provider=provider_of(reader))
        for alias in ("default", "other"):
            connections[alias].close()
        registry.close_pools()  # the next ones are plain, as for the rest of the suite
    scalar("SELECT 1")
    assert "getconn" not in vars(connections["default"]._pgpool)


def check_engine_pools_are_reported(reader: InMemoryMetricReader) -> None:
    from django.db import connections

    from django_pgpool import registry
    from tests.helpers import scalar

    connections["other"].close()
    registry.close_pools(alias="other")  # and the other's is created after it
    scalar("SELECT 1", using="other")
    for alias in ("default", "other"):
        connections[alias].close()
    metrics = collect(reader)
    for alias in ("default", "other"):
        assert (
            value(metrics, "db.client.connection.count", **{NAME: alias, otel.STATE: "used"}) == 0
        )
        assert (
            value(metrics, "db.client.connection.count", **{NAME: alias, otel.STATE: "idle"}) >= 1
        )
    # The pool created after instrument() is timed from its first connection.
    assert histogram(metrics, "db.client.connection.create_time", "other").count >= 1
    assert histogram(metrics, "db.client.connection.use_time", "other").count >= 1
    for entry in registry.entries():
        entry.pool.check_invariants(quiescent=True)


def test_an_instrumented_pool_under_threads_keeps_its_invariants_and_counts_every_borrow(
    make_pool: MakePool, reader: InMemoryMetricReader
) -> None:
    pool = make_pool(0, 3, name="busy-threads", timeout=10)
    otel.instrument(pool, meter_provider=provider_of(reader))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                with pool.cursor() as cur:
                    cur.execute("SELECT 1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    collecting = True

    def collector() -> None:  # collections race the borrows: no deadlock, no error
        while collecting:
            collect(reader)

    side = threading.Thread(target=collector)
    side.start()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    collecting = False
    side.join()
    assert errors == []
    pool.check_invariants(quiescent=True)
    metrics = collect(reader)
    assert histogram(metrics, "db.client.connection.wait_time", "busy-threads").count == 200
    assert histogram(metrics, "db.client.connection.use_time", "busy-threads").count == 200
    created = histogram(metrics, "db.client.connection.create_time", "busy-threads").count
    assert created == pool.get_stats()["connections_num"] <= 3
