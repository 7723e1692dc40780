"""Who a pooled session belongs to: this host's name and the tag in application_name.

Every pooled session carries ``[pgpool <alias>@<host>:<pid>]`` at the end of
its application_name, so that the server's view (pg_stat_activity) tells
whose connection it is, across hosts. The ENGINE writes the tag, the status
snapshots and the management commands read it: it lives here so that none of
them imports another for it.
"""

from __future__ import annotations

import os
import re
import socket

__all__ = ["HOSTNAME", "TAG_PATTERN", "application_name"]

HOSTNAME = socket.gethostname()
TAG_PATTERN = re.compile(r"\[pgpool (?P<alias>[^@\]]+)@(?P<host>[^:\]]*):(?P<pid>\d+)\]$")
_APPLICATION_NAME_MAX = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1)


def application_name(alias: str, own: str | None) -> str:
    """Return ``"<own name> [pgpool <alias>@<host>:<pid>]"``, shortened to fit 63 bytes."""
    tag = f"[pgpool {alias[:20]}@{HOSTNAME[:24]}:{os.getpid()}]"
    if not own:
        return tag
    room = _APPLICATION_NAME_MAX - len(tag.encode()) - 1
    shortened = own.encode()[:room].decode(errors="ignore")
    return f"{shortened} {tag}" if shortened else tag
