"""``manage.py poolstatus``: show the pool configuration and this process's pool figures."""

from __future__ import annotations

import json
import os
from argparse import ArgumentParser
from typing import Any

from django.core.management import BaseCommand

from ... import registry
from .._common import (
    add_database_argument,
    database_identity,
    pool_config,
    pool_stats,
    selected_aliases,
)

NO_POOL = "no pool in this process yet"

# (heading, get_stats() key) of each figure in the table, after alias and database.
COLUMNS = (
    ("size", "pool_size"),
    ("idle", "pool_available"),
    ("in use", "pool_in_use"),
    ("waiting", "requests_waiting"),
    ("requests", "requests_num"),
    ("timeouts", "requests_timeouts"),
    ("errors", "requests_errors"),
    ("opened", "connections_num"),
    ("closed", "connections_closed"),
    ("lost", "connections_lost"),
)


def _table(rows: list[tuple[str, str, list[str] | None]]) -> list[str]:
    """Return the table of pools: one row per (alias, database, figures), aligned.

    Names are left-aligned, figures right-aligned under their headings; a row
    without figures says there is no pool instead.
    """
    headings = ["alias", "database", *(heading for heading, _ in COLUMNS)]
    cells = [headings, *([alias, name, *(figures or [])] for alias, name, figures in rows)]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(headings))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for alias, name, figures in rows:
        left = f"{alias.ljust(widths[0])}  {name.ljust(widths[1])}"
        if figures is None:
            lines.append(f"{left}  {NO_POOL}")
        else:
            right = (f.rjust(w) for f, w in zip(figures, widths[2:], strict=True))
            lines.append("  ".join([left, *right]))
    return lines


class Command(BaseCommand):
    help = (
        "Show the pool configuration of each database on ENGINE 'django_pgpool' and the "
        "figures of this process's pools. Never shows a password."
    )

    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_database_argument(parser, "Show only this database")
        parser.add_argument(
            "--format",
            choices=["text", "json"],
            default="text",
            dest="output_format",
            help="Output format: aligned text (default) or one JSON document.",
        )

    def handle(self, *, databases: list[str] | None, output_format: str, **options: Any) -> None:
        report = {
            alias: {
                "config": pool_config(alias),
                "database": database_identity(alias),
                "pools": [pool_stats(entry) for entry in registry.entries(alias)],
            }
            for alias in selected_aliases(databases)
        }
        if output_format == "json":
            self.stdout.write(json.dumps({"pid": os.getpid(), "databases": report}, indent=2))
        else:
            self._write_text(report)

    def _write_text(self, report: dict[str, dict[str, Any]]) -> None:
        self.stdout.write(
            f"Pools of process {os.getpid()} (each process has its own; "
            "other processes' pools are not shown)."
        )
        if not report:
            self.stdout.write("No database uses ENGINE 'django_pgpool'.")
            return
        rows: list[tuple[str, str, list[str] | None]] = []
        for alias, info in report.items():
            if not info["pools"]:
                rows.append((alias, info["database"]["NAME"], None))
            for stats in info["pools"]:
                figures = [str(stats[key]) for _, key in COLUMNS]
                rows.append((alias, stats["database"].get("dbname", ""), figures))
        self.stdout.write("")
        for line in _table(rows):
            self.stdout.write(line)

        for alias, info in report.items():
            database = info["database"]
            options = ", ".join(f"{key}={value}" for key, value in database["OPTIONS"].items())
            settings = [
                *((key, database[key]) for key in ("NAME", "HOST", "PORT", "USER")),
                ("OPTIONS", options or "-"),
                *info["config"].items(),
            ]
            width = max(len(key) for key, _ in settings)
            self.stdout.write("")
            self.stdout.write(self.style.MIGRATE_HEADING(f"{alias}:"))
            for key, value in settings:
                self.stdout.write(f"  {key.ljust(width)}  {value if value != '' else '-'}")
