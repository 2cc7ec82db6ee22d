"""A TCP forwarder on loopback that can be cut and restored: a lost endpoint, for real.

Clients connect to the proxy's port; it forwards bytes to the target. ``cut()``
closes every open connection and refuses new ones (each accepted socket is
closed at once) until ``restore()``; the port stays the same, as a network
outage would leave it.
"""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._clients: set[socket.socket] = set()
        self._closed = False
        self._budget: int | None = None  # bytes still let through before a cut
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, n_bytes: int) -> None:
        """Cut once ``n_bytes`` more have gone from clients to the target."""
        with self._lock:
            self._budget = n_bytes

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def restore(self) -> None:
        with self._lock:
            self._budget = None
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
                self._clients.add(client)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _spend(self, n: int) -> bool:
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= n
            return self._budget < 0

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._up.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if src in self._clients and self._spend(len(data)):
                    self.cut()
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
