"""Report, in a response header, which PostgreSQL backend served the request."""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection
from django.http import HttpRequest, HttpResponse

HEADER = "X-Backend-Pid"


def current_backend_pid() -> int | None:
    """The server pid of this thread's open connection, or None; costs no round trip."""
    conn = connection.connection
    if conn is None or conn.closed:
        return None
    pid: int = conn.info.backend_pid  # libpq's PQbackendPID(): known since connect
    return pid


class BackendPidMiddleware:
    """Add ``X-Backend-Pid`` to every response whose request used the database.

    The connection is still borrowed here: it goes back to the pool when the
    response is closed (Django's request_finished signal).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if HEADER not in response:
            pid = current_backend_pid()
            if pid:
                response[HEADER] = str(pid)
        return response
