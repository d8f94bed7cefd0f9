"""A TCP relay between clients and a server whose open connections can be made to go silent:
nothing forwarded, nothing closed, as when a NAT or firewall forgets a connection or a failover
leaves it half-open. Connections opened afterwards work. Both ends' kernels stay up, so TCP
keepalives are answered: only the applications can tell that nothing comes through."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class SilentNetwork:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="silent-network", daemon=True).start()

    def silence(self) -> int:
        """Silence every connection open now; returns how many."""
        with self._lock:
            for _, _, silent in self._pairs:
                silent.set()
            return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for client, server, _ in self._pairs:
                for end in (client, server):
                    with contextlib.suppress(OSError):
                        end.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            pair = (client, server, threading.Event())
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._forward, args=pair, daemon=True).start()

    def _forward(
        self, client: socket.socket, server: socket.socket, silent: threading.Event
    ) -> None:
        other = {client: server, server: client}
        while not self._closed.is_set() and not silent.is_set():
            try:
                readable, _, _ = select.select([client, server], [], [], 0.05)
                for end in readable:
                    if silent.is_set():
                        return  # what arrived stays unread, as on a dead path
                    data = end.recv(65536)
                    if not data:
                        other[end].shutdown(socket.SHUT_WR)
                        return
                    other[end].sendall(data)
            except OSError:
                return
