"""The device under test's side of the conformance harness: socket calls on request.

Run under `toe run` (so every AF_INET TCP socket it makes is offloaded), it
reads one JSON request per line on stdin and makes exactly the socket call
named, on a plain file descriptor, answering one JSON line on stdout:

    {"id": 7, "op": "send", "args": [5, "68690a", 0]}
    {"id": 7, "ret": 3}                      or   {"id": 7, "errno": 104}

Every request runs in a thread of its own, so a call that blocks (accept,
connect, recv) does not hold the next one: the harness decides whether to
wait for the answer. Bytes travel as hex. Nothing here knows TCP: it is the
application, as packetimpact's DUT is.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading

_out = threading.Lock()
_socks: dict[int, socket.socket] = {}


def _sock(fd: int) -> socket.socket:
    return _socks[fd]


def _keep(s: socket.socket) -> int:
    _socks[s.fileno()] = s
    return s.fileno()


def op_socket() -> int:
    return _keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def op_setsockopt(fd: int, level: int, name: int, value) -> int:
    _sock(fd).setsockopt(level, name, bytes.fromhex(value) if isinstance(value, str) else value)
    return 0


def op_getsockopt(fd: int, level: int, name: int, size: int = 0):
    if size:
        return _sock(fd).getsockopt(level, name, size).hex()
    return _sock(fd).getsockopt(level, name)


def op_bind(fd: int, addr: str, port: int) -> int:
    _sock(fd).bind((addr, port))
    return 0


def op_listen(fd: int, backlog: int) -> int:
    _sock(fd).listen(backlog)
    return 0


def op_connect(fd: int, addr: str, port: int) -> int:
    _sock(fd).connect((addr, port))
    return 0


def op_accept(fd: int) -> list:
    s, (addr, port) = _sock(fd).accept()
    return [_keep(s), addr, port]


def op_send(fd: int, data: str, flags: int = 0) -> int:
    return _sock(fd).send(bytes.fromhex(data), flags)


def op_sendall(fd: int, data: str) -> int:
    buf = bytes.fromhex(data)
    _sock(fd).sendall(buf)
    return len(buf)


def op_recv(fd: int, n: int, flags: int = 0) -> str:
    return _sock(fd).recv(n, flags).hex()


def op_shutdown(fd: int, how: int) -> int:
    _sock(fd).shutdown(how)
    return 0


def op_close(fd: int) -> int:
    _socks.pop(fd).close()
    return 0


def op_setblocking(fd: int, on: bool) -> int:
    _sock(fd).setblocking(on)
    return 0


def op_poll(fd: int, events: int, timeout_ms: int) -> int:
    p = select.poll()
    p.register(fd, events)
    got = p.poll(timeout_ms)
    return got[0][1] if got else 0


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def _answer(msg: dict) -> None:
    line = json.dumps(msg) + "\n"
    with _out:
        sys.stdout.write(line)
        sys.stdout.flush()


def _run(req: dict) -> None:
    rid = req.get("id")
    try:
        ret = OPS[req["op"]](*req.get("args", ()))
        _answer({"id": rid, "ret": ret})
    except OSError as e:
        _answer({"id": rid, "errno": e.errno or 0, "error": str(e)})
    except Exception as e:  # a harness bug: say it, keep serving
        _answer({"id": rid, "errno": -1, "error": f"{type(e).__name__}: {e}"})


def main() -> int:
    _answer({"id": 0, "ret": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=_run, args=(json.loads(line),), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
