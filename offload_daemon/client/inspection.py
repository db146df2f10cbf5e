"""The client of an adapter's inspection API (a JSON line each way on /run/toe/<tap>.api)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from offload_daemon.client.errors import CLIError
from offload_daemon.config import api_path

API_TIMEOUT_S = 10.0


def api_request(tap: str, request: dict[str, Any], timeout: float = API_TIMEOUT_S) -> str:
    """Send one JSON line to the adapter's inspection API, return the answer line."""
    path = api_path(tap)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise CLIError(f"adapter {tap} is not up (no {path}); start it with 'toe up --tap {tap}'") from None
        except ConnectionRefusedError:
            raise CLIError(f"adapter {tap} does not answer on {path} (daemon gone? 'toe down --tap {tap}')") from None
        except PermissionError:
            raise CLIError(f"you (uid {os.getuid()}) are not allowed to use adapter {tap} ({path}); "
                           "ask its admin for 'toe up --allow-users'") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise CLIError(f"adapter {tap} did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise CLIError(f"talking to adapter {tap}: {e.strerror or e}") from None
    finally:
        s.close()
    line = bytes(buf).split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line:
        raise CLIError(f"adapter {tap} closed the inspection connection without answering")
    return line


def api_call(tap: str, request: dict[str, Any], timeout: float = API_TIMEOUT_S) -> dict[str, Any]:
    line = api_request(tap, request, timeout)
    try:
        answer = json.loads(line)
    except ValueError:
        raise CLIError(f"adapter {tap} answered something that is not JSON: {line[:80]!r}") from None
    if not isinstance(answer, dict):
        raise CLIError(f"adapter {tap} answered {type(answer).__name__}, not a JSON object")
    if answer.get("error"):
        raise CLIError(f"adapter {tap}: {answer['error']}")
    return answer


def api_pings(tap: str) -> bool:
    try:
        api_call(tap, {"cmd": "ping"}, timeout=2.0)
    except CLIError:
        return False
    return True
