"""Inspection API: JSON lines over a Unix stream socket.

Protocol: one JSON object per line in, one JSON line out, in order. Requests
look like `{"cmd": "ping"}` or `{"cmd": "stat"}`; answers are objects, errors
`{"ok": false, "error": "<reason>"}`. A client may pipeline requests; `toe stat`
(cli.api_request) sends one line and reads one line.

The server lives inside the daemon's single-threaded epoll loop (level
triggered), so nothing here may block or grow without bound:

* every socket is nonblocking; a client is read only while it has no answer
  pending (EPOLLIN interest), and written only while it has (EPOLLOUT
  interest), so a client that does not read stops being read and costs
  nothing until it drains -- or is dropped once its pending output exceeds
  `max_output`;
* a request line is at most `max_request` bytes (newline excluded); a longer
  one, with or without its newline, gets an error answer if the socket takes
  it and the client is dropped; reads never ask for more than that bound;
* lines are checked for nesting depth (outside strings) before `json.loads`,
  so a deep `[[[[...` is an error answer, not a RecursionError;
* a handler that raises answers `internal error: <type>`, is logged (one line
  on stderr, the daemon's log) and counted, and its client is dropped; an
  unexpected exception anywhere in here drops only the client concerned.

Bad requests (not JSON, not an object, too deep, or the handler raising
`RequestError`) are answered with an error and the connection stays open.
"""

from __future__ import annotations

import errno
import json
import re
import select
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nic_model.counters import UnitCounters

from .access import peer_creds

MAX_DEPTH = 8             # nesting of arrays/objects allowed in a request
ACCEPTS_PER_EVENT = 64    # the listening socket is level triggered: the rest come next round
_EP_IN = select.EPOLLIN
_EP_OUT = select.EPOLLOUT
_SPECIAL = re.compile(rb'["\\\[\]{}]')


class RequestError(Exception):
    """Raised by a handler for a request it will not answer (unknown command...):
    answered as {"ok": false, "error": str(e)}, counted as a bad request, client kept."""


@dataclass(frozen=True)
class Peer:
    """The client process, from SO_PEERCRED / SO_PEERGROUPS at accept."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


Handler = Callable[[dict[str, Any], Peer], dict[str, Any]]


@dataclass
class ApiCounters(UnitCounters):
    """The inspection API's counters (`snapshot()` -> {name: value}, as the adapter's units)."""

    accepted: int = 0
    refused: int = 0            # closed at accept: max_clients reached
    denied: int = 0             # closed at accept: allowed(peer) said no
    accept_errors: int = 0
    requests: int = 0           # lines answered by the handler
    bad_requests: int = 0       # not JSON / not an object / too deep / RequestError
    dropped_slow: int = 0       # pending output over max_output
    dropped_oversize: int = 0   # request line over max_request
    handler_errors: int = 0     # handler (or its answer's encoding) raised; client dropped
    internal_errors: int = 0    # a bug in this module; client dropped
    disconnects: int = 0        # EOF or socket error from the client


def nesting_exceeds(line: bytes, limit: int = MAX_DEPTH) -> bool:
    """True if arrays/objects in `line` nest deeper than `limit` (outside strings).

    Iterative and linear; it looks only at quotes, backslashes and brackets.
    Unbalanced or malformed input is left to json.loads to reject."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    depth = 0
    in_string = False
    skip = -1                      # position of a character escaped by a backslash
    for m in _SPECIAL.finditer(line):
        pos = m.start()
        if pos == skip:
            continue
        c = line[pos]
        if in_string:
            if c == 0x5C:          # backslash
                skip = pos + 1
            elif c == 0x22:        # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):    # [ {
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):    # ] }
            depth -= 1
    return False


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line -> dict; ValueError (a readable reason) otherwise."""
    if nesting_exceeds(line):
        raise ValueError(f"request nests deeper than {MAX_DEPTH} levels")
    try:
        req = json.loads(line)
    except RecursionError:
        raise ValueError(f"request nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:        # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"request is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise ValueError(f"request is {type(req).__name__}, not a JSON object")
    return req


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _exc(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:              # a __str__ that raises
        return type(e).__name__


def _log(msg: str) -> None:
    try:
        print("toe: api: " + " ".join(msg.split()), file=sys.stderr, flush=True)
    except Exception:
        pass


class _Client:
    __slots__ = ("sock", "fd", "peer", "inbuf", "out", "sent", "mask")

    def __init__(self, sock: socket.socket, peer: Peer):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()   # at most max_request + 1 bytes of a partial line, or unprocessed lines
        self.out = b""             # the answer being sent (one at a time)
        self.sent = 0
        self.mask = _EP_IN

    @property
    def pending(self) -> int:
        return len(self.out) - self.sent


class _Drop(Exception):
    """Internal: drop this client (the reason is already counted)."""


class ApiServer:
    def __init__(self, sock: socket.socket, handler: Handler, ep: select.epoll, *, max_clients: int = 64,
                 max_request: int = 4096, max_output: int = 64 << 20,
                 allowed: Callable[[Peer], bool] | None = None):
        """`sock`: a bound, listening, nonblocking AF_UNIX SOCK_STREAM socket (the caller made it and
        owns its path). `handler(req, peer) -> dict` answers one request and may raise anything.
        `allowed(peer) -> bool`: peers it refuses are closed at accept. Registers `sock` and every
        client in `ep`; the caller routes events for fds it `owns()` to `event()`."""
        sock.setblocking(False)
        self.sock = sock
        self.listen_fd = sock.fileno()
        self.handler = handler
        self.ep = ep
        self.max_clients = max_clients
        self.max_request = max_request
        self.max_output = max_output
        self.allowed = allowed
        self.counters = ApiCounters()
        self.clients: dict[int, _Client] = {}
        self._accept_failing = False
        ep.register(self.listen_fd, _EP_IN)

    # ------------------------------------------------------------------ loop side

    def owns(self, fd: int) -> bool:
        return fd == self.listen_fd or fd in self.clients

    def event(self, fd: int, ev: int) -> None:
        """Handle one epoll event on an fd we own. Never raises, never blocks."""
        if fd == self.listen_fd:
            try:
                self._accept()
            except Exception as e:  # the loop must survive
                self.counters.internal_errors += 1
                _log(f"accept: internal error: {_exc(e)}")
            return
        c = self.clients.get(fd)
        if c is None:
            return
        try:
            if c.pending:
                self._flush(c)
                if not c.pending:
                    self._process(c)
            else:
                self._read(c)
                self._process(c)
            self._set_mask(c)
        except _Drop:
            self._drop(c)
        except Exception as e:  # one client's trouble is not the daemon's
            self.counters.internal_errors += 1
            _log(f"client pid {c.peer.pid}: internal error: {_exc(e)}; dropped")
            self._drop(c)

    def close(self) -> None:
        """Drop every client and close the listening socket (its path is the caller's to unlink)."""
        for c in list(self.clients.values()):
            self._drop(c)
        if self.sock.fileno() == -1:
            return
        try:
            self.ep.unregister(self.listen_fd)
        except (OSError, ValueError):
            pass
        self.sock.close()

    # ------------------------------------------------------------------ accept

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ECONNABORTED and friends: that one connection is gone, try the next.
                # EMFILE/ENFILE: the connection stays queued; level triggering retries it.
                self.counters.accept_errors += 1
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._accept_failing:   # one log line per episode, not one per loop round
                        _log(f"accept: {e.strerror or e} (counted in accept_errors until it passes)")
                        self._accept_failing = True
                    return
                continue
            self._accept_failing = False
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        if len(self.clients) >= self.max_clients:
            self.counters.refused += 1
            conn.close()
            return
        try:
            conn.setblocking(False)
            pid, uid, gid, groups = peer_creds(conn)
        except OSError:
            self.counters.accept_errors += 1
            conn.close()
            return
        peer = Peer(pid, uid, gid, tuple(groups))
        if self.allowed is not None:
            try:
                ok = bool(self.allowed(peer))
            except Exception as e:
                self.counters.handler_errors += 1
                _log(f"allowed({peer}): {_exc(e)}; refused")
                ok = False
            if not ok:
                self.counters.denied += 1
                conn.close()
                return
        c = _Client(conn, peer)
        try:
            self.ep.register(c.fd, c.mask)
        except OSError as e:
            self.counters.accept_errors += 1
            _log(f"epoll register: {e.strerror or e}")
            conn.close()
            return
        self.clients[c.fd] = c
        self.counters.accepted += 1

    # ------------------------------------------------------------------ one client

    def _read(self, c: _Client) -> None:
        # A partial line never exceeds max_request (else it was dropped), so this is >= 1:
        # enough to complete a line of the maximum length, or to prove it is longer.
        want = self.max_request + 1 - len(c.inbuf)
        try:
            data = c.sock.recv(max(1, want))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.counters.disconnects += 1
            raise _Drop from None
        if not data:
            self.counters.disconnects += 1
            raise _Drop
        c.inbuf += data

    def _process(self, c: _Client) -> None:
        """Answer complete lines in order until one answer cannot be sent at once."""
        while not c.pending:
            nl = c.inbuf.find(b"\n", 0, self.max_request + 1)
            if nl < 0:
                if len(c.inbuf) > self.max_request:
                    self._oversize(c)
                return
            line = bytes(c.inbuf[:nl])
            del c.inbuf[:nl + 1]
            self._answer(c, line)

    def _answer(self, c: _Client, line: bytes) -> None:
        try:
            req = parse_request(line)
        except ValueError as e:
            self.counters.bad_requests += 1
            self._queue(c, _encode({"ok": False, "error": str(e)}))
            return
        try:
            out = _encode(self.handler(req, c.peer))
        except RequestError as e:
            self.counters.bad_requests += 1
            self._queue(c, _encode({"ok": False, "error": str(e)}))
            return
        except Exception as e:  # the handler may raise anything
            self.counters.handler_errors += 1
            _log(f"client pid {c.peer.pid} uid {c.peer.uid}: request {_brief(line)} raised {_exc(e)}; dropped")
            self._last_word(c, {"ok": False, "error": f"internal error: {type(e).__name__}"})
            raise _Drop from None
        self.counters.requests += 1
        self._queue(c, out)

    def _oversize(self, c: _Client) -> None:
        self.counters.dropped_oversize += 1
        self._last_word(c, {"ok": False, "error": f"request too long (limit {self.max_request} bytes)"})
        raise _Drop

    def _queue(self, c: _Client, out: bytes) -> None:
        c.out, c.sent = out, 0
        self._flush(c)
        if c.pending > self.max_output:
            self.counters.dropped_slow += 1
            raise _Drop

    def _flush(self, c: _Client) -> None:
        if not c.pending:
            return
        try:
            with memoryview(c.out) as mv:
                c.sent += c.sock.send(mv[c.sent:], socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.counters.disconnects += 1
            raise _Drop from None
        if not c.pending:
            c.out, c.sent = b"", 0

    def _last_word(self, c: _Client, answer: dict[str, Any]) -> None:
        """Best effort before a drop: one nonblocking send, whatever fits."""
        if c.pending:
            return                 # an answer is half sent: another line would corrupt it
        try:
            c.sock.send(_encode(answer), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _set_mask(self, c: _Client) -> None:
        # Level triggered: interest must follow the state, or the loop spins on a readable
        # client we do not want to read (answer pending) or a writable one with nothing to send.
        mask = _EP_OUT if c.pending else _EP_IN
        if mask != c.mask:
            self.ep.modify(c.fd, mask)
            c.mask = mask

    def _drop(self, c: _Client) -> None:
        self.clients.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass


def _brief(line: bytes, limit: int = 80) -> str:
    s = line[:limit].decode(errors="replace")
    return repr(s + ("..." if len(line) > limit else ""))
