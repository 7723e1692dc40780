"""``manage.py poolresume``: every process on this host lends again (PgBouncer's RESUME)."""

from __future__ import annotations

from .._pause import PauseCommand


class Command(PauseCommand):
    help = (
        "Resume the pools of each database on ENGINE 'django_pgpool' that poolpause paused, in "
        "every process on this host (PgBouncer's RESUME), within about a second: the borrowers "
        "waiting are served first, on new connections (to wherever the settings lead now)."
    )

    paused = False
