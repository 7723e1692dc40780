"""Whether a socket has something to read, asked without giving up the GIL.

Every borrow asks it of an idle connection: a backend that was terminated
(pg_terminate_backend, a server shutdown) has said so on the socket, and a
connection that has something to read must not be handed out.

``select.poll().poll(0)`` answers in half a microsecond, but like every
blocking call in the standard library it releases the GIL around the system
call, and a thread that releases the GIL must wait for it again: with other
threads running, that wait averaged 160-260 µs on the benchmark machine, and
at eight threads the borrow's poll alone cost 20 µs of CPU per request in
thread switches. A zero-timeout poll() never blocks, so there is nothing to
gain from releasing the GIL around it. ctypes' PyDLL calls a C function with
the GIL held: the same poll(2), about 0.6 µs, and no thread switch.
"""

from __future__ import annotations

import ctypes
import select
from collections.abc import Callable

__all__ = ["input_probe"]

_EVENTS = select.POLLIN | select.POLLERR | select.POLLHUP


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def _load_poll() -> Callable[..., int] | None:
    """Return libc's poll() called with the GIL held, or None where it can't be found."""
    try:
        poll = ctypes.PyDLL(None).poll  # the process's own symbols: libc is among them
    except (OSError, AttributeError):
        return None
    # No argtypes: the caller passes ready-made values of the exact C types
    # (struct pollfd *, nfds_t, int), which ctypes then needn't convert at
    # each call (0.6 µs a call instead of 0.9 µs).
    poll.restype = ctypes.c_int
    return poll


_poll = _load_poll()


def input_probe(fd: int) -> Callable[[], bool]:
    """Return a check, for the thread that holds ``fd``, that it is readable or hung up."""
    if _poll is None:
        poller = select.poll()
        poller.register(fd, _EVENTS)
        return lambda: bool(poller.poll(0))
    poll = _poll
    pointer = ctypes.pointer(_PollFd(fd, _EVENTS, 0))
    # nfds_t is an unsigned long in glibc and musl.
    nfds, no_wait = ctypes.c_ulong(1), ctypes.c_int(0)
    # > 0: readable, error or hang-up. -1 (EINTR, ENOMEM) says nothing: the
    # next query finds out, as it would without this check.
    return lambda: poll(pointer, nfds, no_wait) > 0
