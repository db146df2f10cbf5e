"""The inspection API server against misbehaving clients (no root needed).

Each test drives a real ApiServer with a real (level-triggered) epoll and a
listening Unix socket in tmp_path, one `pump` at a time, as the daemon's loop
would. Nothing here measures time: "the server never blocks" is shown by
every pump returning (a blocking send would hang the test until the pytest
timeout) and by another client being answered meanwhile.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from offload_daemon import api as apimod
from offload_daemon.api import ApiServer, Peer, RequestError, nesting_exceeds, parse_request
from offload_daemon.client import inspection as cli

MB = 1 << 20


def echo_handler(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd == "ping":
        return {"ok": True, "pid": peer.pid, "uid": peer.uid, "gid": peer.gid}
    if cmd == "echo":
        return {"ok": True, "n": req.get("n")}
    if cmd == "big":
        return {"ok": True, "n": req.get("n"), "blob": "x" * MB}
    if cmd == "boom":
        raise KeyError("boom")
    if cmd == "unencodable":
        return {"ok": True, "x": object()}
    if cmd == "nope":
        raise RequestError(f"unknown command {cmd!r}")
    return {"ok": True, "req": req}


def pump(server: ApiServer, ep: select.epoll, rounds: int = 10) -> int:
    """Run `rounds` nonblocking rounds of the daemon's loop; return the events handled."""
    handled = 0
    for _ in range(rounds):
        for fd, ev in ep.poll(0):
            assert server.owns(fd), f"event on fd {fd} that the server does not own"
            server.event(fd, ev)
            handled += 1
    return handled


class Rig:
    def __init__(self, path: str, server: ApiServer, ep: select.epoll):
        self.path, self.server, self.ep = path, server, ep
        self.socks: list[socket.socket] = []

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.setblocking(False)
        self.socks.append(s)
        pump(self.server, self.ep, 2)
        return s

    def pump(self, rounds: int = 10) -> int:
        return pump(self.server, self.ep, rounds)

    def send(self, s: socket.socket, data: bytes) -> int:
        """Send `data` from a nonblocking client, pumping the server while the socket is full;
        stops early if the server closes the connection. -> bytes sent."""
        view, sent = memoryview(data), 0
        for _ in range(100000):
            if sent == len(data):
                break
            try:
                sent += s.send(view[sent:])
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            self.pump(1)
        return sent

    def request(self, s: socket.socket, *reqs: Any) -> None:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in reqs)
        assert self.send(s, data) == len(data)

    def read(self, s: socket.socket, n: int = 1, rounds: int = 20000) -> tuple[list[Any], bool]:
        """Pump and read until `n` answer lines or EOF; -> (answers, eof)."""
        buf = bytearray()
        eof = False
        for _ in range(rounds):
            if buf.count(b"\n") >= n:
                break
            self.pump(1)
            try:
                chunk = s.recv(4 * MB)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            buf += chunk
        lines = bytes(buf).split(b"\n")
        rest = lines.pop()
        assert not rest, f"half an answer line: {rest[:80]!r}"
        return [json.loads(x) for x in lines], eof

    def call(self, s: socket.socket, req: Any) -> Any:
        self.request(s, req)
        answers, eof = self.read(s, 1)
        assert len(answers) == 1 and not eof, (answers, eof)
        return answers[0]

    def gone(self, s: socket.socket) -> bool:
        """The server has closed `s` (after whatever it had sent, which is discarded)."""
        for _ in range(200):
            self.pump(1)
            try:
                if not s.recv(4 * MB):
                    return True
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
        return False


@pytest.fixture
def make_rig(tmp_path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(handler=echo_handler, **kw: Any) -> Rig:
        path = str(tmp_path / f"api{len(made)}.sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        ls.bind(path)
        ls.listen(16)
        ep = select.epoll()
        rig = Rig(path, ApiServer(ls, handler, ep, **kw), ep)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        for s in rig.socks:
            s.close()
        rig.server.close()
        assert not rig.server.clients
        rig.ep.close()


# ---------------------------------------------------------------- the protocol


def test_ping_is_answered_with_the_peer_credentials(make_rig):
    rig = make_rig()
    s = rig.connect()
    assert rig.call(s, {"cmd": "ping"}) == {"ok": True, "pid": os.getpid(), "uid": os.getuid(),
                                            "gid": os.getgid()}
    assert rig.call(s, {"cmd": "ping"})["ok"]  # the connection stays open for more
    snap = rig.server.counters.snapshot()
    assert snap["accepted"] == 1 and snap["requests"] == 2
    assert all(isinstance(v, int) for v in snap.values())


def test_pipelined_requests_are_answered_in_order(make_rig):
    rig = make_rig()
    s = rig.connect()
    rig.request(s, *({"cmd": "echo", "n": i} for i in range(50)))
    answers, eof = rig.read(s, 50)
    assert not eof
    assert [a["n"] for a in answers] == list(range(50))


def test_half_closed_client_still_gets_its_answer(make_rig):
    rig = make_rig()
    s = rig.connect()
    rig.request(s, {"cmd": "echo", "n": 7})
    s.shutdown(socket.SHUT_WR)
    answers, eof = rig.read(s, 2)
    assert [a["n"] for a in answers] == [7] and eof
    assert not rig.server.clients
    assert rig.server.counters.disconnects == 1


@pytest.mark.parametrize("line", [b"[1, 2]", b'"stat"', b"42", b"null", b"not json", b"{\"cmd\":", b"",
                                  b"\xff\xfe{}", b'{"cmd": "\xff"}'])
def test_non_object_requests_get_an_error_and_keep_the_connection(make_rig, line):
    rig = make_rig()
    s = rig.connect()
    s.send(line + b"\n")
    answers, eof = rig.read(s, 1)
    assert not eof and len(answers) == 1
    assert answers[0]["ok"] is False and answers[0]["error"]
    assert rig.call(s, {"cmd": "echo", "n": 1})["n"] == 1
    assert rig.server.counters.bad_requests == 1


def test_request_error_is_answered_and_the_client_kept(make_rig):
    rig = make_rig()
    s = rig.connect()
    assert rig.call(s, {"cmd": "nope"}) == {"ok": False, "error": "unknown command 'nope'"}
    assert rig.call(s, {"cmd": "echo", "n": 2})["n"] == 2
    assert rig.server.counters.bad_requests == 1 and rig.server.counters.handler_errors == 0


def test_toe_stat_client_works_unchanged(make_rig, monkeypatch):
    """cli.api_request (what `toe stat` uses) against the server, pumped from a thread."""
    rig = make_rig()
    monkeypatch.setattr(cli, "api_path", lambda tap: rig.path)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for fd, ev in rig.ep.poll(0.01):
                rig.server.event(fd, ev)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        assert cli.api_call("toe0", {"cmd": "ping"}, timeout=10)["pid"] == os.getpid()
        assert json.loads(cli.api_request("toe0", {"cmd": "stat"}, timeout=10))["req"] == {"cmd": "stat"}
        assert cli.api_pings("toe0")
    finally:
        stop.set()
        t.join()
    rig.pump()
    assert rig.server.counters.accepted == 3 and not rig.server.clients  # each closed after its answer


# ---------------------------------------------------------------- nesting


def test_nesting_check():
    assert not nesting_exceeds(b'{"cmd": "stat"}')
    assert not nesting_exceeds(b"[" * 8 + b"]" * 8)
    assert nesting_exceeds(b"[" * 9 + b"]" * 9)
    assert nesting_exceeds(b'{"a":' * 9 + b"1" + b"}" * 9)
    assert not nesting_exceeds(b'{"s": "' + b"[" * 100 + b'"}')           # brackets in a string
    assert not nesting_exceeds(b'{"s": "\\"' + b"[" * 100 + b'"}')        # escaped quote stays in the string
    assert not nesting_exceeds(b'{"s": "\\\\", "t": "' + b"{" * 50 + b'"}')  # escaped backslash ends it
    assert nesting_exceeds(b'{"s": "\\\\"' + b", \"t\": " + b"[" * 9 + b"]" * 9 + b"}")
    assert nesting_exceeds(b"[" * 100_000)                                 # unbalanced: still caught
    assert parse_request(b'{"a": ' + b"[" * 7 + b"]" * 7 + b"}") == {"a": [[[[[[[]]]]]]]}
    with pytest.raises(ValueError, match="deeper than 8"):
        parse_request(b"[" * 9 + b"]" * 9)


def test_deep_nesting_is_an_error_answer_and_others_are_served(make_rig):
    rig = make_rig(max_request=MB)
    bad, other = rig.connect(), rig.connect()
    deep = b'{"cmd": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    assert rig.send(bad, deep) == len(deep)
    answers, eof = rig.read(bad, 1)
    assert not eof and answers[0]["ok"] is False and "deeper than 8" in answers[0]["error"]
    assert rig.call(bad, {"cmd": "echo", "n": 3})["n"] == 3
    assert rig.call(other, {"cmd": "echo", "n": 4})["n"] == 4
    assert rig.server.counters.bad_requests == 1 and rig.server.counters.internal_errors == 0


def test_recursion_error_from_json_is_caught_too(make_rig, monkeypatch):
    monkeypatch.setattr(apimod, "nesting_exceeds", lambda line, limit=8: False)  # pretend the check misses it
    rig = make_rig(max_request=MB)
    s = rig.connect()
    rig.send(s, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    answers, eof = rig.read(s, 1)
    assert not eof and "deeper than 8" in answers[0]["error"]
    assert rig.call(s, {"cmd": "echo", "n": 5})["n"] == 5


def test_deep_nesting_over_the_default_size_limit_is_oversize(make_rig):
    rig = make_rig()
    s = rig.connect()
    rig.send(s, b"[" * 100_000 + b"]" * 100_000 + b"\n")  # the server reads only ~4 KiB of it
    answers, eof = rig.read(s, 2)
    assert answers == [{"ok": False, "error": "request too long (limit 4096 bytes)"}] and eof
    assert rig.server.counters.dropped_oversize == 1


# ---------------------------------------------------------------- size limits


def test_request_of_exactly_max_request_bytes_is_accepted(make_rig):
    rig = make_rig(max_request=256)
    s = rig.connect()
    head = b'{"cmd": "echo", "n": 1, "pad": "'
    line = head + b"p" * (256 - len(head) - 2) + b'"}'
    assert len(line) == 256
    s.send(line + b"\n")
    answers, eof = rig.read(s, 1)
    assert answers[0]["n"] == 1 and not eof
    s.send(line[:-2] + b'p"}\n')  # one byte more
    answers, eof = rig.read(s, 2)
    assert answers == [{"ok": False, "error": "request too long (limit 256 bytes)"}] and eof


def test_line_without_newline_is_bounded_and_dropped(make_rig):
    rig = make_rig(max_request=1000)
    s, other = rig.connect(), rig.connect()
    c = next(iter(rig.server.clients.values()))  # clients are kept in accept order
    sent = 0
    while sent < 5000 and rig.server.clients.get(c.fd) is c:
        try:
            sent += s.send(b"a" * 100)
        except (BrokenPipeError, ConnectionResetError):
            break
        rig.pump(1)
        assert len(c.inbuf) <= 1001  # never more than max_request + 1 bytes held
    assert c.fd not in rig.server.clients or rig.server.clients[c.fd] is not c
    assert sent <= 1100, "the server kept reading past max_request"
    answers, eof = rig.read(s, 2)
    assert answers == [{"ok": False, "error": "request too long (limit 1000 bytes)"}] and eof
    assert rig.server.counters.dropped_oversize == 1
    assert rig.call(other, {"cmd": "echo", "n": 6})["n"] == 6


def test_oversize_line_after_good_ones_in_one_read(make_rig):
    rig = make_rig(max_request=100)
    s = rig.connect()
    s.send(b'{"cmd": "echo", "n": 1}\n{"cmd": "echo", "n": 2}\n' + b"z" * 150 + b"\n")
    answers, eof = rig.read(s, 4)
    assert [a.get("n") for a in answers[:2]] == [1, 2]
    assert answers[2:] == [{"ok": False, "error": "request too long (limit 100 bytes)"}] and eof


# ---------------------------------------------------------------- slow readers


def test_client_that_does_not_read_stalls_alone(make_rig):
    """Answers bigger than the socket buffer: the server stops reading that client (interest
    changed: no event for it while it does not read) and serves the others."""
    rig = make_rig(max_output=4 * MB)
    slow, other = rig.connect(), rig.connect()
    rig.request(slow, *({"cmd": "big", "n": i} for i in range(5)))
    rig.pump(50)
    assert rig.server.counters.requests == 1  # one answer in progress, the others wait unread
    (c,) = [c for c in rig.server.clients.values() if c.pending]
    assert c.mask == select.EPOLLOUT
    assert all(fd != c.fd for fd, _ in rig.ep.poll(0)), "level-triggered epoll would spin on it"
    assert rig.call(other, {"cmd": "echo", "n": 8})["n"] == 8
    answers, eof = rig.read(slow, 5)  # now it reads: everything arrives, in order
    assert [a["n"] for a in answers] == [0, 1, 2, 3, 4] and not eof
    assert all(len(a["blob"]) == MB for a in answers)
    assert c.mask == select.EPOLLIN and rig.server.counters.dropped_slow == 0


def test_client_that_never_reads_is_dropped_over_max_output(make_rig):
    rig = make_rig(max_output=64 << 10)
    slow, other = rig.connect(), rig.connect()
    for i in range(200):  # many requests; the server must not block on any of the 1 MiB answers
        line = json.dumps({"cmd": "big", "n": i}).encode() + b"\n"
        if rig.send(slow, line) < len(line):
            break
        rig.pump(2)
    assert rig.server.counters.dropped_slow == 1
    assert rig.server.counters.requests == 1
    assert len(rig.server.clients) == 1
    assert rig.gone(slow)
    assert rig.call(other, {"cmd": "echo", "n": 9})["n"] == 9


# ---------------------------------------------------------------- handler errors


def test_handler_exception_answers_counts_logs_and_drops(make_rig, capsys):
    rig = make_rig()
    bad, other = rig.connect(), rig.connect()
    rig.request(bad, {"cmd": "boom"}, {"cmd": "echo", "n": 1})
    answers, eof = rig.read(bad, 2)
    assert answers == [{"ok": False, "error": "internal error: KeyError"}] and eof
    assert rig.server.counters.handler_errors == 1 and rig.server.counters.requests == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "KeyError" in err[0] and "boom" in err[0]
    assert rig.call(other, {"cmd": "echo", "n": 2})["n"] == 2


def test_unencodable_answer_is_a_handler_error(make_rig, capsys):
    rig = make_rig()
    s = rig.connect()
    rig.request(s, {"cmd": "unencodable"})
    answers, eof = rig.read(s, 2)
    assert answers == [{"ok": False, "error": "internal error: TypeError"}] and eof
    assert rig.server.counters.handler_errors == 1
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_exception_whose_str_raises_does_not_escape(make_rig, capsys):
    class Nasty(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def handler(req, peer):
        raise Nasty()

    rig = make_rig(handler)
    s = rig.connect()
    rig.request(s, {"cmd": "x"})
    answers, eof = rig.read(s, 2)
    assert answers == [{"ok": False, "error": "internal error: Nasty"}] and eof
    assert "Nasty" in capsys.readouterr().err


def test_internal_error_drops_only_that_client(make_rig, monkeypatch, capsys):
    rig = make_rig()
    bad, other = rig.connect(), rig.connect()
    c_bad = next(iter(rig.server.clients.values()))
    real = ApiServer._read

    def broken(self, c):
        if c is c_bad:
            raise RuntimeError("bug")
        real(self, c)

    monkeypatch.setattr(ApiServer, "_read", broken)
    bad.send(b'{"cmd": "ping"}\n')
    other.send(b'{"cmd": "ping"}\n')
    rig.pump(5)
    assert rig.server.counters.internal_errors == 1
    assert c_bad.fd not in rig.server.clients and len(rig.server.clients) == 1
    assert "internal error: RuntimeError: bug" in capsys.readouterr().err


# ---------------------------------------------------------------- accept


def test_max_clients(make_rig):
    rig = make_rig(max_clients=2)
    a, b = rig.connect(), rig.connect()
    c = rig.connect()
    assert rig.gone(c)
    assert rig.server.counters.refused == 1 and rig.server.counters.accepted == 2
    assert rig.call(a, {"cmd": "echo", "n": 1})["n"] == 1
    b.close()
    rig.pump()
    d = rig.connect()
    assert rig.call(d, {"cmd": "echo", "n": 2})["n"] == 2
    assert rig.server.counters.accepted == 3


def test_many_connections_at_once(make_rig):
    rig = make_rig(max_clients=5)
    socks = []
    for _ in range(12):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(rig.path)
        s.setblocking(False)
        rig.socks.append(s)
        socks.append(s)
    rig.pump(5)
    assert rig.server.counters.accepted == 5 and rig.server.counters.refused == 7
    assert sum(rig.gone(s) for s in socks) == 7


def test_allowed_filters_peers(make_rig):
    seen: list[Peer] = []

    def allowed(peer: Peer) -> bool:
        seen.append(peer)
        return len(seen) == 1

    rig = make_rig(allowed=allowed)
    ok, no = rig.connect(), rig.connect()
    assert seen[0] == Peer(os.getpid(), os.getuid(), os.getgid())
    assert rig.gone(no)
    assert rig.call(ok, {"cmd": "echo", "n": 1})["n"] == 1
    assert rig.server.counters.denied == 1


def test_eof_drops_and_close_closes_everything(make_rig):
    rig = make_rig()
    a, b = rig.connect(), rig.connect()
    a.close()
    rig.pump()
    assert len(rig.server.clients) == 1 and rig.server.counters.disconnects == 1
    listen_fd = rig.server.listen_fd
    assert rig.server.owns(listen_fd)
    rig.server.close()
    assert not rig.server.clients and rig.server.sock.fileno() == -1
    assert rig.gone(b)
    assert rig.ep.poll(0) == []
