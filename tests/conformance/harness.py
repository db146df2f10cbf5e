"""A conformance harness in the style of packetdrill and packetimpact.

A test drives two things and checks the wire between them:

* the **DUT**: a program under `toe run` (`dut_agent.py`) that makes the
  socket calls the test names (`dut.socket()`, `dut.connect(...)`, ...), in a
  loopback-only namespace, so its sockets can reach the peer only through the
  adapter;
* the **remote peer**: segments the test writes itself, injected on the
  kernel side of the adapter's TAP with an AF_PACKET socket, from an address
  (`REMOTE_IP`) the kernel owns (it answers the adapter's ARP) but whose TCP
  never sees a frame (nftables drops them before the kernel's TCP, as gVisor's
  packetimpact does). Whatever the adapter sends there is read back, checked
  field by field (flags, seq, ack, window, options, payload), with the time it
  took.

    conn = peer.connect(port)                  # SYN -> SYN|ACK -> ACK
    fd, _ = dut.accept(lfd)
    dut.send(fd, b"220 ready\\r\\n")
    conn.expect("PA", payload=b"220 ready\\r\\n", within=0.5)

Frames are read with PACKET_VNET_HDR, so with the adapter's TSO on a 64 KB
frame is cut into the MSS-sized segments a wire would carry (PSH and FIN on
the last only), and with offloads off every checksum is verified: a test
expects the same segments in both modes.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno as errno_mod
import itertools
import json
import os
import queue
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

REMOTE_IP = "198.18.0.77"
AGENT = Path(__file__).with_name("dut_agent.py")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
VNET_LEN = 10                       # struct virtio_net_hdr (no num_buffers)
VNET_F_NEEDS_CSUM = 1
VNET_GSO_TCPV4 = 1
SO_TIMESTAMPNS = 35
CLONE_NEWNET = 0x40000000

# TCP option names in the `options` dict of a Seg (scapy's)
MSS, WSCALE = "MSS", "WScale"


class ConformanceError(AssertionError):
    """The adapter put something on the wire that the test did not expect."""


# ---------------------------------------------------------------- namespaces


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def socket_in_netns(netns: str, *args: Any) -> socket.socket:
    """A socket created inside namespace `netns` (only this thread enters it, and leaves)."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(there)
        try:
            return socket.socket(*args)
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


# ---------------------------------------------------------------- segments


_FLAG_ORDER = "FSRPAUEC"


def flags_str(bits: int) -> str:
    """Scapy's order and letters: F S R P A U E C."""
    return "".join(ch for i, ch in enumerate(_FLAG_ORDER) if bits & (1 << i))


def flags_bits(text: str) -> int:
    return sum(1 << _FLAG_ORDER.index(ch) for ch in text)


@dataclasses.dataclass(frozen=True)
class Seg:
    """One TCP segment the adapter sent, as a wire would carry it."""

    ts: float                       # CLOCK_MONOTONIC-comparable arrival time (s)
    sport: int
    dport: int
    flags: str
    seq: int
    ack: int
    window: int
    options: dict
    payload: bytes
    frame: int                      # which captured frame it came from (TSO: several segments)

    @property
    def seg_len(self) -> int:
        return len(self.payload) + ("S" in self.flags) + ("F" in self.flags)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.sport}>{self.dport} [{self.flags}] seq={self.seq} ack={self.ack} win={self.window}"
                f"{' <' + opts + '>' if opts else ''} len={len(self.payload)}")


def _options(tcp: TCP) -> dict:
    out: dict = {}
    for opt in tcp.options:
        name, value = opt if isinstance(opt, tuple) else (opt, None)
        if name in ("NOP", "EOL"):
            continue
        out[name] = value if value != b"" else True
    return out


def _checksum_ok(ip_bytes: bytes) -> bool:
    """IPv4 and TCP checksums as scapy computes them."""
    pkt = IP(ip_bytes)
    want_ip, want_tcp = pkt.chksum, pkt[TCP].chksum
    del pkt.chksum
    del pkt[TCP].chksum
    again = IP(bytes(pkt))
    return again.chksum == want_ip and again[TCP].chksum == want_tcp


def segments_of(frame: bytes, ts: float, frame_no: int) -> list[Seg]:
    """The wire segments in one captured frame (vnet header first); [] if not TCP from the adapter."""
    flags, gso_type, _hdr_len, gso_size, _cs_start, _cs_off = struct.unpack_from("<BBHHHH", frame)
    eth = Ether(frame[VNET_LEN:])
    if IP not in eth or TCP not in eth:
        return []
    ip = eth[IP]
    if ip.dst != REMOTE_IP:
        return []
    ip_bytes = bytes(ip)[:ip.len]
    if not flags & VNET_F_NEEDS_CSUM and not _checksum_ok(ip_bytes):
        raise ConformanceError(f"bad checksum on a frame from the adapter: {eth.summary()}")
    tcp = ip[TCP]
    payload = bytes(tcp.payload)[: ip.len - ip.ihl * 4 - tcp.dataofs * 4]
    opts = _options(tcp)
    step = gso_size if gso_type == VNET_GSO_TCPV4 and gso_size else max(len(payload), 1)
    out = []
    pieces = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    seq = tcp.seq
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        bits = int(tcp.flags) if last else int(tcp.flags) & ~(flags_bits("F") | flags_bits("P"))
        out.append(Seg(ts, tcp.sport, tcp.dport, flags_str(bits), seq, tcp.ack, tcp.window, opts, piece,
                       frame_no))
        seq = (seq + len(piece)) & 0xFFFFFFFF
    return out


# ---------------------------------------------------------------- the wire


class Wire:
    """The kernel side of the adapter's TAP: frames in, frames out, ARP for REMOTE_IP by the kernel."""

    def __init__(self, netns: str, tap: str, adapter_mac: str):
        self.netns = netns
        self.tap = tap
        self.sock = socket_in_netns(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((tap, ETH_P_ALL))
        self.tap_mac = self._mac()
        self.adapter_mac = adapter_mac
        self.by_port: dict[int, queue.Queue[Seg]] = collections.defaultdict(queue.Queue)
        self.frames = 0
        self.errors: list[str] = []
        self._rd, self._wr = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._reader, name="wire-reader", daemon=True)
        self._thread.start()

    def _mac(self) -> str:
        res = subprocess.run(["ip", "-n", self.netns, "-o", "link", "show", self.tap], capture_output=True,
                             text=True, timeout=30, check=True)
        return res.stdout.split("link/ether", 1)[1].split()[0]

    def _reader(self) -> None:
        p = select.poll()
        p.register(self.sock, select.POLLIN)
        p.register(self._rd, select.POLLIN)
        anc = socket.CMSG_SPACE(16)
        # kernel timestamps are CLOCK_REALTIME: move them onto the monotonic clock once
        offset = time.monotonic() - time.time()
        while not self._stop:
            for fd, _ev in p.poll(1000):
                if fd != self.sock.fileno():
                    continue
                try:
                    data, ancdata, _fl, addr = self.sock.recvmsg(1 << 17, anc, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if addr[2] == PACKET_OUTGOING:
                    continue
                ts = time.monotonic()
                for level, kind, value in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        ts = sec + nsec / 1e9 + offset
                self._frame(data, ts)

    def _frame(self, data: bytes, ts: float) -> None:
        try:
            eth = Ether(data[VNET_LEN:])
            if ARP in eth:
                return
            self.frames += 1
            for seg in segments_of(data, ts, self.frames):
                self.by_port[seg.dport].put(seg)
        except ConformanceError as e:
            self.errors.append(str(e))
        except Exception as e:  # a frame scapy cannot read is itself a finding
            self.errors.append(f"unreadable frame from the adapter: {type(e).__name__}: {e}")

    def inject(self, pkt) -> None:
        """Send one frame (an IP/TCP scapy packet) to the adapter, from REMOTE_IP."""
        frame = Ether(src=self.tap_mac, dst=self.adapter_mac) / pkt
        self.sock.send(bytes(VNET_LEN) + bytes(frame))

    def close(self) -> None:
        self._stop = True
        os.write(self._wr, b"x")
        self._thread.join(5)
        self.sock.close()
        os.close(self._rd)
        os.close(self._wr)


# ---------------------------------------------------------------- the remote peer


ANY = object()
"""For `Conn.expect`: do not check this field."""


def _seq_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


class Conn:
    """One TCP connection as the remote peer plays it, byte by byte.

    `seq` is the peer's next sequence number, `rcv_nxt` the next one expected
    from the adapter (None before its SYN). `expect` checks by default that
    the adapter's segment starts at `rcv_nxt` and acknowledges everything the
    peer sent, then advances `rcv_nxt`: a test states only what it cares about.
    """

    def __init__(self, wire: Wire, local_port: int, remote_port: int, iss: int | None = None,
                 window: int = 65535, wscale: int | None = 7, mss: int | None = 1460):
        self.wire = wire
        self.port = local_port               # the peer's port (REMOTE_IP side)
        self.dut_port = remote_port          # the adapter's port
        self.iss = random.getrandbits(32) if iss is None else iss
        self.seq = self.iss
        self.rcv_nxt: int | None = None
        self.dut_iss: int | None = None
        self.window = window
        self.wscale = wscale
        self.mss = mss
        self.dut_wscale = 0
        self.log: list[Seg] = []
        self.q = wire.by_port[local_port]
        self.dut_ip = ""

    # ---- sending

    def send(self, flags: str = "A", payload: bytes = b"", *, seq: int | None = None, ack: int | None = None,
             window: int | None = None, options: list | None = None, advance: bool = True) -> None:
        """Inject one segment; by default from `seq` with `ack = rcv_nxt`, and advance `seq`."""
        s = self.seq if seq is None else seq
        a = (self.rcv_nxt or 0) if ack is None else ack
        w = self.window if window is None else window
        pkt = IP(src=REMOTE_IP, dst=self.dut_ip, flags="DF", ttl=64) / \
            TCP(sport=self.port, dport=self.dut_port, seq=s, ack=a if "A" in flags else 0, flags=flags,
                window=w, options=options or []) / payload
        self.wire.inject(pkt)
        if advance and seq is None:
            self.seq = _seq_add(self.seq, len(payload) + ("S" in flags) + ("F" in flags))

    def syn_options(self) -> list:
        opts: list = []
        if self.mss is not None:
            opts.append(("MSS", self.mss))
        if self.wscale is not None:
            opts += [("NOP", None), ("WScale", self.wscale)]
        return opts

    # ---- receiving

    def next(self, within: float, ignore_retransmits: bool = False) -> Seg | None:
        """The adapter's next segment within `within` s (optionally skipping resends of
        what was seen already: a FIN or data the RTO repeats while a test looks elsewhere)."""
        deadline = time.monotonic() + within
        while True:
            try:
                seg = self.q.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            self.log.append(seg)
            if not (ignore_retransmits and self.is_retransmit(seg)):
                return seg

    def is_retransmit(self, seg: Seg) -> bool:
        return bool(self.rcv_nxt is not None and seg.seg_len and "S" not in seg.flags
                    and 0 < (self.rcv_nxt - seg.seq) & 0xFFFFFFFF < 1 << 31)

    def expect(self, flags: str | object = ANY, *, payload: bytes | object = ANY, seq: int | object | None = None,
               ack: int | object | None = None, window: int | object = ANY, options: dict | object = ANY,
               length: int | object = ANY, within: float = 1.0, advance: bool = True,
               ignore_retransmits: bool = False) -> Seg:
        """The adapter's next segment on this connection, within `within` s, matching every given field.

        seq defaults to rcv_nxt and ack to the peer's seq (pass ANY to skip);
        options is the exact set of options (a dict, values or True)."""
        seg = self.next(within, ignore_retransmits)
        if seg is None:
            raise ConformanceError(f"expected [{flags if flags is not ANY else '*'}] within {within:.3f} s, "
                                   f"got nothing{self._history()}")
        want_seq = self.rcv_nxt if seq is None and self.rcv_nxt is not None else seq
        want_ack = self.seq if ack is None and "A" in seg.flags else ack
        checks = [("flags", flags, seg.flags), ("seq", want_seq, seg.seq), ("window", window, seg.window),
                  ("payload", payload, seg.payload), ("length", length, len(seg.payload))]
        if "A" in seg.flags:
            checks.append(("ack", want_ack, seg.ack))
        if options is not ANY:
            checks.append(("options", options, seg.options))
        for name, want, got in checks:
            if want is not ANY and want is not None and want != got:
                raise ConformanceError(f"segment {seg}: {name} is {got!r}, expected {want!r}{self._history()}")
        if advance:
            if "S" in seg.flags:
                self.dut_iss = seg.seq
                self.rcv_nxt = seg.seq
            if self.rcv_nxt is not None and seg.seq == self.rcv_nxt:
                self.rcv_nxt = _seq_add(seg.seq, seg.seg_len)
        return seg

    def expect_none(self, within: float = 0.3, ignore_retransmits: bool = False) -> None:
        """Nothing on this connection for `within` s."""
        seg = self.next(within, ignore_retransmits)
        if seg is not None:
            raise ConformanceError(f"expected nothing for {within:.3f} s, got {seg}{self._history()}")

    def expect_data(self, data: bytes, within: float = 1.0, ack_each: bool = True) -> list[Seg]:
        """The adapter sends exactly `data` (in any number of segments, in order); ACK them as they come."""
        got = b""
        segs = []
        deadline = time.monotonic() + within
        while len(got) < len(data):
            seg = self.expect(within=max(deadline - time.monotonic(), 0.0))
            if not seg.payload:
                continue
            got += seg.payload
            segs.append(seg)
            if ack_each:
                self.send("A")
        if got != data:
            raise ConformanceError(f"the adapter sent {len(got)} bytes that differ from the {len(data)} "
                                   f"written{self._history()}")
        return segs

    def expect_acked(self, within: float = 1.0) -> Seg:
        """An ACK of everything the peer sent (pure ACKs acking less may come first)."""
        deadline = time.monotonic() + within
        while True:
            seg = self.expect("A", ack=ANY, within=max(deadline - time.monotonic(), 0.0))
            if seg.ack == self.seq:
                return seg
            if seg.payload or not (0 < (self.seq - seg.ack) & 0xFFFFFFFF < 1 << 31):
                raise ConformanceError(f"segment {seg}: expected a pure ACK up to {self.seq}{self._history()}")

    def _history(self) -> str:
        seen = "\n    ".join(str(s) for s in self.log[-8:]) or "(none)"
        return f"\n  last segments from the adapter:\n    {seen}"

    # ---- scripted openings and closings

    def open_to(self, dut_ip: str, *, options: list | None = None, within: float = 1.0) -> Seg:
        """Active open from the peer: SYN -> expect SYN|ACK -> ACK. Returns the SYN|ACK."""
        self.dut_ip = dut_ip
        self.send("S", options=self.syn_options() if options is None else options)
        synack = self.expect("SA", seq=ANY, within=within)
        self.dut_wscale = synack.options.get(WSCALE, 0) if self.wscale is not None else 0
        self.send("A")
        return synack

    def accept_from(self, dut_ip: str, syn: Seg, *, options: list | None = None) -> None:
        """Passive open: answer the adapter's SYN with SYN|ACK (the adapter's ACK is left to expect)."""
        self.dut_ip = dut_ip
        self.dut_wscale = syn.options.get(WSCALE, 0) if self.wscale is not None else 0
        self.send("SA", options=self.syn_options() if options is None else options)

    def reset(self) -> None:
        """An in-window RST: the adapter forgets the connection (cleanup between tests)."""
        if self.rcv_nxt is not None:
            self.send("R", seq=self.seq, advance=False)


_PEER_PORTS = itertools.cycle(range(10000, 60000))
"""The peer's ports, never reused within a run: a test never sees another's segments."""


class Peer:
    """The remote host at REMOTE_IP: a factory of connections on fresh ports."""

    def __init__(self, wire: Wire, dut_ip: str):
        self.wire = wire
        self.dut_ip = dut_ip
        self.conns: list[Conn] = []

    def conn(self, dut_port: int, **kw: Any) -> Conn:
        c = Conn(self.wire, self.port(), dut_port, **kw)
        c.dut_ip = self.dut_ip
        self.conns.append(c)
        return c

    def connect(self, dut_port: int, **kw: Any) -> Conn:
        """A connection the peer opens to the adapter's listener on dut_port."""
        options = kw.pop("options", None)
        c = self.conn(dut_port, **kw)
        c.open_to(self.dut_ip, options=options)
        return c

    def port(self) -> int:
        """A fresh port of the peer's, for the adapter to connect to (see `wait_syn`)."""
        return next(_PEER_PORTS)

    def wait_syn(self, port: int, within: float = 2.0, **kw: Any) -> tuple[Conn, Seg]:
        """The adapter's SYN to `port` (the peer's side); a Conn ready to answer it."""
        q = self.wire.by_port[port]
        try:
            syn = q.get(timeout=within)
        except queue.Empty:
            raise ConformanceError(f"no SYN to port {port} within {within} s") from None
        if syn.flags != "S":
            raise ConformanceError(f"expected a SYN to port {port}, got {syn}")
        c = Conn(self.wire, port, syn.sport, **kw)
        c.dut_ip = self.dut_ip
        c.log.append(syn)
        c.dut_iss = syn.seq
        c.rcv_nxt = _seq_add(syn.seq, 1)
        c.dut_wscale = syn.options.get(WSCALE, 0)
        self.conns.append(c)
        return c, syn

    def accepted_by(self, dut: Dut, port: int, *, setup=None, **kw: Any) -> tuple[int, Conn, int]:
        """A connection the DUT accepts: listener on port (after `setup(dut, fd)`), the
        peer's handshake, accept(). Returns (accepted fd, conn, listening fd)."""
        lfd = dut.socket()
        if setup is not None:
            setup(dut, lfd)
        dut.bind(lfd, self.dut_ip, port)
        dut.listen(lfd)
        conn = self.connect(port, **kw)
        fd, _addr, _port = dut.accept(lfd)
        return fd, conn, lfd

    def connected_from(self, dut: Dut, *, setup=None, synack_options: list | None = None,
                       **kw: Any) -> tuple[int, Conn, Seg]:
        """A connection the DUT opens (after `setup(dut, fd)`): its SYN, the peer's SYN|ACK,
        its ACK, connect() returning 0. Returns (fd, conn, the DUT's SYN)."""
        fd = dut.socket()
        if setup is not None:
            setup(dut, fd)
        port = self.port()
        pending = dut.connect(fd, REMOTE_IP, port)
        conn, syn = self.wait_syn(port, **kw)
        conn.accept_from(self.dut_ip, syn, options=synack_options)
        conn.expect("A", payload=b"")
        pending.result()
        return fd, conn, syn

    def cleanup(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.reset()
        self.conns.clear()


# ---------------------------------------------------------------- the device under test


class Pending:
    """A DUT call in progress (the agent answers when the call returns)."""

    def __init__(self, dut: Dut, rid: int, what: str):
        self.dut = dut
        self.rid = rid
        self.what = what

    def result(self, timeout: float = 10.0) -> Any:
        return self.dut._wait(self.rid, self.what, timeout)

    def done(self, within: float = 0.0) -> bool:
        return self.dut._has(self.rid, within)


class Dut:
    """The program under `toe run`: each method is one socket call, made by the agent.

    Failing calls raise OSError with the errno the call set (so a test says
    `with pytest.raises(ConnectionResetError)`); `start(...)` makes a call
    without waiting for it to return."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._ids = iter(range(1, 1 << 30))
        self._answers: dict[int, dict] = {}
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._reader, name="dut-reader", daemon=True)
        self._thread.start()
        self._wait(0, "the agent to start", 60)

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cv:
                self._answers[msg["id"]] = msg
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _has(self, rid: int, within: float) -> bool:
        with self._cv:
            self._cv.wait_for(lambda: rid in self._answers, timeout=within)
            return rid in self._answers

    def _wait(self, rid: int, what: str, timeout: float) -> Any:
        with self._cv:
            if not self._cv.wait_for(lambda: rid in self._answers or self.proc.poll() is not None, timeout):
                raise ConformanceError(f"the DUT's {what} did not return within {timeout} s")
            if rid not in self._answers:
                raise ConformanceError(f"the DUT exited ({self.proc.poll()}) during {what}")
            msg = self._answers.pop(rid)
        if "errno" in msg:
            if msg["errno"] == -1:
                raise RuntimeError(f"agent: {msg['error']}")
            raise OSError(msg["errno"], os.strerror(msg["errno"]), what)
        return msg["ret"]

    def start(self, op: str, *args: Any) -> Pending:
        rid = next(self._ids)
        enc = [a.hex() if isinstance(a, (bytes, bytearray)) else a for a in args]
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, "args": enc}) + "\n")
        self.proc.stdin.flush()
        return Pending(self, rid, f"{op}{tuple(args)!r}"[:120])

    def call(self, op: str, *args: Any, timeout: float = 10.0) -> Any:
        return self.start(op, *args).result(timeout)

    # the calls, by name
    def socket(self) -> int:
        return self.call("socket")

    def setsockopt(self, fd: int, level: int, name: int, value: int | bytes) -> None:
        self.call("setsockopt", fd, level, name, value)

    def getsockopt(self, fd: int, level: int, name: int, size: int = 0) -> Any:
        got = self.call("getsockopt", fd, level, name, size)
        return bytes.fromhex(got) if size else got

    def bind(self, fd: int, addr: str, port: int) -> None:
        self.call("bind", fd, addr, port)

    def listen(self, fd: int, backlog: int = 16) -> None:
        self.call("listen", fd, backlog)

    def listener(self, addr: str, port: int, backlog: int = 16) -> int:
        fd = self.socket()
        self.bind(fd, addr, port)
        self.listen(fd, backlog)
        return fd

    def connect(self, fd: int, addr: str, port: int) -> Pending:
        """Blocking connect, started: the test plays the handshake, then reads `.result()`
        (0, or the OSError connect() failed with)."""
        return self.start("connect", fd, addr, port)

    def accept(self, fd: int, timeout: float = 10.0) -> tuple[int, str, int]:
        return tuple(self.call("accept", fd, timeout=timeout))  # type: ignore[return-value]

    def send(self, fd: int, data: bytes, flags: int = 0) -> int:
        return self.call("send", fd, data, flags)

    def sendall(self, fd: int, data: bytes, timeout: float = 30.0) -> int:
        return self.call("sendall", fd, data, timeout=timeout)

    def recv(self, fd: int, n: int, flags: int = 0, timeout: float = 10.0) -> bytes:
        return bytes.fromhex(self.call("recv", fd, n, flags, timeout=timeout))

    def shutdown(self, fd: int, how: int) -> None:
        self.call("shutdown", fd, how)

    def close(self, fd: int) -> None:
        self.call("close", fd)

    def setblocking(self, fd: int, on: bool) -> None:
        self.call("setblocking", fd, on)

    def poll(self, fd: int, events: int, timeout_ms: int = 0) -> int:
        return self.call("poll", fd, events, timeout_ms, timeout=timeout_ms / 1000 + 10)


def expect_errno(e: int, pending: Pending, timeout: float = 10.0) -> None:
    """The call ends with errno `e`."""
    try:
        got = pending.result(timeout)
    except OSError as err:
        if err.errno != e:
            raise ConformanceError(f"{pending.what}: errno {err.errno} ({os.strerror(err.errno or 0)}), "
                                   f"expected {errno_mod.errorcode[e]}") from None
        return
    raise ConformanceError(f"{pending.what} returned {got!r}, expected {errno_mod.errorcode[e]}")


def agent_argv() -> list[str]:
    return [sys.executable, "-u", str(AGENT)]
