"""``manage.py poolclose``: replace the pools' connections, in every process that has them.

Three ways, from gentlest to bluntest:

* default: a graceful reconnect of every process on this host (PgBouncer's
  RECONNECT), through the status directory's reconnect requests;
* ``--kill``: end the pools' idle sessions on the server (also the busy ones
  with ``--include-active``), which reaches every host;
* ``--this-process``: close this process's own pools (``close_pools()``).
"""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import BaseCommand, CommandError

from ... import maintenance, registry, status
from ...identity import HOSTNAME
from .._aliases import add_database_argument, selected_aliases
from .._host import host_processes, read_host_snapshots
from .._reach import check_reached
from .._server import terminate, wait_until_gone
from .._words import DEFAULT_WAIT, POLL, pid_list, plural, seconds

#: Seconds a session must have been idle on the server for ``--kill`` to end it.
DEFAULT_IDLE_FOR = 5.0


class Command(BaseCommand):
    help = (
        "Replace the connections of the pools of each database on ENGINE 'django_pgpool'. "
        "Default: ask every process on this host to reconnect, gracefully (idle connections "
        "close within about a second, connections in use when they are returned). --kill: end "
        "the pools' idle sessions on the server, from every host. --this-process: close this "
        "process's pools."
    )

    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_database_argument(parser, "Only this database's pools")
        parser.add_argument(
            "--kill",
            action="store_true",
            help="End the pools' idle sessions on the server (pg_terminate_backend), from "
            "every host; the pools replace them. Needs the right to end those sessions.",
        )
        parser.add_argument(
            "--idle-for",
            type=seconds,
            metavar="SECONDS",
            help="With --kill: end only the sessions idle for at least SECONDS (default "
            f"{DEFAULT_IDLE_FOR:g}); a session lent to a request is idle between two statements.",
        )
        parser.add_argument(
            "--include-active",
            action="store_true",
            help="With --kill: end the sessions in use too (their requests fail).",
        )
        parser.add_argument(
            "--wait",
            nargs="?",
            type=seconds,
            const=DEFAULT_WAIT,
            metavar="SECONDS",
            help="Return only when the old connections are gone (at most SECONDS, "
            f"default {DEFAULT_WAIT:g}); else say which processes still hold some and exit 1.",
        )
        parser.add_argument(
            "--this-process",
            action="store_true",
            help="Close this process's pools only (for call_command() inside a worker).",
        )

    def handle(
        self,
        *,
        databases: list[str] | None,
        kill: bool,
        include_active: bool,
        idle_for: float | None,
        wait: float | None,
        this_process: bool,
        **options: Any,
    ) -> None:
        if include_active and not kill:
            raise CommandError("--include-active goes with --kill")
        if idle_for is not None and not kill:
            raise CommandError("--idle-for goes with --kill")
        if this_process and kill:
            raise CommandError("--this-process and --kill can't be combined")
        if this_process and wait is not None:
            raise CommandError(
                "--wait can't be combined with --this-process: connections in use close when "
                "they are returned, maybe by the thread running the command"
            )
        aliases = selected_aliases(databases)
        if not aliases:
            self.stdout.write("No database uses ENGINE 'django_pgpool'.")
            return
        if this_process:
            self._close_this_process(aliases)
        elif kill:
            for alias in aliases:
                self._kill(
                    alias, include_active, DEFAULT_IDLE_FOR if idle_for is None else idle_for, wait
                )
        else:
            self._reconnect(aliases, wait)

    def _close_this_process(self, aliases: list[str]) -> None:
        for alias in aliases:
            closed = registry.close_pools(alias=alias)
            self.stdout.write(
                self.style.SUCCESS(f"Closed {plural(closed, 'pool')} of database {alias!r}.")
            )

    # -- default: a graceful reconnect of every process on this host ------------

    def _reconnect(self, aliases: list[str], wait: float | None) -> None:
        snapshots = read_host_snapshots()
        requested_at = time.monotonic()
        try:
            generations = status.request_reconnect(aliases)
        except (ImproperlyConfigured, OSError) as exc:  # the status directory
            raise CommandError(
                f"couldn't ask for a reconnect: {status.describe_failure(exc)}"
            ) from exc
        targets: dict[str, list[int]] = {}
        for alias in aliases:
            pids = [p["pid"] for p in host_processes(alias, snapshots)]
            targets[alias] = pids
            if pids:
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Asked {plural(len(pids), 'process')} on host {HOSTNAME} to reconnect "
                        f"database {alias!r} (pids {pid_list(pids)}): idle connections close "
                        "within about a second, connections in use when they are returned."
                    )
                )
            else:
                self.stdout.write(
                    f"No process on host {HOSTNAME} has a pool of database {alias!r}: "
                    "nothing to reconnect."
                )
        # What the status directory can't reach, the server may still show.
        failures = []
        for alias in aliases:
            failure, warning = check_reached(alias, "poolclose", "they were not asked to reconnect")
            if warning is not None:
                self.stderr.write(warning)
            if failure is not None:
                failures.append(failure)
        if wait is None:
            if failures:
                raise CommandError("; ".join(failures))
            return
        deadline = requested_at + wait
        for alias in aliases:
            if not targets[alias]:
                continue
            pending = self._wait_for_reconnects(
                alias, generations[alias], targets[alias], requested_at, deadline
            )
            elapsed = time.monotonic() - requested_at
            if pending:
                held = ", ".join(f"pid {pid} ({why})" for pid, why in sorted(pending.items()))
                failures.append(
                    f"after {elapsed:.1f} s, these processes on host {HOSTNAME} still hold "
                    f"connections of database {alias!r} opened before the request: {held}"
                )
            else:
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Database {alias!r}: every process has reconnected ({elapsed:.1f} s)."
                    )
                )
        if failures:
            raise CommandError("; ".join(failures))

    def _wait_for_reconnects(
        self,
        alias: str,
        generation: int,
        pids: list[int],
        requested_at: float,
        deadline: float,
    ) -> dict[int, str]:
        """Wait until these processes have no connection of ``alias`` from before the request.

        Return those that still have some at the deadline, with what they hold.
        """
        while True:
            processes = {p["pid"]: p for p in host_processes(alias, read_host_snapshots())}
            pending: dict[int, str] = {}
            for pid in pids:
                process = processes.get(pid)
                if process is None:
                    continue  # exited, or has no pool of the alias any more
                pools = process["pools"]
                retired = sum(pool["retired_in_use"] for pool in pools)
                if process["reconnect_seen"] >= generation:
                    if retired:
                        pending[pid] = f"{plural(retired, 'connection')} in use"
                elif sum(pool["pool_size"] for pool in pools) == 0 and (
                    time.monotonic() - requested_at > 1.5 * maintenance.INTERVAL
                ):
                    # An empty pool has nothing to replace; it publishes again
                    # only when something changes, so it may not say it saw the
                    # request. After a full round, its figures are current.
                    continue
                else:
                    pending[pid] = "has not acted on the request yet"
            if not pending or time.monotonic() >= deadline:
                return pending
            time.sleep(POLL)

    # -- --kill: end the sessions on the server, from every host ----------------

    def _kill(self, alias: str, include_active: bool, idle_for: float, wait: float | None) -> None:
        started = time.monotonic()
        result = terminate(alias, include_active, idle_for)
        what = "" if include_active else "idle "
        where = f"database {alias!r} ({result.database})"
        if result.terminated:
            by_process: dict[tuple[str, int], int] = {}
            for backend in result.terminated:
                key = (backend.host, backend.process)
                by_process[key] = by_process.get(key, 0) + 1
            detail = ", ".join(f"{n} of {host}:{pid}" for (host, pid), n in by_process.items())
            self.stdout.write(
                self.style.SUCCESS(
                    f"Ended {plural(len(result.terminated), what + 'session')} of {where} on "
                    f"the server: {detail}."
                )
            )
        else:
            self.stdout.write(f"No {what}session of {where} to end.")
        if result.left:
            recent = sum(1 for backend in result.left if backend.state == "idle")
            reasons = [
                f"{len(result.left) - recent} in use" if len(result.left) > recent else "",
                f"{recent} idle for less than {idle_for:g} s" if recent else "",
            ]
            self.stdout.write(
                f"Left {plural(len(result.left), 'session')} alone: "
                f"{', '.join(r for r in reasons if r)} (--idle-for and --include-active end "
                "those too; a graceful poolclose replaces them when they are returned)."
            )
        if wait is None or not result.terminated:
            return
        pids = [backend.pid for backend in result.terminated]
        remaining = wait_until_gone(alias, pids, started + wait, POLL)
        elapsed = time.monotonic() - started
        if remaining:
            raise CommandError(
                f"after {elapsed:.1f} s, these ended sessions of {where} are still there: "
                f"server pids {pid_list(remaining)}"
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Database {alias!r}: the ended sessions are gone ({elapsed:.1f} s)."
            )
        )
