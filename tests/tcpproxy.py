"""A loopback TCP proxy in front of PostgreSQL, for tests.

It counts the client's simple-query messages (psycopg2 sends one ``Q`` per
round trip), and can stall or drop the link to simulate a network fault
that a real server cannot produce by itself.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Iterator

_UNTYPED_REQUESTS = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class _QueryCounter:
    """Parses the client->server byte stream just enough to count ``Q`` messages."""

    def __init__(self) -> None:
        self.buffer = b""
        self.typed = False  # False until the startup message has gone by
        self.queries: list[str] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.typed:
                if len(self.buffer) < 8:
                    return
                (length,) = struct.unpack("!i", self.buffer[:4])
                if len(self.buffer) < length:
                    return
                (code,) = struct.unpack("!i", self.buffer[4:8])
                self.buffer = self.buffer[length:]
                if code not in _UNTYPED_REQUESTS:
                    self.typed = True
                continue
            if len(self.buffer) < 5:
                return
            kind = self.buffer[:1]
            (length,) = struct.unpack("!i", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            body = self.buffer[5 : 1 + length]
            self.buffer = self.buffer[1 + length :]
            if kind == b"Q":
                self.queries.append(body.rstrip(b"\0").decode("utf-8", "replace"))


class TcpProxy:
    """Forward 127.0.0.1:<port> to a PostgreSQL server, counting and faulting on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()  # guards _pairs, _counters and the flags
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._counters: list[_QueryCounter] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- what tests use ------------------------------------------------------

    @property
    def queries(self) -> list[str]:
        """Every simple query sent through the proxy so far, in order per connection."""
        with self._lock:
            return [q for counter in self._counters for q in counter.queries]

    def reset_counts(self) -> None:
        with self._lock:
            for counter in self._counters:
                counter.queries.clear()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def stall(self) -> None:
        """Stop forwarding bytes (the link hangs, nothing is closed)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop_all(self) -> None:
        """Close every proxied connection at once (an abrupt network loss)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stop(self) -> None:
        self._stopped = True
        self._flowing.set()
        self._listener.close()
        self.drop_all()

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[str]]:
        """Collect the queries sent inside the block."""
        self.reset_counts()
        seen: list[str] = []
        yield seen
        seen.extend(self.queries)

    # -- machinery -----------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            counter = _QueryCounter()
            with self._lock:
                self._pairs.append((client, upstream))
                self._counters.append(counter)
            threading.Thread(
                target=self._pump, args=(client, upstream, counter), daemon=True
            ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, counter: _QueryCounter) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, (upstream, counter))
        selector.register(upstream, selectors.EVENT_READ, (client, None))
        try:
            while not self._stopped:
                for key, _ in selector.select(timeout=0.2):
                    self._flowing.wait()
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    sink, parser = key.data
                    data = source.recv(65536)
                    if not data:
                        return
                    if parser is not None:
                        with self._lock:
                            parser.feed(data)
                    sink.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
