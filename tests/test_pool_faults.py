"""Faults injected at every point of borrow, return, hand-off and maintenance.

A signal handler's exception (Celery's soft time limit, a SIGALRM timeout,
KeyboardInterrupt) can come between any two bytecodes of the main thread, and
any code can fail. Here a trace function raises ``Injected`` (a
BaseException, so no ``except Exception`` stops it) at a chosen line of the
pool's own code (``pool.py`` and the reset in ``session.py``; not where
CPython never runs a signal handler, see ``_with_exits()``), in every
thread that takes part: borrowers, returners, the thread that hands a
connection to a waiter, maintenance rounds and refill threads.

After every run the pool must heal: its invariants hold once nothing is in
progress (``check_invariants(quiescent=True)``, after one maintenance round
that takes back what an interrupted cleanup left behind, as it does after
ABANDONED_AFTER in production), every one of its ``maxconn`` slots
can be borrowed at once, no connection was ever lent to two borrowers at
once, no borrower ever got a broken connection or another's session state,
and the server has no session of the pool's beyond the ones it counts.

* ``test_a_fault_at_any_single_point_leaves_the_pool_whole``: a fixed
  scenario (borrow, queue, hand-off, dirty and clean returns, health check,
  reconnect, maintenance with refill) run once per distinct line of pool
  code it reaches, with one fault at that line's first execution.
* ``test_concurrent_borrowers_under_random_faults_never_share_a_connection``:
  four borrower threads and a maintenance thread on three connections,
  driven by seeded random choices, a fault in about a third of their
  operations, at a random line of it.
"""

from __future__ import annotations

import dis
import functools
import gc
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import CodeType, FrameType
from typing import Any

import psycopg2
import pytest

from django_pgpool import pool as pool_module
from django_pgpool import session as session_module
from django_pgpool.errors import PoolError
from django_pgpool.pool import ConnectionPool
from tests.helpers import server_connections, wait_for
from tests.settings import SERVER

POOL_FILE = pool_module.__file__
RESET_CODE = session_module.reset_session.__code__
DIRTY_WORK_MEM = "64MB"  # what a borrower SETs; never seen by the next one


class Injected(BaseException):
    """The injected fault."""


def _targeted(frame: FrameType) -> bool:
    code = frame.f_code
    return code.co_filename == POOL_FILE or code is RESET_CODE


@functools.cache
def _with_exits(code: CodeType) -> frozenset[int]:
    """Return the offsets of the instructions that leave a ``with`` block.

    A line event fires there (the ``with`` line again) before the lock's
    ``__exit__`` is called, but a real signal's exception cannot come
    there: CPython runs signal handlers only at its eval-breaker checks
    (function entry, backward jumps, after calls), none of which lies
    between a with block's last statement and its ``__exit__``. Faults
    injected there would leak the lock, which no real signal can.
    """
    instructions = list(dis.get_instructions(code))
    entries = {
        ins.positions.lineno: ins.offset
        for ins in instructions
        if ins.opname == "BEFORE_WITH" and ins.positions is not None
    }
    return frozenset(
        ins.offset
        for ins in instructions
        if ins.positions is not None
        and ins.positions.lineno in entries
        and ins.offset > entries[ins.positions.lineno]
    )


class Injector:
    """Raise Injected at a chosen line event of the pool's code, once per armed operation.

    Each thread arms it for one operation with ``arm(n)``: the n-th line of
    pool code that thread executes raises, then nothing more until it is
    armed again (one interruption per operation: the cleanup of a fault is
    not itself faulted). ``points`` collects every (function, line) seen.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.lock = threading.Lock()
        self.points: set[tuple[str, int]] = set()
        self.fired: list[tuple[str, int]] = []
        self.target: tuple[str, int] | None = None  # fire at this point's first execution
        # Arms a thread that nobody armed (a refill thread) when it first runs pool code.
        self.auto_arm: Callable[[], int | None] = lambda: None

    def arm(self, countdown: int | None) -> None:
        self._local.countdown = countdown

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._line if _targeted(frame) else None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "line" or frame.f_lasti in _with_exits(frame.f_code):
            return self._line
        point = (frame.f_code.co_name, frame.f_lineno)
        with self.lock:
            self.points.add(point)
        if not hasattr(self._local, "countdown"):
            refill = threading.current_thread().name == "django_pgpool-refill"
            self._local.countdown = self.auto_arm() if refill else None
        countdown = self._local.countdown
        if self.target is not None:
            if point == self.target:
                self.target = None
                self._fire(point)
        elif countdown is not None:
            countdown -= 1
            self._local.countdown = countdown
            if countdown <= 0:
                self._local.countdown = None
                self._fire(point)
        return self._line

    def _fire(self, point: tuple[str, int]) -> None:
        with self.lock:
            self.fired.append(point)
        raise Injected(f"at {point[0]}:{point[1]}")

    def resume(self) -> None:
        """Trace this thread again: Python stops tracing a thread whose trace function raised."""
        sys.settrace(self._global)

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Trace this thread, and every thread started meanwhile (refills among them)."""
        threading.settrace(self._global)
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]


class Lending:
    """Who holds which connection, as the borrowers see it: never two at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[int, str] = {}
        self.problems: list[str] = []
        self.loans = 0

    def lent(self, conn: Any) -> None:
        me = threading.current_thread().name
        with self._lock:
            other = self._holders.setdefault(id(conn), me)
            if other != me:
                self.problems.append(f"lent to {me} while {other} holds it")
            self.loans += 1

    def returning(self, conn: Any) -> None:
        with self._lock:
            self._holders.pop(id(conn), None)


@pytest.fixture
def quiet_thread_faults() -> Iterator[None]:
    """A refill thread that the injector kills is expected: don't report it."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.exc_value, Injected):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def check_session(conn: Any) -> None:
    """The connection works and carries no earlier borrower's state."""
    with conn.cursor() as cur:
        cur.execute("SHOW work_mem")
        assert cur.fetchone()[0] != DIRTY_WORK_MEM, "an earlier borrower's SET leaked"
    conn.rollback()


def quiesce_and_check(pool: ConnectionPool, app: str, admin: Any) -> None:
    """Let the pool heal, then check that it is whole."""
    wait_for(
        lambda: not any(t.name == "django_pgpool-refill" for t in threading.enumerate()),
        what="refill threads done",
    )
    pool.abandoned_after = 0.0  # nothing is in progress: every reservation left is abandoned
    pool.maintain()
    wait_for(
        lambda: not any(t.name == "django_pgpool-refill" for t in threading.enumerate()),
        what="refill threads done",
    )
    pool.check_invariants(quiescent=True)
    # Every slot can be had at once, by distinct, healthy, clean connections.
    held = []
    for _ in range(pool.maxconn):
        conn = pool.getconn()
        assert all(conn is not other for other in held)
        check_session(conn)
        held.append(conn)
    for conn in held:
        pool.putconn(conn)
    pool.check_invariants(quiescent=True)
    # No session of the pool's on the server beyond the ones it counts
    # (connections dropped half-way are closed when collected).
    gc.collect()
    size = pool.get_stats()["pool_size"]
    wait_for(lambda: server_connections(admin, app) <= size, what="no stray server session")


def new_pool(app: str, **options: Any) -> ConnectionPool:
    return ConnectionPool(
        options.pop("minconn", 1),
        options.pop("maxconn", 2),
        application_name=app,
        **{"timeout": 0.25, "check_after": 0, **options},
        **SERVER.connect_kwargs(),
    )


# -- one fault, at every point a fixed scenario reaches ----------------------------


def scenario(pool: ConnectionPool, lending: Lending, injector: Injector) -> None:
    """Borrow, queue, hand off, reset, check, reconnect, maintain: the main thread's part
    traced; one waiter thread (untraced) queues behind it."""
    held: list[Any] = []

    def borrow() -> None:
        conn = pool.getconn()
        lending.lent(conn)
        check_session(conn)
        held.append(conn)

    def give_back(dirty: bool = False) -> None:
        conn = held.pop()
        if dirty:
            with conn.cursor() as cur:
                cur.execute(f"SET work_mem = '{DIRTY_WORK_MEM}'")
        lending.returning(conn)
        pool.putconn(conn)

    def waiter() -> None:
        try:
            conn = pool.getconn()
        except PoolError:
            return  # its hand-off was interrupted: it timed out, as it should
        lending.lent(conn)
        check_session(conn)
        lending.returning(conn)
        pool.putconn(conn)

    def step(operation: Callable[[], None]) -> None:
        # A borrow may time out after a fault: slots left behind by a fault
        # in a cleanup path come back after ABANDONED_AFTER (checked below).
        with suppress(Injected, PoolError), injector.tracing():
            operation()
        # Whatever was interrupted, what another thread can see is consistent.
        pool.check_invariants()

    step(borrow)
    step(borrow)
    other = threading.Thread(target=waiter, name="waiter")
    other.start()
    if len(held) == 2:  # else a borrow above was interrupted: the waiter needn't queue
        with suppress(AssertionError):
            wait_for(lambda: pool.get_stats()["requests_waiting"] == 1, timeout=1.0)
    while held:
        step(lambda: give_back(dirty=len(held) == 2))  # the first one goes to the waiter
    other.join(5)
    assert not other.is_alive()
    step(borrow)  # from idle, through the health check (check_after=0)
    while held:
        step(give_back)
    step(pool.reconnect)
    step(pool.maintain)  # closes the retired idle connections, refills to minconn
    step(borrow)
    while held:
        step(give_back)
    step(pool.getconn)  # and dropped: nobody can return it
    step(pool.maintain)  # takes it back

    def lease_and_revoke() -> None:
        # The pool is full; the first connection goes between requests (a
        # lease) and a third borrow takes it over: revoked, reset, handed on.
        conn, loan = held[0], held[0].loan
        if pool.lease_idle(conn, loan):
            held.pop(0)
            lending.returning(conn)
            borrow()
            assert not pool.lease_claim(conn, loan), "a revoked lease was claimed back"

    step(borrow)
    step(borrow)
    if len(held) == 2:
        step(lease_and_revoke)
    while held:
        step(give_back)


@pytest.mark.usefixtures("quiet_thread_faults")
def test_a_fault_at_any_single_point_leaves_the_pool_whole(admin: Any) -> None:
    started = time.monotonic()
    # A run without faults finds the points the scenario reaches.
    survey = Injector()
    app = "pgpool-faults-survey"
    pool = new_pool(app)
    lending = Lending()
    try:
        scenario(pool, lending, survey)
        quiesce_and_check(pool, app, admin)
    finally:
        pool.closeall()
    points = sorted(survey.points)
    assert len(points) > 100, "the survey reached too little of the pool's code"

    missed: list[tuple[str, int]] = []
    for number, point in enumerate(points):
        injector = Injector()
        injector.target = point
        app = f"pgpool-faults-{number}"
        pool = new_pool(app)
        lending = Lending()
        try:
            scenario(pool, lending, injector)
            if not injector.fired:
                missed.append(point)  # reached only in the survey's timing
            quiesce_and_check(pool, app, admin)
            assert not lending.problems, lending.problems
        except BaseException as exc:
            raise AssertionError(f"fault at {point[0]}:{point[1]}: {exc!r}") from exc
        finally:
            pool.closeall()
    elapsed = time.monotonic() - started
    print(
        f"\nsingle faults: {len(points)} points of pool code, "
        f"{len(points) - len(missed)} faulted, {elapsed:.1f} s"
    )
    assert len(missed) < len(points) // 10, missed


# -- random faults, concurrent threads ------------------------------------------------


@pytest.mark.usefixtures("quiet_thread_faults")
def test_concurrent_borrowers_under_random_faults_never_share_a_connection(admin: Any) -> None:
    seed = 20261204
    app = "pgpool-faults-concurrent"
    pool = new_pool(
        app, minconn=1, maxconn=3, timeout=0.2, check_after=0.01, max_idle=0.05, max_lifetime=0.5
    )
    # What a fault in a cleanup path leaves behind comes back sooner than in
    # production (ABANDONED_AFTER), so that the run isn't spent waiting.
    pool.abandoned_after = 0.5
    injector = Injector()
    refill_rng = random.Random(seed + 100)
    injector.auto_arm = lambda: refill_rng.randrange(1, 40) if refill_rng.random() < 0.35 else None
    lending = Lending()
    stop = time.monotonic() + 4.0
    problems: list[str] = []
    operations = [0]
    timeouts = [0]

    def borrower(index: int) -> None:
        rng = random.Random(seed + index)
        held: list[Any] = []
        leased: list[tuple[Any, int]] = []  # between requests: the pool may revoke them
        with injector.tracing():
            while time.monotonic() < stop:
                injector.arm(rng.randrange(1, 40) if rng.random() < 0.35 else None)
                try:
                    if leased and rng.random() < 0.5:
                        conn, loan = leased.pop(rng.randrange(len(leased)))
                        if pool.lease_claim(conn, loan):
                            lending.lent(conn)  # a problem if someone else holds it
                            held.append(conn)
                            check_session(conn)
                    elif held and rng.random() < 0.3:
                        conn = held.pop(rng.randrange(len(held)))
                        loan = conn.loan
                        lending.returning(conn)
                        if pool.lease_idle(conn, loan):
                            leased.append((conn, loan))
                        else:
                            pool.putconn(conn, loan=loan)
                    elif held:
                        conn = held.pop(rng.randrange(len(held)))
                        if rng.random() < 0.3:
                            with conn.cursor() as cur:
                                cur.execute(f"SET work_mem = '{DIRTY_WORK_MEM}'")
                        lending.returning(conn)
                        if rng.random() < 0.5:
                            pool.putconn(conn, loan=conn.loan)
                        else:
                            pool.putconn(conn)
                    elif rng.random() < 0.03:
                        pool.reconnect()
                    else:
                        conn = pool.getconn()
                        lending.lent(conn)
                        held.append(conn)
                        check_session(conn)
                except Injected:
                    injector.resume()
                except PoolError:
                    timeouts[0] += 1
                except psycopg2.Error as exc:
                    problems.append(f"{threading.current_thread().name}: {exc!r}")
                finally:
                    injector.arm(None)
                    operations[0] += 1
        for conn, loan in leased:
            if pool.lease_claim(conn, loan):
                held.append(conn)
        for conn in held:
            lending.returning(conn)
            pool.putconn(conn)

    def maintainer() -> None:
        rng = random.Random(seed - 1)
        with injector.tracing():
            while time.monotonic() < stop:
                injector.arm(rng.randrange(1, 60) if rng.random() < 0.35 else None)
                try:
                    pool.maintain()
                except Injected:
                    injector.resume()
                injector.arm(None)
                time.sleep(0.01)

    def checker() -> None:
        while time.monotonic() < stop:
            try:
                pool.check_invariants()
            except AssertionError as exc:
                problems.append(str(exc))
            time.sleep(0.005)

    threads = [threading.Thread(target=borrower, args=(i,), name=f"b{i}") for i in range(4)]
    threads += [threading.Thread(target=maintainer), threading.Thread(target=checker)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads)
        assert not problems, problems[:5]
        assert not lending.problems, lending.problems[:5]
        quiesce_and_check(pool, app, admin)
    finally:
        pool.closeall()
    print(
        f"\nconcurrent: seed {seed}, 6 threads, {operations[0]} operations, "
        f"{lending.loans} loans, {timeouts[0]} timeouts, {len(injector.fired)} faults at "
        f"{len(set(injector.fired))} distinct points of {len(injector.points)} reached"
    )
    assert len(injector.fired) > 100
