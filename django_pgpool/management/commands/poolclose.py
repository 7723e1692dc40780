"""``manage.py poolclose``: close this process's pools."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management import BaseCommand

from ... import registry
from .._common import add_database_argument, selected_aliases


class Command(BaseCommand):
    help = (
        "Close this process's pools of each database on ENGINE 'django_pgpool': idle "
        "connections now, borrowed ones when they are returned. The next query opens a "
        "new pool. Other processes' pools are not touched."
    )

    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_database_argument(parser, "Close only this database's pools")

    def handle(self, *, databases: list[str] | None, **options: Any) -> None:
        aliases = selected_aliases(databases)
        if not aliases:
            self.stdout.write("No database uses ENGINE 'django_pgpool'.")
        for alias in aliases:
            closed = registry.close_pools(alias=alias)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Closed {closed} pool{'' if closed == 1 else 's'} of database {alias!r}."
                )
            )
