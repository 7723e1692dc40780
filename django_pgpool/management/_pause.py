"""``poolpause`` and ``poolresume``: PgBouncer's PAUSE and RESUME for every process on this host.

The commands can't reach into other processes: they write the pause state
of the aliases in the status directory (``status.request_pause()``), and
each process brings its pools to it at its next maintenance round (about a
second), or at once for a pool it creates. ``--wait`` then reads the
processes' snapshots until each has applied this request (its
``pause_seen`` generation) and is in the state asked for.
"""

from __future__ import annotations

import time
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import BaseCommand, CommandError

from .. import status
from ..identity import HOSTNAME
from ._aliases import add_database_argument, selected_aliases
from ._host import host_processes, read_host_snapshots
from ._reach import check_reached
from ._words import DEFAULT_WAIT, POLL, pid_list, plural, seconds

__all__ = ["PauseCommand", "describe_since"]


def describe_since(since: float, now: float | None = None) -> str:
    """Return ``"2026-11-22 05:15:29 UTC, 12.3 s ago"`` for a Unix time."""
    now = time.time() if now is None else now
    moment = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
    return f"{moment}, {max(now - since, 0.0):.1f} s ago"


class PauseCommand(BaseCommand):
    """What poolpause and poolresume share; ``paused`` says which one it is."""

    paused: bool
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        verb = "Pause" if self.paused else "Resume"
        add_database_argument(parser, f"{verb} only this database's pools")
        until = (
            "every process is paused with no connection left"
            if self.paused
            else "every process has resumed"
        )
        parser.add_argument(
            "--wait",
            nargs="?",
            type=seconds,
            const=DEFAULT_WAIT,
            metavar="SECONDS",
            help=f"Return only when {until} (at most SECONDS, default {DEFAULT_WAIT:g}); "
            "else say which processes are not and exit 1.",
        )

    def handle(self, *, databases: list[str] | None, wait: float | None, **options: Any) -> None:
        aliases = selected_aliases(databases)
        if not aliases:
            self.stdout.write("No database uses ENGINE 'django_pgpool'.")
            return
        snapshots = read_host_snapshots()
        requested_at = time.monotonic()
        try:
            before, after = status.request_pause(aliases, self.paused)
        except (ImproperlyConfigured, OSError) as exc:  # the status directory
            verb = "pause" if self.paused else "resume"
            raise CommandError(f"couldn't ask to {verb}: {status.describe_failure(exc)}") from exc
        asked: dict[str, list[int]] = {}
        for alias in aliases:
            asked[alias] = [p["pid"] for p in host_processes(alias, snapshots)]
            self._say_asked(alias, asked[alias], before[alias]["paused_since"])
        verb = "paused" if self.paused else "resumed"
        failures = []
        for alias in aliases:
            failure, warning = check_reached(
                alias, f"pool{verb[:-1]}", f"they were not asked to be {verb}"
            )
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
            pending, seen = self._wait(alias, after[alias]["generation"], deadline)
            elapsed = time.monotonic() - requested_at
            if pending:
                failures.append(self._not_done(alias, pending, elapsed))
            elif not seen:
                continue  # no process has a pool of it: said above
            elif self.paused:
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Database {alias!r}: every process is paused, with no connection "
                        f"left ({elapsed:.1f} s)."
                    )
                )
            else:
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Database {alias!r}: every process has resumed ({elapsed:.1f} s)."
                    )
                )
        if failures:
            raise CommandError("; ".join(failures))

    def _say_asked(self, alias: str, pids: list[int], paused_since: float | None) -> None:
        where = f"on host {HOSTNAME}"
        if self.paused:
            if paused_since is not None:
                state = f"Database {alias!r} is paused {where} since {describe_since(paused_since)}"
            else:
                state = f"Paused database {alias!r} {where}"
            future = "processes that start meanwhile are paused too, until poolresume"
            if not pids:
                self.stdout.write(
                    self.style.SUCCESS(f"{state}; no process has a pool of it now ({future}).")
                )
                return
            self.stdout.write(
                self.style.SUCCESS(
                    f"Asked {plural(len(pids), 'process')} {where} to pause database {alias!r} "
                    f"(pids {pid_list(pids)}): they lend no connection until poolresume "
                    "(borrowers wait, up to their timeout), idle connections close within about "
                    "a second, connections in use when they are returned."
                )
            )
            if paused_since is not None:
                self.stdout.write(f"{state}.")
            return
        if paused_since is None:
            state = f"Database {alias!r} was not paused {where}"
        else:
            state = f"Database {alias!r} was paused {where} since {describe_since(paused_since)}"
        if not pids:
            self.stdout.write(f"{state}; no process has a pool of it now: nothing to resume.")
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Asked {plural(len(pids), 'process')} {where} to resume database {alias!r} "
                f"(pids {pid_list(pids)}): the borrowers waiting are served first, within about a "
                "second, on new connections."
            )
        )
        self.stdout.write(f"{state}.")

    def _wait(self, alias: str, generation: int, deadline: float) -> tuple[dict[int, str], int]:
        """Wait until every process with a pool of ``alias`` is in the state asked for.

        Return those that are not at the deadline, with what they are doing,
        and how many processes have a pool of ``alias`` at the end.
        Processes that start meanwhile count (a pause applies to them too);
        those that exit no longer do.
        """
        while True:
            pending: dict[int, str] = {}
            processes = host_processes(alias, read_host_snapshots())
            for process in processes:
                pools = process["pools"]
                size = sum(pool["pool_size"] for pool in pools)
                in_use = sum(pool["pool_in_use"] for pool in pools)
                paused = all(pool["paused_since"] is not None for pool in pools)
                if process["pause_seen"] < generation:
                    what = "has not acted on the request yet"
                    if size:
                        what += f", {plural(size, 'connection')} open, {in_use} in use"
                    pending[process["pid"]] = what
                elif self.paused and not paused:
                    pending[process["pid"]] = "not paused (resumed meanwhile?)"
                elif self.paused and size:
                    pending[process["pid"]] = f"{plural(size, 'connection')} open, {in_use} in use"
                elif not self.paused and any(pool["paused_since"] is not None for pool in pools):
                    pending[process["pid"]] = "still paused (paused again meanwhile?)"
            if not pending or time.monotonic() >= deadline:
                return pending, len(processes)
            time.sleep(POLL)

    def _not_done(self, alias: str, pending: dict[int, str], elapsed: float) -> str:
        held = ", ".join(f"pid {pid} ({what})" for pid, what in sorted(pending.items()))
        if self.paused:
            return (
                f"after {elapsed:.1f} s, these processes on host {HOSTNAME} still hold "
                f"connections of database {alias!r}: {held}. The pause stays: the connections "
                "close when they are returned; run poolpause --wait again to wait longer, or "
                "poolresume to lend again"
            )
        return (
            f"after {elapsed:.1f} s, these processes on host {HOSTNAME} have not resumed "
            f"database {alias!r}: {held}"
        )
