"""``manage.py poolpause``: every process on this host stops lending (PgBouncer's PAUSE)."""

from __future__ import annotations

from .._pause import PauseCommand


class Command(PauseCommand):
    help = (
        "Pause the pools of each database on ENGINE 'django_pgpool' in every process on this "
        "host (PgBouncer's PAUSE), within about a second: they lend nothing until poolresume "
        "(borrowers wait, up to their timeout), close their idle connections at once and the "
        "others when they are returned. Processes that start meanwhile are paused too. For a "
        "planned switchover: poolpause --wait, move the primary, poolresume."
    )

    paused = True
