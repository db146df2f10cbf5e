"""sockperf, unmodified, through the adapter: ping-pong and under-load, client and server.

sockperf waits for its sockets with recvfrom() when it has one (`--tcp -i`),
and with the multiplexer `-F` names when it reads a feed file of several
connections (`-f`, where "T:" lines mean TCP): each mode is run, so the
shim's poll, select and epoll all carry the test.

Checked, never timed: sockperf exits 0 and prints its summary; no message
dropped, duplicated or out of order (sockperf numbers its messages); in
ping-pong every message of the valid period was answered; and at the end the
server's own count of messages handled equals the number the clients sent
(the last message sent is counted too: the test waits until the adapter has
seen both sides close, so the server has read to end of file).
The latency is printed (`pytest -s`), never asserted.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from tests.conftest import require_tools, unique_port, wait_until

pytestmark = pytest.mark.integration

MODES = ["recvfrom", "poll", "select", "epoll"]
SECONDS = {"ping-pong": "2", "under-load": "1"}  # sockperf adds ~2 s of its own to each run
ANSI = re.compile(r"\x1b\[[0-9;]*m")
DONE_STATES = {"TIME_WAIT", "CLOSED"}


def target(mode: str, ip: str, tmp_path) -> tuple[list[str], list[int]]:
    """sockperf's address arguments for `mode`, and the ports (-i for one socket, a feed file for -F)."""
    if mode == "recvfrom":
        port = unique_port()
        return ["--tcp", "-i", ip, "-p", str(port)], [port]
    ports = [unique_port(), unique_port()]
    feed = tmp_path / f"feed-{ip}"
    feed.write_text("".join(f"T:{ip}:{p}\n" for p in ports))
    return ["-f", str(feed), "-F", mode], ports


def summary(out: str, what: str) -> dict[str, float]:
    text = ANSI.sub("", out)
    found = {
        "total": re.search(r"\[Total Run\].*?SentMessages=(\d+); ReceivedMessages=(\d+)", text),
        "valid": re.search(r"\[Valid Duration\].*?SentMessages=(\d+); ReceivedMessages=(\d+)", text),
        "errors": re.search(r"# dropped messages = (\d+); # duplicated messages = (\d+); "
                            r"# out-of-order messages = (\d+)", text),
        "latency": re.search(r"Summary: Latency is ([\d.]+) usec", text),
    }
    missing = [k for k, m in found.items() if not m]
    assert not missing, f"{what}: no {missing} in its output: {text[-3000:]}"
    return {
        "total_sent": int(found["total"][1]), "total_received": int(found["total"][2]),
        "valid_sent": int(found["valid"][1]), "valid_received": int(found["valid"][2]),
        "dropped": int(found["errors"][1]), "duplicated": int(found["errors"][2]),
        "out_of_order": int(found["errors"][3]), "latency_us": float(found["latency"][1]),
    }


def check_client(res: subprocess.CompletedProcess, kind: str, mode: str, label: str) -> dict[str, float]:
    out = res.stdout
    assert res.returncode == 0, f"sockperf {kind} exited {res.returncode}: {out[-3000:]}"
    assert f"using {mode}() to block" in out, f"sockperf {kind} did not use {mode}(): {out[-3000:]}"
    s = summary(out, f"sockperf {kind}")
    print(f"\nsockperf {kind} {label} ({mode}): avg latency {s['latency_us']:.1f} usec, "
          f"{s['valid_sent']} sent / {s['valid_received']} received in the valid period")
    assert (s["dropped"], s["duplicated"], s["out_of_order"]) == (0, 0, 0), s
    assert s["valid_sent"] > 0 and s["valid_received"] > 0, s
    if kind == "ping-pong":
        assert s["valid_received"] == s["valid_sent"], s
    else:  # under-load: only some messages ask for a reply
        assert s["valid_received"] < s["valid_sent"], s
    return s


def wait_closed(adapter, ports: list[int]) -> None:
    """Until no adapter connection on these ports is still open (both sides have closed)."""
    def closed() -> bool:
        for conn in adapter.stat().get("connections", []):
            ends = (conn.get("local", ""), conn.get("remote", ""))
            if any(e.endswith(f":{p}") for e in ends for p in ports) and conn.get("state") not in DONE_STATES:
                return False
        return True
    wait_until(closed, f"the sockperf connections on ports {ports} to close")


def server_handled(server: subprocess.Popen, mode: str) -> int:
    """SIGINT the server (its normal stop); the number of messages it says it handled."""
    server.send_signal(signal.SIGINT)
    out, _ = server.communicate(timeout=60)
    text = ANSI.sub("", out)
    assert server.returncode == 0, f"sockperf server exited {server.returncode}: {text[-3000:]}"
    assert f"using {mode}() to block" in text, f"sockperf server did not use {mode}(): {text[-3000:]}"
    m = re.search(r"Total (\d+) messages received and handled", text)
    assert m, f"sockperf server printed no total: {text[-3000:]}"
    return int(m[1])


@pytest.mark.parametrize("mode", MODES)
def test_sockperf_client_under_toe_run(adapter, client_ns, tmp_path, mode):
    require_tools("sockperf")
    args, ports = target(mode, adapter.host_ip, tmp_path)
    server_args = [a for a in args if a not in ("-F", mode)] if mode != "recvfrom" else args
    server = adapter.popen(["sockperf", "server", *server_args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for port in ports:
        adapter.wait_kernel_listener(port)
    sent = 0
    for kind in ("ping-pong", "under-load"):
        res = client_ns.toe_run(adapter, ["sockperf", kind, *args, "-t", SECONDS[kind]], text=True,
                                stderr=subprocess.STDOUT, stdout=subprocess.PIPE, capture_output=False,
                                timeout=120)
        sent += check_client(res, kind, mode, "under toe run, kernel server")["total_sent"]
    wait_closed(adapter, ports)
    assert server_handled(server, "recvfrom" if mode == "recvfrom" else "epoll") == sent


@pytest.mark.parametrize("mode", MODES)
def test_sockperf_server_under_toe_run(adapter, client_ns, tmp_path, mode):
    require_tools("sockperf")
    args, ports = target(mode, adapter.ip, tmp_path)
    server = client_ns.toe_popen(adapter, ["sockperf", "server", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    for port in ports:
        adapter.wait_toe_listener(port)
    client_args = [a for a in args if a not in ("-F", mode)] if mode != "recvfrom" else args
    sent = 0
    # the server's multiplexer is what is tested here: under-load once, with the single-socket server
    for kind in ("ping-pong", "under-load") if mode == "recvfrom" else ("ping-pong",):
        res = adapter.run(["sockperf", kind, *client_args, "-t", SECONDS[kind]], text=True, stderr=subprocess.STDOUT,
                          stdout=subprocess.PIPE, capture_output=False, timeout=120)
        client_mode = "recvfrom" if mode == "recvfrom" else "epoll"  # the kernel client: sockperf's default
        sent += check_client(res, kind, client_mode, f"kernel client, server under toe run with {mode}()")[
            "total_sent"]
    wait_closed(adapter, ports)
    assert server_handled(server, mode) == sent
