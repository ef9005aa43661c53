"""Round trips to a database server, counted on the wire by a loopback relay.

A round trip is the client asking the server for an answer and waiting for it
before it can go on: what a network's latency is paid for, once per wait.
Statements sent together and answered together (a psycopg pipeline) are one.

The relay sits between the driver and the server, forwards every byte and
counts, whatever the driver does: BEGIN and COMMIT sent outside cursors,
MySQLdb's ``SET autocommit``, a pipeline's synchronisation.

- PostgreSQL: the client's messages are read. A round trip is a message that
  asks for an answer (``Sync``, a simple ``Query``, or a ``Flush`` after
  statements not yet answered) sent while no earlier request is still
  waiting for the server's reply: requests sent back to back without reading
  in between are answered in one go.
- MySQL/MariaDB: the protocol is strictly request and answer (the client never
  sends ahead), so a round trip is each turn of the client: what it sends
  before the server's next bytes.
- SQLite runs in the process: no round trips.

Used by the benchmark and by the tests that pin the counts; it connects only
to the server it is given and serves only ``127.0.0.1``.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

_CHUNK = 65536
# PostgreSQL's untyped first messages: the SSL and GSS encryption requests.
_ENCRYPTION_REQUESTS = {80877103, 80877104}
# Frontend messages that make the server answer (Sync, Query) or flush its
# answers (Flush), and those that only queue work (Parse, Bind, Describe,
# Execute, Close).
_ANSWERED = {ord("S"), ord("Q")}
_FLUSH = ord("H")
_QUEUED = {ord("P"), ord("B"), ord("D"), ord("E"), ord("C")}


class RoundTrips:
    """The round trips counted so far."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> int:
        """Return the count so far and start again from zero."""
        counted, self.count = self.count, 0
        return counted


class RoundTripRelay:
    """A TCP relay on ``127.0.0.1`` to ``host:port`` that counts round trips.

    ``protocol`` is ``"postgresql"`` or ``"mysql"``. One thread serves every
    connection with a selector; :meth:`close` (or the context manager) stops it.
    """

    def __init__(self, host: str, port: int, protocol: str) -> None:
        self.upstream = (host, port)
        self.protocol = protocol
        self.counter = RoundTrips()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="round-trip relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        self._thread.join(timeout=10)
        self._wake_writer.close()

    def __enter__(self) -> RoundTripRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        pairs: dict[socket.socket, _Pair] = {}
        try:
            while not self._closing:
                for event, _ in self._selector.select(timeout=1):
                    if event.data == "wake":
                        continue
                    if event.data is None:
                        self._accept(pairs)
                    elif event.fileobj in pairs:  # not closed earlier in this round
                        self._pump(event.fileobj, event.data, pairs)  # type: ignore[arg-type]
        finally:
            for sock in list(pairs):
                sock.close()
            self._selector.close()
            self._listener.close()
            self._wake_reader.close()

    def _accept(self, pairs: dict[socket.socket, _Pair]) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(self.upstream)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, server)
        pairs[client] = pairs[server] = pair
        self._selector.register(client, selectors.EVENT_READ, pair)
        self._selector.register(server, selectors.EVENT_READ, pair)

    def _pump(self, source: socket.socket, pair: _Pair, pairs: dict[socket.socket, _Pair]) -> None:
        try:
            data = source.recv(_CHUNK)
        except OSError:
            data = b""
        if not data:
            for sock in (pair.client, pair.server):
                self._selector.unregister(sock)
                pairs.pop(sock, None)
                sock.close()
            return
        # Counted before forwarding: the client's next request can only follow.
        if source is pair.server:
            pair.answered()
            pair.client.sendall(data)
            return
        if self.protocol == "postgresql":
            self.counter.count += pair.postgresql_requests(data)
        else:
            self.counter.count += pair.turn()
        pair.server.sendall(data)


class _Pair:
    """A client's connection, its connection to the server, and what is pending."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.waiting = False  # a request was sent and the server has not spoken since
        self.queued = False  # statements sent since the server last spoke
        self.client_spoke_last = False
        self.buffer = b""
        self.startup = True  # PostgreSQL's first messages carry no type byte

    def answered(self) -> None:
        self.waiting = self.queued = False
        self.client_spoke_last = False

    def turn(self) -> int:
        counted = 0 if self.client_spoke_last else 1
        self.client_spoke_last = True
        return counted

    def postgresql_requests(self, data: bytes) -> int:
        """The round trips that ``data`` from the client starts."""
        self.buffer += data
        counted = 0
        while True:
            kind, length = self._next_message()
            if kind is None:
                return counted
            self.buffer = self.buffer[length:]
            if kind in _QUEUED:
                self.queued = True
            asks = kind in _ANSWERED or (kind == _FLUSH and self.queued)
            if asks and not self.waiting:
                counted += 1
            self.waiting = self.waiting or asks

    def _next_message(self) -> tuple[int | None, int]:
        if self.startup:
            if len(self.buffer) < 8:
                return None, 0
            length, code = struct.unpack("!ii", self.buffer[:8])
            if len(self.buffer) < length:
                return None, 0
            self.startup = code in _ENCRYPTION_REQUESTS  # the startup message proper ends it
            return -1, length
        if len(self.buffer) < 5:
            return None, 0
        length = struct.unpack("!i", self.buffer[1:5])[0] + 1
        if len(self.buffer) < length:
            return None, 0
        return self.buffer[0], length


@contextlib.contextmanager
def round_trips(connection: BaseDatabaseWrapper) -> Iterator[RoundTrips | None]:
    """Route ``connection`` through a relay while in the block (``None`` on SQLite).

    The connection is closed on entry and on exit, so that it reconnects
    through the relay and then directly again. PostgreSQL's connection is
    made without TLS while relayed (the relay reads its messages).
    """
    if connection.vendor == "sqlite":
        yield None
        return
    connection = connections[connection.alias]  # not django.db.connection's proxy
    settings: dict[str, Any] = connection.settings_dict
    default_port = {"postgresql": 5432, "mysql": 3306}[connection.vendor]
    upstream = (settings.get("HOST") or "127.0.0.1", int(settings.get("PORT") or default_port))
    saved = (settings.get("HOST"), settings.get("PORT"), settings.get("OPTIONS"))
    connection.close()
    with RoundTripRelay(*upstream, connection.vendor) as relay:
        settings["HOST"], settings["PORT"] = "127.0.0.1", str(relay.port)
        if connection.vendor == "postgresql":
            settings["OPTIONS"] = {**(settings.get("OPTIONS") or {}), "sslmode": "disable"}
        try:
            yield relay.counter
        finally:
            connection.close()
            settings["HOST"], settings["PORT"], settings["OPTIONS"] = saved
