"""Benchmark django_pgpool against every alternative, in one run, on one throwaway PostgreSQL.

    python benchmarks/run.py            # the full run (about 15 minutes on 2 cores)
    python benchmarks/run.py --quick    # 1 round, fewer requests: for development
    tox -e bench                        # the same, in its own environment

Strategies (benchmarks/strategies.py): stock Django with CONN_MAX_AGE=0 and
=None, Django's own pool on psycopg 3, django-db-connection-pool, PgBouncer in
transaction mode, django_pgpool. Workloads: in-process threads (1, 8, 32)
doing simulated requests; gunicorn serving testproject under HTTP load;
microbenchmarks of borrow+return and of a new connection; round trips per
request through a counting proxy. Strategies are interleaved within each
round, and each is compared with CONN_MAX_AGE=None *of the same round*.

Writes the raw figures to benchmarks/.cache/results-*.json, and (full runs,
or --write-docs) docs/benchmarks.md and its plots in docs/img/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import environments  # noqa: E402
import report  # noqa: E402
import strategies  # noqa: E402
from environments import CACHE_DIR, log  # noqa: E402

WORKER = BENCH_DIR / "worker.py"
HTTPLOAD = BENCH_DIR / "httpload.py"
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 8
# No control socket file (gunicorn >= 24); gunicorn ignores names it doesn't know.
GUNICORN_CONFIG = "control_socket_disable = True\n"


@dataclass(frozen=True)
class Plan:
    rounds: int
    threads: tuple[int, ...]
    #: Measured requests per run, split evenly between the threads (R = total / T).
    requests_per_run: int
    warmup_per_thread: int
    http_rounds: int
    http_clients: int
    http_warmup: float
    http_seconds: float
    #: Microbenchmark batches per strategy and round.
    micro_batches: int
    round_trip_threads: int
    round_trip_requests: int
    maxconn: int


FULL = Plan(
    rounds=5,
    threads=(1, 8, 32),
    requests_per_run=1600,
    warmup_per_thread=10,
    http_rounds=5,
    http_clients=32,
    http_warmup=2.0,
    http_seconds=8.0,
    micro_batches=5,
    round_trip_threads=8,
    round_trip_requests=50,
    maxconn=strategies.DEFAULT_MAXCONN,
)
QUICK = replace(
    FULL,
    rounds=1,
    requests_per_run=320,
    warmup_per_thread=5,
    http_rounds=1,
    http_warmup=1.0,
    http_seconds=3.0,
    round_trip_requests=20,
)


class Bench:
    """One run: the server, PgBouncer, the interpreters and the figures collected."""

    def __init__(
        self,
        plan: Plan,
        server: Any,
        chosen: list[str],
        pythons: dict[str, str],
        pgbouncer: str | None,
    ) -> None:
        self.plan = plan
        self.server = server
        self.chosen = chosen
        self.pythons = pythons
        self.pgbouncer_binary = pgbouncer
        self.sampler = environments.BackendSampler(server, strategies.DATABASE)
        self.results: dict[str, Any] = {
            "inprocess": [],
            "http": [],
            "pool_micro": [],
            "django_micro": [],
            "round_trips": [],
        }

    # -- helpers -------------------------------------------------------------

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return environments.child_environment(
            {
                **self.server.env(),
                "BENCH_DATABASE": strategies.DATABASE,
                "BENCH_MAXCONN": str(self.plan.maxconn),
                **(extra or {}),
            }
        )

    @contextlib.contextmanager
    def _pgbouncer_if(self, key: str) -> Any:
        """Start a fresh PgBouncer for a PgBouncer measurement; yield the extra env."""
        if key != "pgbouncer":
            yield {}
            return
        assert self.pgbouncer_binary is not None
        bouncer = environments.PgBouncer(
            self.pgbouncer_binary, self.server, strategies.DATABASE, self.plan.maxconn
        )
        try:
            with bouncer.running():
                yield {"BENCH_PGBOUNCER_PORT": str(bouncer.port)}
        finally:
            bouncer.cleanup()

    def _worker(self, key: str, args: list[str], timeout: float = 600) -> dict[str, Any]:
        python = self.pythons[strategies.BY_KEY[key].venv]
        with self._pgbouncer_if(key) as extra, self.sampler.sampling() as sampler:
            proc = subprocess.run(
                [python, str(WORKER), *args, "--strategy", key],
                env=self._env(extra),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        result = _child_result(key, proc, sampler.peak)
        if "failed" in result:
            log(f"worker {key} {' '.join(args)} failed:\n{result['failed']}")
        elif proc.stderr.strip():
            result["stderr"] = proc.stderr[-2000:]
        return result

    def _inprocess(
        self, key: str, threads: int, requests: int, warmup: int, count_round_trips: bool = False
    ) -> dict[str, Any]:
        """The in-process workload: ``requests`` per thread after ``warmup`` each."""
        args = ["inprocess", "--threads", str(threads), "--requests", str(requests)]
        args += ["--warmup", str(warmup)]
        if count_round_trips:
            args.append("--count-round-trips")
        return self._worker(key, args)

    def _order(self, round_index: int) -> list[str]:
        # Interleaved, and rotated each round so no strategy always runs
        # right after the same neighbour (or first, on a cold cache).
        shift = round_index % len(self.chosen)
        return self.chosen[shift:] + self.chosen[:shift]

    # -- the measurements ----------------------------------------------------

    def micro_round(self, round_index: int) -> None:
        # In every round, like the other workloads: one measurement at one
        # moment would take whatever the machine's other tenants did then.
        batches = str(self.plan.micro_batches)
        for key in self._order(round_index):
            if key in ("pgpool", "djangopool", "dbcp"):
                log(f"round {round_index + 1} microbenchmark: {key} pool library alone")
                args = ["pool-micro", "--batches", batches]
                self.results["pool_micro"].append(self._worker(key, args))
        for key in self._order(round_index):
            log(f"round {round_index + 1} microbenchmark: {key} Django-level borrow + return")
            args = ["django-micro", "--batches", batches]
            self.results["django_micro"].append(self._worker(key, args))

    def round_trips(self) -> None:
        for key in self.chosen:
            log(f"round trips per request: {key}")
            result = self._inprocess(
                key,
                self.plan.round_trip_threads,
                self.plan.round_trip_requests,
                warmup=5,
                count_round_trips=True,
            )
            self.results["round_trips"].append(result)

    def inprocess_round(self, round_index: int) -> None:
        for threads in self.plan.threads:
            per_thread = max(1, self.plan.requests_per_run // threads)
            for key in self._order(round_index):
                result = self._inprocess(key, threads, per_thread, self.plan.warmup_per_thread)
                result.update(round=round_index, threads=threads, strategy=key)
                self.results["inprocess"].append(result)
                log(f"round {round_index + 1} T={threads:<2} {key:<10} {_brief(result)}")

    def http_round(self, round_index: int) -> None:
        for key in self._order(round_index):
            result = self.http_one(key)
            result.update(round=round_index, strategy=key)
            self.results["http"].append(result)
            log(f"round {round_index + 1} HTTP {key:<10} {_brief(result)}")

    def http_one(self, key: str) -> dict[str, Any]:
        """gunicorn (gthread) serving testproject, loaded from another process."""
        python = self.pythons[strategies.BY_KEY[key].venv]
        port = environments.free_port()
        self.sampler.wait_until_idle()
        with (
            tempfile.TemporaryDirectory(prefix="pgpool-bench-gunicorn-") as tmp,
            self._pgbouncer_if(key) as extra,
        ):
            config = Path(tmp) / "gunicorn_conf.py"
            config.write_text(GUNICORN_CONFIG, encoding="utf-8")
            log_path = Path(tmp) / "gunicorn.log"
            env = self._env(
                {
                    **extra,
                    "BENCH_STRATEGY": key,
                    "DJANGO_SETTINGS_MODULE": "httpsettings",
                    "PYTHONPATH": os.pathsep.join(
                        [str(BENCH_DIR), str(REPO_ROOT / "testproject"), str(REPO_ROOT)]
                    ),
                }
            )
            command = [
                python,
                "-m",
                "gunicorn",
                "--config",
                str(config),
                "--worker-class",
                "gthread",
                "--workers",
                str(GUNICORN_WORKERS),
                "--threads",
                str(GUNICORN_THREADS),
                "--bind",
                f"127.0.0.1:{port}",
                "--error-logfile",
                str(log_path),
                "testproject.wsgi:application",
            ]
            with open(os.devnull, "wb") as devnull:
                gunicorn = subprocess.Popen(
                    command,
                    cwd=REPO_ROOT / "testproject",
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=devnull,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_until_serving(port, gunicorn, log_path)
                # Not waiting for 0 backends: the readiness check has opened some.
                with self.sampler.sampling(wait=False) as sampler:
                    proc = subprocess.run(
                        [
                            self.pythons["main"],
                            str(HTTPLOAD),
                            "--port",
                            str(port),
                            "--clients",
                            str(self.plan.http_clients),
                            "--warmup",
                            str(self.plan.http_warmup),
                            "--seconds",
                            str(self.plan.http_seconds),
                        ],
                        env=self._env(),
                        capture_output=True,
                        text=True,
                        timeout=self.plan.http_warmup + self.plan.http_seconds + 120,
                        check=False,
                    )
            except RuntimeError as exc:
                return {"strategy": key, "failed": str(exc)}
            finally:
                environments.stop_group(gunicorn, signal.SIGTERM, 15)
            result = _child_result(key, proc, sampler.peak)
            if "failed" in result:
                return result
            server_log = log_path.read_text(errors="replace")
            problems = [
                line for line in server_log.splitlines() if "Traceback" in line or "Error" in line
            ]
            if problems:
                result["server_errors"] = problems[:20]
            return result

    def _wait_until_serving(
        self, port: int, gunicorn: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        import http.client

        deadline = time.monotonic() + 60
        while True:
            if gunicorn.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{log_path.read_text(errors='replace')}")
            try:
                # Likely both workers: a few requests over fresh connections.
                statuses = []
                for _ in range(4):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/api/products/1/")
                    statuses.append(conn.getresponse().status)
                    conn.close()
                if all(status == 200 for status in statuses):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gunicorn is not serving:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)


def _child_result(
    key: str, proc: subprocess.CompletedProcess[str], peak_backends: int
) -> dict[str, Any]:
    """A child's figures (the last line it printed, JSON), or why there are none."""
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"strategy": key, "failed": proc.stderr[-3000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_backends"] = peak_backends
    return result


def _brief(result: dict[str, Any]) -> str:
    if "failed" in result:
        return "FAILED"
    errors = sum(result.get("errors", {}).values())
    return (
        f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f}"
        f"  max {result['max_ms']:6.1f}  share {result['least_served_share']:.2f}"
        f"  backends {result.get('peak_backends', '?')}  errors {errors}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 round, fewer requests")
    parser.add_argument("--rounds", type=int, help="rounds of the in-process and HTTP workloads")
    parser.add_argument(
        "--strategies",
        default=",".join(strategies.BY_KEY),
        help=f"comma-separated, of: {', '.join(strategies.BY_KEY)}",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated, of: micro, roundtrips, inprocess, http"
    )
    parser.add_argument(
        "--write-docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write docs/benchmarks.md and docs/img/ (default: on for full runs)",
    )
    parser.add_argument(
        "--report",
        metavar="RESULTS_JSON",
        help="measure nothing: rebuild the tables (and, with --write-docs, the docs) "
        "from a run's raw figures (benchmarks/.cache/results-*.json)",
    )
    args = parser.parse_args(argv)
    if args.report:
        _report(json.loads(Path(args.report).read_text(encoding="utf-8")), bool(args.write_docs))
        return 0
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds, http_rounds=args.rounds)
    chosen = [key for key in args.strategies.split(",") if key]
    unknown = [key for key in chosen if key not in strategies.BY_KEY]
    if unknown or strategies.REFERENCE not in chosen:
        parser.error(f"strategies must be among {list(strategies.BY_KEY)} and include persistent")
    skip = {word for word in args.skip.split(",") if word}
    write_docs = args.write_docs if args.write_docs is not None else not args.quick

    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        log(
            f"load average is {load_before:.1f} on {os.cpu_count()} cores: "
            "something else is running; figures will be noisier"
        )
    began = time.monotonic()
    commit_before = _commit()
    pythons = environments.interpreters({strategies.BY_KEY[key].venv for key in chosen})
    pgbouncer = environments.ensure_pgbouncer() if "pgbouncer" in chosen else None

    from tests.pgserver import ThrowawayServer

    log("starting a throwaway PostgreSQL")
    with ThrowawayServer() as throwaway:
        server = throwaway.info
        log(f"PostgreSQL on {server.host}:{server.port}; creating {strategies.DATABASE}")
        environments.prepare_database(server, strategies.DATABASE)
        bench = Bench(plan, server, chosen, pythons, pgbouncer)
        try:
            if "roundtrips" not in skip:
                bench.round_trips()
            for round_index in range(max(plan.rounds, plan.http_rounds)):
                if "micro" not in skip and round_index < plan.rounds:
                    bench.micro_round(round_index)
                if "inprocess" not in skip and round_index < plan.rounds:
                    bench.inprocess_round(round_index)
                if "http" not in skip and round_index < plan.http_rounds:
                    bench.http_round(round_index)
        finally:
            bench.sampler.close()
        server_version = _server_version(server)

    commit_after = _commit()
    results = bench.results
    results["meta"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "plan": asdict(plan),
        "strategies": chosen,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "postgresql": server_version,
        "pgbouncer": _pgbouncer_version(pgbouncer),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "minutes": (time.monotonic() - began) / 60,
        "quick": args.quick,
        # Each worker imports django_pgpool afresh: say so if it changed meanwhile.
        "commit": commit_before
        if commit_after == commit_before
        else f"{commit_before} -> {commit_after} (changed during the run)",
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = CACHE_DIR / f"results-{stamp}.json"
    raw.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(f"raw figures in {raw}")
    _report(results, write_docs)
    return 0


def _report(results: dict[str, Any], write_docs: bool) -> None:
    """Print the tables of a run's raw figures; write the docs page and plots if asked."""
    summary = report.summarize(results)
    print(report.text_tables(summary))
    if write_docs:
        written = report.write_docs(summary, REPO_ROOT / "docs")
        log(f"wrote {', '.join(str(p.relative_to(REPO_ROOT)) for p in written)}")


def _server_version(server: Any) -> str:
    import psycopg2

    conn = psycopg2.connect(**server.connect_kwargs())
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW server_version")
            row = cursor.fetchone()
            return str(row[0]) if row else "?"
    finally:
        conn.close()


def _commit() -> str:
    """The checkout's commit, marked when django_pgpool/ has uncommitted changes."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        command = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--", "django_pgpool").stdout.strip()
    return head.stdout.strip() + (" (django_pgpool modified)" if dirty else "")


def _pgbouncer_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()[0] if proc.stdout else None


if __name__ == "__main__":
    sys.exit(main())
