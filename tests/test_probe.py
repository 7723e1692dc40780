"""The borrow-time check of an idle connection's socket (django_pgpool.probe)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from django_pgpool import probe


@pytest.fixture(params=["libc", "select.poll"])
def which(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "select.poll":
        monkeypatch.setattr(probe, "_poll", None)  # where libc's poll() can't be loaded
    else:
        assert probe._poll is not None, "libc's poll() should load on Linux"
    yield request.param


def test_quiet_socket_is_not_readable(which: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert probe.input_probe(ours.fileno())() is False


def test_data_from_the_peer_is_seen(which: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        check = probe.input_probe(ours.fileno())
        theirs.sendall(b"E")  # as a backend's FATAL error message would
        assert check() is True
        ours.recv(1)
        assert check() is False


def test_hang_up_is_seen(which: str) -> None:
    ours, theirs = socket.socketpair()
    with ours:
        check = probe.input_probe(ours.fileno())
        theirs.close()
        assert check() is True
