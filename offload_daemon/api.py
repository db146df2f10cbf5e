"""Inspection API: JSON lines over a Unix stream socket.

Requests are one JSON object per line, `{"cmd": "ping"}` or `{"cmd": "stat"}`;
each gets one JSON line back. `toe stat` is a client of this API only.
"""

from __future__ import annotations

import json
import os
import socket

from .host import unix_listener


class ApiServer:
    def __init__(self, path: str, handler):
        """`handler(request: dict) -> dict` answers one request."""
        self.path = path
        self.handler = handler
        self.sock = unix_listener(path, socket.SOCK_STREAM, 16)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(False)
        self.clients[conn.fileno()] = (conn, bytearray())
        return conn

    def serve(self, fd: int) -> bool:
        """Answer complete request lines; False when the client is gone."""
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.drop(fd)
            return False
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("request is not an object")
                rsp = self.handler(req)
            except (ValueError, KeyError) as e:
                rsp = {"ok": False, "error": str(e)}
            out = json.dumps(rsp).encode() + b"\n"
            conn.setblocking(True)
            try:
                conn.sendall(out)
            except OSError:
                self.drop(fd)
                return False
            finally:
                if fd in self.clients:
                    conn.setblocking(False)
        return True

    def drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd, (None, None))
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self.drop(fd)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
