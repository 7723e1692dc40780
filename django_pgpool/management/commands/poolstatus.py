"""``manage.py poolstatus``: every process's pools on this host, and the server's view."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from argparse import ArgumentParser
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import BaseCommand, CommandError

from ... import status
from ...identity import HOSTNAME
from .._aliases import add_database_argument, pool_config, selected_aliases
from .._host import host_processes, read_host_snapshots
from .._pause import describe_since
from .._reach import Unreached, describe, unreached_processes
from .._redaction import database_identity, libpq_in_effect, session_settings
from .._server import server_view, unreachable_server_view

NO_PROCESS = "no process on this host has a pool of this database"
NOT_HERE = "no process publishes a pool of this database where this command looks: see below"
NO_SESSION = "no session of this database's pools"

# (heading, key of a published pool) of each figure of the host table.
POOL_COLUMNS = (
    ("size", "pool_size"),
    ("idle", "pool_available"),
    ("in use", "pool_in_use"),
    ("leased", "pool_leased"),
    ("waiting", "requests_waiting"),
    ("max wait", "longest_wait_s"),
    ("paused", "paused_since"),
    ("requests", "requests_num"),
    ("waits", "requests_queued"),
    ("timeouts", "requests_timeouts"),
    ("errors", "requests_errors"),
    ("opened", "connections_num"),
    ("closed", "connections_closed"),
    ("lost", "connections_lost"),
    ("expired", "connections_expired"),
)
# (heading, key of a server-view process) of each count of the server table.
SERVER_COLUMNS = (
    ("conns", "connections"),
    ("active", "active"),
    ("idle", "idle"),
    ("idle in xact", "idle_in_transaction"),
    ("other", "other"),
)

# A row: its cells, or its leading cells and a message standing for the rest.
Row = list[str] | tuple[list[str], str]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _aged(item: dict[str, Any] | None, key: str, prefix: str = "") -> str:
    """Return ``"<age> <prefix><item[key]>"`` for an oldest-something figure, or "-"."""
    if not item:
        return "-"
    return f"{_seconds(item['age_s'])} {prefix}{item[key] if item[key] is not None else '?'}"


def _table(headings: Sequence[str], text: set[int], rows: list[Row]) -> list[str]:
    """Return an aligned table (in the way of psql and PgBouncer's SHOW POOLS).

    Columns whose index is in ``text`` are left-aligned, the others (figures)
    right-aligned. A row given as (cells, message) has the message in place
    of its missing cells.
    """
    widths = [len(heading) for heading in headings]
    for row in rows:
        cells = row if isinstance(row, list) else row[0]
        for i, cell in enumerate(cells):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        aligned = [
            cell.ljust(widths[i]) if i in text or i >= len(widths) else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(aligned).rstrip()

    lines = [line(headings), "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append(line(row) if isinstance(row, list) else line([*row[0], row[1]]))
    return lines


def _waiting(processes: list[dict[str, Any]]) -> str:
    """Say how many borrowers wait in the paused pools of these processes."""
    waiting = sum(
        pool["requests_waiting"]
        for process in processes
        for pool in process["pools"]
        if pool["paused_since"] is not None
    )
    return f"{waiting} borrower{'s' if waiting != 1 else ''} waiting"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


class Command(BaseCommand):
    help = (
        "Show the pools of each database on ENGINE 'django_pgpool': every process on this "
        "host that uses them, with exact figures; the server's view (pg_stat_activity) of "
        "their sessions, from every host; and the configuration. Never shows a password."
    )

    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_database_argument(parser, "Show only this database")
        parser.add_argument(
            "--format",
            choices=["text", "json"],
            default="text",
            dest="output_format",
            help="Output format: aligned tables (default) or one JSON document.",
        )
        parser.add_argument(
            "--watch",
            type=_positive_seconds,
            metavar="SECONDS",
            help="Show it again every SECONDS until interrupted (Ctrl-C). With --format "
            "json, one document per line.",
        )

    def handle(
        self,
        *,
        databases: list[str] | None,
        output_format: str,
        watch: float | None,
        **options: Any,
    ) -> None:
        aliases = selected_aliases(databases)
        for alias in aliases:
            pool_config(alias)  # invalid OPTIONS: a CommandError before anything is shown
        if watch is None:
            document, errors = self.report(aliases)
            self.write(document, output_format, compact=False)
            if errors:
                raise CommandError("; ".join(errors))
            return
        clear = output_format == "text" and self.stdout.isatty()
        try:
            while True:
                document, _ = self.report(aliases)  # an outage is shown, and watched
                if clear:
                    self.stdout.write("\x1b[H\x1b[2J", ending="")
                self.write(document, output_format, compact=True)
                if output_format == "text":
                    self.stdout.write(f"\n(every {watch:g} s; Ctrl-C to stop)\n")
                self.stdout.flush()
                time.sleep(watch)
        except KeyboardInterrupt:
            return

    def report(self, aliases: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Return the JSON document, and why a database could not be reached, if one couldn't."""
        snapshots = read_host_snapshots()
        try:
            pause_state = status.read_pause_state()
        except (ImproperlyConfigured, OSError) as exc:
            raise CommandError(status.describe_failure(exc)) from exc
        databases: dict[str, dict[str, Any]] = {
            alias: {
                "config": pool_config(alias),
                "database": {
                    **database_identity(alias),
                    "libpq": libpq_in_effect(alias),
                    "session_settings": session_settings(alias),
                },
                "pause": pause_state.get(alias, {"generation": 0, "paused_since": None}),
                "processes": host_processes(alias, snapshots),
            }
            for alias in aliases
        }
        errors = []
        for alias in aliases:
            databases[alias]["unreached"] = []
            try:
                databases[alias]["server"] = server_view(alias)
            except CommandError as exc:
                errors.append(str(exc))
                databases[alias]["server"] = unreachable_server_view(str(exc))
                continue
            with contextlib.suppress(CommandError):  # reached a moment ago: shown if not
                databases[alias]["unreached"] = [
                    {
                        "pid": u.pid,
                        "sessions": u.sessions,
                        "uid": u.uid,
                        "status_dir": None if u.elsewhere is None else str(u.elsewhere),
                        "settings_module": u.settings_module or None,
                    }
                    for u in unreached_processes(alias, "poolstatus")
                ]
        document = {
            "host": HOSTNAME,
            "pid": os.getpid(),
            "time": round(time.time(), 3),
            "status_dir": str(status.status_dir(create=False)),
            "databases": databases,
        }
        return document, errors

    def write(self, document: dict[str, Any], output_format: str, compact: bool) -> None:
        if output_format == "json":
            self.stdout.write(json.dumps(document, indent=None if compact else 2))
        else:
            self._write_text(document)

    def _write_text(self, document: dict[str, Any]) -> None:
        moment = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(document["time"]))
        self.stdout.write(f"Host {document['host']}, {moment} (poolstatus pid {document['pid']})")
        report: dict[str, dict[str, Any]] = document["databases"]
        if not report:
            self.stdout.write("No database uses ENGINE 'django_pgpool'.")
            return

        self.stdout.write("")
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                "Pools of the processes on this host (as published, at most a second ago):"
            )
        )
        headings = ["alias", "database", "pid", *(h for h, _ in POOL_COLUMNS), "oldest checkout"]
        rows: list[Row] = []
        for alias, info in report.items():
            if not info["processes"]:
                missing = NOT_HERE if info["unreached"] else NO_PROCESS
                rows.append(([alias, info["database"]["NAME"]], missing))
            for process in info["processes"]:
                for pool in process["pools"]:
                    waiting = pool["requests_waiting"] > 0
                    since = pool["paused_since"]
                    shown = {
                        "longest_wait_s": _seconds(pool["longest_wait_s"] if waiting else None),
                        "paused_since": _seconds(
                            None if since is None else max(document["time"] - since, 0.0)
                        ),
                    }
                    figures = [shown.get(key) or str(pool[key]) for _, key in POOL_COLUMNS]
                    name = pool["database"].get("dbname", "")
                    thread = _aged(pool["oldest_checkout"], "thread")
                    rows.append([alias, name, str(process["pid"]), *figures, thread])
        for line in _table(headings, {0, 1, len(headings) - 1}, rows):
            self.stdout.write(line)

        self.stdout.write("")
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                "Sessions on the server (pg_stat_activity, from every host):"
            )
        )
        headings = ["alias", "database", "host", "pid", *(h for h, _ in SERVER_COLUMNS)]
        headings += ["oldest backend", "longest idle in xact"]
        rows = []
        for alias, info in report.items():
            server = info["server"]
            if server["error"] is not None:
                rows.append(([alias, info["database"]["NAME"]], f"ERROR: {server['error']}"))
            elif not server["processes"]:
                rows.append(([alias, server["database"]], NO_SESSION))
            for process in server["processes"]:
                counts = [str(process[key]) for _, key in SERVER_COLUMNS]
                rows.append(
                    [
                        alias,
                        server["database"],
                        process["host"],
                        str(process["pid"]),
                        *counts,
                        _aged(process["oldest_backend"], "pid", "pid "),
                        _aged(process["longest_idle_in_transaction"], "pid", "pid "),
                    ]
                )
        text = {0, 1, 2, len(headings) - 2, len(headings) - 1}
        for line in _table(headings, text, rows):
            self.stdout.write(line)

        for alias, info in report.items():
            if info["unreached"]:
                unreached = [
                    Unreached(
                        u["pid"],
                        u["sessions"],
                        u["uid"],
                        None if u["status_dir"] is None else Path(u["status_dir"]),
                        u["settings_module"] or "",
                    )
                    for u in info["unreached"]
                ]
                missed = (
                    "their pools are not in the first table, and poolclose, poolpause and "
                    "poolresume don't reach them"
                )
                self.stdout.write("")
                self.stdout.write(self.style.WARNING(describe(alias, unreached, missed) + "."))

        for alias, info in report.items():
            database = info["database"]
            libpq = ", ".join(f"{key}={value}" for key, value in database["libpq"].items())
            session = ", ".join(f"{k}={v}" for k, v in database["session_settings"].items())
            since = info["pause"]["paused_since"]
            paused = "no"
            if since is not None:
                paused = (
                    f"since {describe_since(since, document['time'])} (poolpause; "
                    f"{_waiting(info['processes'])}; poolresume lends again)"
                )
            settings = [
                *((key, database[key]) for key in ("NAME", "HOST", "PORT", "USER")),
                ("libpq in effect", libpq or "-"),
                ("session settings", session or "-"),
                *info["config"].items(),
                ("paused", paused),
            ]
            width = max(len(key) for key, _ in settings)
            self.stdout.write("")
            self.stdout.write(self.style.MIGRATE_HEADING(f"{alias}:"))
            for key, value in settings:
                self.stdout.write(f"  {key.ljust(width)}  {value if value != '' else '-'}")
