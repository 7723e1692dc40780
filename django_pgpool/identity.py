"""Who a pooled session belongs to, and which database it reaches.

Every pooled session carries ``[pgpool <alias>@<host>:<pid>]`` at the end of
its application_name, so that the server's view (pg_stat_activity) tells
whose connection it is, across hosts. The ENGINE writes the tag, the status
snapshots and the management commands read it: it lives here so that none of
them imports another for it.

``database_key()`` names the database a set of connect parameters reaches
(``user@host:port/dbname``, never a password): what a worker and a command
share even when they run under different settings modules, so that the
default status directory is named after the databases, not the module.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg2
import psycopg2.extensions

__all__ = [
    "HOSTNAME",
    "TAG_PATTERN",
    "application_name",
    "database_key",
    "databases_key",
    "settings_params",
]

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


_IDENTITY = ("dbname", "host", "port", "user", "service")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container)
        return str(os.getuid())


def database_key(params: Mapping[str, Any]) -> str:
    """Return ``"user@host:port/dbname"`` (``"?service=name"`` added if one is used).

    ``params``: libpq connect parameters (only dbname, host, port, user and
    service are read). What is not given is what libpq would use in this
    process: its environment variables (PGHOST, PGPORT, PGUSER, PGDATABASE,
    PGSERVICE), then its defaults. A dbname that is a connection string is
    read as one (only those five keys: never its password).
    """
    values = {key: str(params.get(key) or "") for key in _IDENTITY}
    if "=" in values["dbname"] or "://" in values["dbname"]:
        try:
            given = psycopg2.extensions.parse_dsn(values["dbname"])
        except psycopg2.ProgrammingError:
            given = {}
        values["dbname"] = ""
        values.update({key: str(given[key]) for key in _IDENTITY if given.get(key)})
    for key, variable in (
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("dbname", "PGDATABASE"),
        ("service", "PGSERVICE"),
    ):
        values[key] = values[key] or os.environ.get(variable, "")
    if not values["service"]:  # a service file may set them
        values["port"] = values["port"] or "5432"
        values["user"] = values["user"] or _os_user()
        values["dbname"] = values["dbname"] or values["user"]
    key = f"{values['user']}@{values['host']}:{values['port']}/{values['dbname']}"
    return f"{key}?service={values['service']}" if values["service"] else key


def settings_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the identity part of the connect parameters of a DATABASES entry.

    As Django's postgresql get_connection_params() makes them: OPTIONS first,
    then NAME (None: 'postgres'), USER, HOST and PORT when set.
    """
    options = config.get("OPTIONS") or {}
    params = {key: options.get(key) for key in _IDENTITY}
    name = config.get("NAME")
    params["dbname"] = "postgres" if name is None else (name or params["dbname"])
    for key, setting in (("user", "USER"), ("host", "HOST"), ("port", "PORT")):
        if config.get(setting):
            params[key] = config[setting]
    return params


def databases_key(databases: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """Return a directory name for these (alias, DATABASES entry) pairs: what they reach.

    ``"<database name>-<12 hex digits>"``: the digits hash every alias with its
    database_key(); the name (of the first alias in alphabetical order) is
    there for people.
    """
    pairs = sorted((alias, database_key(settings_params(config))) for alias, config in databases)
    digest = hashlib.blake2b(repr(pairs).encode(), digest_size=6).hexdigest()
    first = pairs[0][1].split("?")[0].rsplit("/", 1)[-1] if pairs else "none"
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", first)[:40].lstrip(".") or "db"
    return f"{readable}-{digest}"
