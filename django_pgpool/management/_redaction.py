"""What the commands may show of a database: never a password, nor anything that may hold one.

The PASSWORD setting is never shown (only searched for in error messages,
to hide it), and OPTIONS values are shown only for keys known to hold no
secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError

from ..options import POOL_KEYS, PSYCOPG2_KEYS
from ._aliases import database_wrapper

__all__ = [
    "HIDDEN",
    "SHOWN_OPTIONS",
    "database_identity",
    "libpq_in_effect",
    "one_line",
    "session_settings",
    "shown_database",
    "shown_name",
    "shown_options",
]


#: What is shown in place of an OPTIONS value that may hold a secret.
HIDDEN = "<hidden>"

#: OPTIONS keys (besides the pool's own) whose values are shown. Any other
#: key may hold a secret (password, passfile, sslpassword, sslkey, a service
#: file...) and is shown by name only.
SHOWN_OPTIONS = frozenset(
    {
        "application_name",
        "assume_role",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "gssencmode",
        "isolation_level",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "load_balance_hosts",
        "options",
        "server_side_binding",
        "sslmode",
        "target_session_attrs",
        "tcp_user_timeout",
    }
)


def shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the OPTIONS that go to libpq, with every value that may be a secret hidden."""
    return {
        str(key): (value if key in SHOWN_OPTIONS else HIDDEN)
        for key, value in options.items()
        if key not in POOL_KEYS
    }


#: libpq parameters left out of libpq_in_effect(): shown as NAME, HOST, PORT and USER.
_IDENTITY_PARAMS = frozenset({"dbname", "host", "port", "user"})


def libpq_in_effect(alias: str) -> dict[str, Any]:
    """Return the libpq parameters the alias's pools connect with, secrets hidden.

    What the ENGINE adds is there (client_encoding, connect_timeout, TCP
    keepalives, the application_name tag, whose pid is each process's own:
    ``<pid>``), not the database's identity (NAME, HOST, PORT, USER) nor
    psycopg2's own arguments (cursor_factory).
    """
    wrapper = database_wrapper(alias)
    try:
        params = wrapper._pooled_connection_params(wrapper.pool_options())
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc
    shown = {
        key: value if key in SHOWN_OPTIONS else HIDDEN
        for key, value in sorted(params.items())
        if key not in _IDENTITY_PARAMS and key not in PSYCOPG2_KEYS
    }
    if isinstance(shown.get("application_name"), str):
        shown["application_name"] = shown["application_name"].replace(f":{os.getpid()}]", ":<pid>]")
    return shown


def session_settings(alias: str) -> dict[str, str]:
    """Return the settings each pooled session is given at connect (TimeZone, role)."""
    return database_wrapper(alias)._session_settings()


def shown_name(name: str) -> str:
    # libpq takes a dbname holding "=" or a postgres:// URI as a connection
    # string, which may carry a password.
    return HIDDEN if "=" in name or "://" in name else name


def database_identity(alias: str) -> dict[str, Any]:
    """Return the database an alias reaches (NAME, HOST, PORT, USER, OPTIONS), no password."""
    settings_dict = database_wrapper(alias).settings_dict
    identity: dict[str, Any] = {
        key: str(settings_dict.get(key) or "") for key in ("NAME", "HOST", "PORT", "USER")
    }
    identity["NAME"] = shown_name(identity["NAME"])
    identity["OPTIONS"] = shown_options(settings_dict.get("OPTIONS") or {})
    return identity


def shown_database(database: Mapping[str, Any]) -> dict[str, str]:
    shown = {str(key): str(value) for key, value in database.items()}
    if "dbname" in shown:
        shown["dbname"] = shown_name(shown["dbname"])
    return shown


def one_line(exc: BaseException, alias: str) -> str:
    """Return an error's message on one line, with what poolstatus hides hidden.

    libpq's messages may name a service, a key file or a connection string
    given in the settings; the command shows those as "<hidden>".
    """
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    settings_dict = database_wrapper(alias).settings_dict
    name = str(settings_dict.get("NAME") or "")
    hidden = [settings_dict.get("PASSWORD"), name if shown_name(name) == HIDDEN else None]
    options = settings_dict.get("OPTIONS") or {}
    hidden += [
        value for key, value in options.items() if shown_options({key: value}).get(key) == HIDDEN
    ]
    for value in hidden:
        if value is not None and len(str(value)) >= 4:  # shorter: no secret, and too common
            text = text.replace(str(value), HIDDEN)
    return text
