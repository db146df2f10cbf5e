"""The hardware units compiled with AddressSanitizer and UBSan (or ThreadSanitizer: KINDS),
and the child process that drives them.

Parent side (tests/nic_model/test_fastpath_sanitize.py): `runtime()` finds the sanitizer
runtimes, `build(tmpdir)` compiles nic_model/hw/*.c as the module `_fastpath_san`,
`run(tmpdir, ...)` runs this file as a child Python with the runtimes preloaded.

Child side (`python sanitized.py SEED PARSE_FRAMES ENGINE_FRAMES`): imports `_fastpath_san`
and (a) runs fp_rx_parse on random and mutated frames, each in a buffer of exactly its
length (PYTHONMALLOC=malloc: cffi's buffers are then ASan's own allocations, with redzones
right after the last byte); (b) drives the engine (fp_push / fp_rx_frame / fp_doorbell /
fp_scan / fp_end_burst / fp_pull) with one connection whose shared mapping sits between
PROT_NONE guard pages and whose header is overwritten with garbage between frames; or, in
mode "poll", (c) lets fp_poll read the frames itself from a datagram socketpair standing in
for the TAP (rx_burst and its header split with direct placement, rx_placed), and fails
unless payloads were both placed into the RX ring and misplaced there; mode "poll2" does
that with the TX processor (tx_proc.c) running too, taking doorbells.  It prints a line
starting with DONE when everything ran; a sanitizer report aborts it.
This file imports nothing from the project, so the child loads no uninstrumented units.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

# the builds: AddressSanitizer + UBSan, and ThreadSanitizer (the two processors' locking)
KINDS = {
    "asan": {"module": "_fastpath_san", "runtimes": ("libasan.so", "libubsan.so"),
             "cflags": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                        "-fno-sanitize-recover=all"],
             "ldflags": ["-fsanitize=address,undefined"]},
    "tsan": {"module": "_fastpath_tsan", "runtimes": ("libtsan.so",),
             "cflags": ["-O1", "-g", "-fsanitize=thread", "-fno-omit-frame-pointer",
                        "-Wno-tsan"],  # fences order the shared header for the shim, not these threads
             "ldflags": ["-fsanitize=thread"]},
}
MODULE = os.environ.get("FP_SAN_MODULE", KINDS["asan"]["module"])
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---------------------------------------------------------------- parent side


def runtime(kind: str = "asan") -> tuple[str | None, str]:
    """(LD_PRELOAD value, "") or (None, why the sanitizers cannot run here)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None, "gcc not found"
    libs = []
    for name in KINDS[kind]["runtimes"]:
        out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(out) or not os.path.exists(out):
            return None, f"{name} not installed (gcc -print-file-name={name} gave {out!r})"
        libs.append(out)
    return " ".join(libs), ""


def build(tmpdir: str, hw_dir: str | None = None, extra_cflags: list[str] | None = None,
          kind: str = "asan") -> str:
    """Compile the units with the sanitizers into tmpdir; returns the module's path.
    `hw_dir`: another copy of nic_model/hw (fp.h and the units), for checking that the tests
    catch a deliberately broken unit."""
    from nic_model import _fp_build

    saved = _fp_build.FP_DIR
    try:
        if hw_dir is not None:
            _fp_build.FP_DIR = hw_dir
        k = KINDS[kind]
        ffi = _fp_build.make_ffi(k["module"], cflags=k["cflags"] + (extra_cflags or []), ldflags=k["ldflags"],
                                 relative=False)
        return ffi.compile(tmpdir=tmpdir)
    finally:
        _fp_build.FP_DIR = saved


def run(tmpdir: str, preload: str, seed: int, parse_frames: int, engine_frames: int, mode: str = "bursts",
        watchdog_s: float = 30, timeout: float = 120, kind: str = "asan") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the child plays the application too: its writes into the shared header (cffi and
    # ctypes copies) race with the units by design, as another process's would; and
    # fp_counters_sum reads the running TX processor's counters without a lock (statistics,
    # a snapshot, as `toe stat` takes it)
    supp = os.path.join(tmpdir, "tsan.supp")
    with open(supp, "w") as f:
        f.write("called_from_lib:_cffi_backend\ncalled_from_lib:_ctypes\ncalled_from_lib:libffi\n"
                "race:fp_counters_sum\nrace:add_tx_counts\n")
    env.update({
        "LD_PRELOAD": preload,
        "FP_SAN_MODULE": KINDS[kind]["module"],
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "TSAN_OPTIONS": f"halt_on_error=1:exitcode=66:report_signal_unsafe=0:suppressions={supp}",
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": os.pathsep.join([tmpdir, ROOT]),
    })
    return subprocess.run([sys.executable, os.path.abspath(__file__), str(seed), str(parse_frames),
                           str(engine_frames), mode, str(watchdog_s)],
                          env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- frames

MY_MAC = b"\x02\x00\x00\x00\x00\x02"
PEER_MAC = b"\x02\x00\x00\x00\x00\x01"
ME = 0xC6120002
PEER = 0xC6120001
LPORT, RPORT = 80, 4000
# TCP states of struct fp_ccb (fp.h FP_ST_*)
SYN_SENT, ESTABLISHED, FIN_WAIT_1, CLOSE_WAIT, LAST_ACK = 2, 4, 5, 7, 9


def inet_sum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(src: int = PEER, dst: int = ME, sport: int = RPORT, dport: int = LPORT, seq: int = 0, ack: int = 0,
          flags: int = 0x10, window: int = 65535, options: bytes = b"", payload: bytes = b"", vflags: int = 0,
          good_csum: bool = True, doff: int | None = None, ip_total: int | None = None) -> bytes:
    if doff is None:
        doff = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags,
                      window, 0, 0) + options + payload
    if vflags & 1:
        c = 0
    else:
        c = inet_sum(seg, (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 6 + len(seg))
        if not good_csum:
            c ^= 0x00FF
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    total = 20 + len(seg) if ip_total is None else ip_total
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, total & 0xFFFF, 7, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", inet_sum(ip)) + ip[12:]
    vnet = struct.pack("<BBHHHHH", vflags, 0, 0, 0, 0, 0, 0)
    return vnet + MY_MAC + PEER_MAC + b"\x08\x00" + ip + seg


def random_frame(r: random.Random) -> bytes:
    """Random bytes, a valid frame mutated, or a valid frame with random header fields."""
    kind = r.randrange(4)
    if kind == 0:
        return r.randbytes(r.randrange(0, 2001))
    opts = r.choice([b"", bytes((2, 4, 5, 0xB4)), r.randbytes(r.randrange(0, 41)), bytes((1, 1, 8, 10) * 3)])
    opts += b"\x01" * (-len(opts) % 4)
    base = frame(seq=r.getrandbits(32), ack=r.getrandbits(32), flags=r.getrandbits(8), options=opts,
                 payload=r.randbytes(r.choice([0, 1, 7, 100, r.randrange(0, 1500)])),
                 vflags=r.choice([0, 0, 1, 2]), doff=r.choice([None, None, r.randrange(16)]),
                 ip_total=r.choice([None, None, r.randrange(0, 0x10000), r.randrange(30, 120)]))
    if kind == 1:
        return base
    b = bytearray(base)
    if kind == 2:
        for _ in range(r.randrange(1, 6)):
            b[r.randrange(len(b))] ^= r.randrange(1, 256)
    if r.random() < 0.7:
        del b[r.randrange(0, len(b) + 1):]
    return bytes(b)


# ---------------------------------------------------------------- child side

PAGE = mmap.PAGESIZE
HDR = 4096
RING = 65536
SHM_BYTES = HDR + RING + RING
# word index (byte offset / 4) of the fields of struct toe_sock_shm the child plays the application with
SHM_WORD = {"magic": 0, "abi_version": 1, "tx_size": 10, "rx_size": 11, "tx_tail": 16, "tx_full_wait": 17,
            "tx_push": 18, "tx_head": 32, "tx_sent": 34, "rx_tail": 48, "tok_sent": 49, "rx_head": 64,
            "tok_taken": 65, "opt_flags": 80, "sndbuf": 86, "rcvbuf": 87, "notsent_lowat": 88}


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def guarded_mapping(size: int) -> int:
    """An anonymous mapping of `size` bytes with a PROT_NONE page on either side: its address."""
    libc = _libc()
    total = size + 2 * PAGE
    base = libc.mmap(None, total, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    assert libc.mprotect(base, PAGE, 0) == 0
    assert libc.mprotect(base + PAGE + size, PAGE, 0) == 0
    return base + PAGE


def child_parse(ffi, lib, r: random.Random, n: int) -> dict:
    mac = ffi.new("uint8_t[]", MY_MAC)
    out = ffi.new("struct fp_seg *")
    classes = [0] * 7
    for _ in range(n):
        data = random_frame(r)
        buf = ffi.new("uint8_t[]", data) if data else ffi.new("uint8_t[]", 1)
        cls = lib.fp_rx_parse(buf, len(data), ME, mac, out)
        assert 0 <= cls <= 6, cls
        if cls in (0, 5):
            assert out.drop < lib.FP_NDROPS
        if cls in (3, 4):
            assert out.payload_off + out.payload_len <= len(data), (data.hex(), out.payload_off, out.payload_len)
        classes[cls] += 1
    return {"parse_classes": classes}


class Engine:
    """One fp_state with one connection, its guarded shared mapping and its descriptors."""

    NBUFS = 8
    BUF_SIZE = 65536 + 256

    def __init__(self, ffi, lib, r: random.Random, offloads: int, bursts_of_one: bool):
        self.ffi, self.lib, self.r = ffi, lib, r
        self.bursts_of_one = bursts_of_one
        self.tap_mine, self.tap_units = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.tap_mine, self.tap_units):
            s.setblocking(False)
        self.ep = select.epoll()
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.mac = ffi.new("uint8_t[]", MY_MAC)
        st = lib.fp_new(16, self.tap_units.fileno(), self.ep.fileno(), ME, self.mac, offloads, 65000, self.NBUFS,
                        self.BUF_SIZE)
        assert st != ffi.NULL
        assert st.offloads == offloads
        self.st = st
        self.bufs = [ffi.new("uint8_t[]", self.BUF_SIZE) for _ in range(self.NBUFS)]
        for i, b in enumerate(self.bufs):
            assert lib.fp_set_buf(st, i, int(ffi.cast("uintptr_t", b))) == 0
        assert lib.fp_set_buf(st, self.NBUFS, 0) == -1
        # TIME-WAIT records (time_wait.c): the connection's own, when it gets there, meets
        # the frames that come while it is out of the table (repush)
        assert lib.fp_tw_setup(st, 4, 0.5, 1 << 16) == 0
        self.shm_addr = guarded_mapping(SHM_BYTES)
        self.hdr = (ctypes.c_char * HDR).from_address(self.shm_addr)
        self.shm = ffi.cast("uint32_t *", self.shm_addr)
        self.ccb = ffi.new("struct fp_ccb *")
        c = self.ccb
        c.conn_id = 1
        c.state = ESTABLISHED
        c.local_ip, c.remote_ip, c.local_port, c.remote_port = ME, PEER, LPORT, RPORT
        c.b_fd = self.b.fileno()
        c.tx_size = c.rx_size = RING
        c.shm_addr = self.shm_addr
        c.peer_mac = list(PEER_MAC) + [0, 0]
        c.mss = 1460
        c.max_seg = 1460 if not offloads else r.choice([1460, 1460 * 44])
        c.snd_una = c.snd_nxt = c.snd_max = 1000
        c.snd_wnd = 65535
        c.cwnd = 14600
        c.ssthresh = 1 << 30
        c.rcv_nxt = 5000
        c.rcv_adv = 5000
        c.rto = 0.2
        self.sane_header()
        self.slot = lib.fp_push(st, c)
        assert self.slot >= 0, self.slot
        self.now = 1000.0
        self.stats = {"frames": 0, "punted": 0, "repush": 0, "tx_frames": 0, "garbage": 0,
                      "doorbells": 0, "scans": 0}

    # the shared header (struct toe_sock_shm of shim/toe_abi.h; not in fp.h's cdef) ----
    def set(self, field: str, value: int) -> None:
        self.shm[SHM_WORD[field]] = value & 0xFFFFFFFF

    def get(self, field: str) -> int:
        return int(self.shm[SHM_WORD[field]])

    def sane_header(self) -> None:
        ctypes.memset(self.shm_addr, 0, HDR)
        self.set("magic", 1414481200)
        self.set("abi_version", 6)
        self.set("tx_size", RING)
        self.set("rx_size", RING)
        tail = self.ccb.tx_head + self.r.randrange(0, RING + 1)
        self.set("tx_head", self.ccb.tx_head)
        self.set("tx_tail", tail)
        self.set("tx_push", tail if self.r.random() < 0.8 else self.r.getrandbits(32))
        self.set("opt_flags", self.r.choice([0, 0, 1, 16, 0xFFFFFFFF]))

    def garbage_header(self) -> None:
        self.hdr[:] = self.r.randbytes(HDR)
        self.stats["garbage"] += 1

    def tweak_header(self, consume: bool = True) -> None:
        """A plausible application: consumes the RX ring (unless not `consume`), writes more
        into the TX ring."""
        r = self.r
        if r.random() < 0.5 and consume:
            self.set("rx_head", self.get("rx_tail"))
            self.set("tok_taken", self.get("tok_sent"))
        if r.random() < 0.5:
            self.set("tx_tail", self.get("tx_tail") + r.randrange(0, 20000))
            if r.random() < 0.7:
                self.set("tx_push", self.get("tx_tail"))
        if r.random() < 0.1:
            self.set("rcvbuf", r.choice([0, 1, 1000, 100000, 0xFFFFFFFF]))
        if r.random() < 0.1:
            self.set("tx_full_wait", r.getrandbits(1))
        if r.random() < 0.05:
            self.set("notsent_lowat", r.choice([0, 1, 1000, 0xFFFFFFFF]))
        if r.random() < 0.05:
            self.set("sndbuf", r.choice([0, 1, 1000, 0xFFFFFFFF]))
        if r.random() < 0.05:      # single words of nonsense
            self.shm[r.randrange(HDR // 4)] = r.getrandbits(32)

    # the wire ----------------------------------------------------------
    def drain(self) -> None:
        for sock in (self.tap_mine, self.a):
            while True:
                try:
                    d = sock.recv(70000)
                except BlockingIOError:
                    break
                if not d:
                    break
                if sock is self.tap_mine:
                    self.stats["tx_frames"] += 1
                    assert len(d) >= 66, len(d)

    def peek(self):
        c = self.ffi.new("struct fp_ccb *")
        return c if self.lib.fp_peek(self.st, self.slot, c) == 0 else None

    def next_frame(self) -> bytes:
        r = self.r
        c = self.peek()
        rcv_nxt = c.rcv_nxt if c is not None else r.getrandbits(32)
        una = c.snd_una if c is not None else 0
        smax = c.snd_max if c is not None else 0
        good = r.random() < 0.8
        seq = rcv_nxt if good else r.choice([r.getrandbits(32), rcv_nxt + r.randrange(-3000, 3000)])
        span = (smax - una) & 0xFFFFFFFF
        if good:
            ack = una + (r.randrange(0, span + 1) if span < 1 << 20 else 0)
        else:
            ack = r.choice([r.getrandbits(32), una - 1, smax + 1, una])
        flags = 0x10 | (0x08 if r.random() < 0.5 else 0)
        if r.random() < 0.08:
            flags |= 0x01                   # a FIN (conn_fsm.c in ESTABLISHED)
        if not good or r.random() < 0.05:
            flags = r.getrandbits(8)
        payload = r.randbytes(r.choice([0, 0, 1, 100, 1460, r.randrange(0, 9000)]))
        window = r.choice([65535, 65535, 0, r.randrange(0, 65536)])
        vflags = r.choice([0, 1, 1, 2])
        options = b"" if r.random() < 0.95 else bytes((1, 1, 8, 10)) + r.randbytes(8)
        if c is not None and c.state == FIN_WAIT_1 and c.cflags & 8 and good and r.random() < 0.5:
            flags, seq, ack, payload = 0x11, rcv_nxt, smax, b""    # the peer's FIN with the ACK of ours
        if c is not None and c.state == SYN_SENT and r.random() < 0.7:   # the SYN|ACK
            flags, ack, payload = 0x12, (c.snd_nxt if good else ack), b"" if good else payload
            options = r.choice([b"", bytes((2, 4, 5, 0xB4, 1, 3, 3, r.randrange(256))), bytes((2, 4, 0, 0)),
                                bytes((3, 3, 20, 1)), r.randbytes(4)])
        return frame(seq=seq, ack=ack, flags=flags, window=window, payload=payload, vflags=vflags,
                     options=options, good_csum=r.random() < 0.98)

    def feed(self, data: bytes) -> None:
        lib, ffi = self.lib, self.ffi
        i = self.r.randrange(self.NBUFS)
        ffi.memmove(self.bufs[i], data, len(data))
        self.op(f"fp_rx_frame(buf={i}, len={len(data)}, now={self.now:.4f}) frame={data[:80].hex()}...")
        lib.fp_rx_frame(self.st, i, len(data), self.now)
        self.stats["frames"] += 1
        self.maybe_end_burst()

    def op(self, what: str) -> None:
        OPS.append(what)
        del OPS[:-OPS_KEEP]

    def maybe_end_burst(self) -> None:
        if self.bursts_of_one:
            self.op("fp_end_burst")
            self.lib.fp_end_burst(self.st)

    def check_events(self, reset: bool = True) -> None:
        st = self.st
        n = st.nevents
        assert n <= self.lib.FP_MAX_EVENTS
        for k in range(n):
            e = st.events[k]
            assert e.kind in (1, 2, 3), e.kind
            if e.kind == 2:
                assert e.buf < self.NBUFS and e.len <= self.BUF_SIZE
            assert e.slot == -1 or 0 <= e.slot < 16, e.slot
        if reset:
            st.nevents = 0                  # software took the records (fp_poll would reset it)

    def repush(self) -> None:
        lib, ffi, r = self.lib, self.ffi, self.r
        c = ffi.new("struct fp_ccb *")
        self.op(f"fp_pull/fp_push(slot={self.slot})")
        assert lib.fp_pull(self.st, self.slot, c) == 0
        assert lib.fp_pull(self.st, self.slot, c) == -1
        if r.random() < 0.3:                # frames while no CCB has it (a TIME-WAIT record may)
            if r.random() < 0.5:            # software's TIME-WAIT handed to the units (time_wait.c)
                w = ffi.new("struct fp_ccb *", c[0])
                w.snd_nxt, w.rcv_nxt, w.rcv_adv = r.getrandbits(32), r.getrandbits(32), r.getrandbits(32)
                w.rcv_wscale = r.choice([0, 7, 14, 255])
                w.mss = r.choice([0, 536, 1460, 0xFFFFFFFF])
                self.op("fp_tw_enter")
                lib.fp_tw_enter(self.st, w, self.now)
            for _ in range(r.randrange(1, 4)):
                self.feed(self.next_frame())
            self.op("fp_end_burst")
            lib.fp_end_burst(self.st)
            self.check_events()
            self.drain()
        if r.random() < 0.3:                # software moved the connection on
            c.rcv_nxt = r.getrandbits(32)
            c.snd_una = r.getrandbits(32)
            c.snd_nxt = (c.snd_una + r.randrange(0, 70000)) & 0xFFFFFFFF
            c.snd_max = (c.snd_nxt + r.randrange(0, 10)) & 0xFFFFFFFF
            c.tx_head = r.getrandbits(32)
            c.snd_wnd = r.choice([0, 1, 65535, 1 << 20])
            c.psh_n = r.choice([0, 3, 64, 1000])
            c.rto_deadline = r.choice([0.0, self.now + 0.1])
            c.dack_deadline = r.choice([0.0, self.now + 0.01])
            c.wnd_wait = r.getrandbits(1)
            c.pingpong = r.getrandbits(1)
            c.snd_wscale = r.randrange(0, 15)
            c.rcv_wscale = r.randrange(0, 15)
            c.cwnd = r.choice([1, 1460, 14600, 0x7FFFFFFF])
        if r.random() < 0.4:                # the connection state unit's states (conn_fsm.c)
            c.state = r.choice([SYN_SENT, ESTABLISHED, FIN_WAIT_1, CLOSE_WAIT, LAST_ACK])
            c.cflags = r.getrandbits(6)
            c.adv_mss = r.choice([0, 1, 536, 1460, 0xFFFF])
            c.fin_seq = r.choice([c.snd_nxt, c.snd_una, r.getrandbits(32)])
        if c.state not in (SYN_SENT, ESTABLISHED, FIN_WAIT_1, CLOSE_WAIT, LAST_ACK):
            c.state = ESTABLISHED           # (FIN-WAIT-2 is software's)
        c.cflags &= ~lib.FP_CF_ORPHAN       # software never pushes an orphan; B is ours again
        c.b_fd = self.b.fileno()
        c.punted = 0
        self.slot = lib.fp_push(self.st, c)
        assert self.slot >= 0, self.slot
        self.ccb = c
        self.stats["repush"] += 1

    def mangle_header(self, consume: bool = True) -> None:
        """What the application does to its shared header between frames: garbage (3 %),
        a sane reset (3 %), or the usual index moves."""
        roll = self.r.random()
        if roll < 0.03:
            self.garbage_header()
        elif roll < 0.06:
            self.sane_header()
        else:
            self.tweak_header(consume=consume)

    def step(self) -> None:
        r, lib = self.r, self.lib
        self.now += r.choice([0.0, 0.0001, 0.001, 0.01, 0.05, 0.3])
        self.mangle_header()
        for _ in range(r.randrange(1, 5)):
            self.feed(self.next_frame())
        if r.random() < 0.3:
            if r.random() < 0.5:
                with contextlib.suppress(BlockingIOError):
                    self.a.send(b"\x01" * r.randrange(1, 50))
            slot = self.slot if r.random() < 0.95 else r.randrange(-2, 20)
            self.op(f"fp_doorbell(slot={slot}, now={self.now:.4f})")
            lib.fp_doorbell(self.st, slot, self.now)
            self.stats["doorbells"] += 1
            self.maybe_end_burst()
        if r.random() < 0.04:               # the application's close (B hung up): conn_fsm.c
            slot = self.slot if r.random() < 0.95 else r.randrange(-2, 20)
            self.op(f"fp_hangup(slot={slot}, now={self.now:.4f})")
            lib.fp_hangup(self.st, slot, self.now)
            self.stats["hangups"] = self.stats.get("hangups", 0) + 1
            self.maybe_end_burst()
        if r.random() < 0.2:
            self.op(f"fp_scan(now={self.now:.4f})")
            lib.fp_scan(self.st, self.now)
            self.stats["scans"] += 1
            self.maybe_end_burst()
        self.op("fp_end_burst")
        lib.fp_end_burst(self.st)
        self.check_events()
        self.drain()
        c = self.peek()
        assert c is not None
        if c.punted:
            self.stats["punted"] += 1
        if c.punted or r.random() < 0.02:
            self.repush()

    def close(self) -> dict:
        k = self.st.counters
        self.stats.update(rx_segments=k.rx_segments, rx_payload=k.rx_payload_bytes, tx_segments=k.segments,
                          pure_acks=k.pure_acks, tx_errors=k.tx_errors, syns=k.syns, syn_acks=k.syn_acks,
                          fins_in=k.fins_in, app_closes=k.app_closes, fins_out=k.fins_out, closes=k.closes,
                          tw_entered=k.tw_entered, tw_segments=k.tw_segments)
        self.lib.fp_free(self.st)
        for s in (self.tap_mine, self.tap_units, self.a, self.b):
            s.close()
        self.ep.close()
        return self.stats


class PollEngine(Engine):
    """The engine as the daemon runs it: fp_poll waits on an epoll set holding the TAP end the
    units own (A), reads the frames sent into the other end (B) itself (rx_burst; with a
    placement guess, rx_placed's header split into the guessed connection's RX ring) and
    sends its own frames back out through A, to B."""

    def __init__(self, ffi, lib, r: random.Random, offloads: int, procs: int = 1):
        super().__init__(ffi, lib, r, offloads, bursts_of_one=False)
        self.ep.register(self.tap_units.fileno(), select.EPOLLIN)
        self.procs = procs
        self.ringing = False
        if procs == 2:                      # the TX processor takes B's doorbells meanwhile
            assert lib.fp_proc_start(self.st) == 0
            # and an application thread rings them while fp_poll runs (cffi lets go of the
            # GIL in C): both processors on the same CCB at once
            self.ringing = True
            self.bell_thread = threading.Thread(target=self._ring, daemon=True)
            self.bell_thread.start()
        self.now = time.monotonic()         # fp_poll's clock: deadlines set by repush are real
        self.hold = 0                       # batches left in which the application reads nothing
        self.stats.update(polls=0, sent=0, send_full=0, ev_frames=0, ev_conns=0, guessed=0, held=0)
        self.kinds: dict[str, int] = {}

    def _ring(self) -> None:
        while self.ringing:
            with contextlib.suppress(BlockingIOError, OSError):
                self.a.send(b"\x01")
            time.sleep(0.0002)

    def rx_space(self) -> int:
        used = (self.get("rx_tail") - self.get("rx_head")) & 0xFFFFFFFF
        return 0 if used > RING else RING - used

    def rcv_space(self) -> int:
        """fp_rcv_space(): the ring's free space, less when the application set a small rcvbuf."""
        space, rcvbuf = self.rx_space(), self.get("rcvbuf")
        if not rcvbuf or rcvbuf >= RING:
            return space
        used = RING - space
        return max(rcvbuf // 2 - used, 0)

    def batch_frame(self, expect: int, c, clean: bool) -> tuple[bytes, int, str]:
        """One frame of a batch and the rcv_nxt the units should have after it.  A `clean`
        batch holds only frames that leave the connection with the units (in-order data,
        pure ACKs, frames for other ports, runts and bad checksums, which are dropped), so
        that the placement guess holds for a while."""
        r = self.r
        una = c.snd_una if c is not None else 0
        smax = c.snd_max if c is not None else 0
        if (smax - una) & 0xFFFFFFFF < 1 << 20:
            una = self.ack_floor if ((self.ack_floor - una) & 0xFFFFFFFF) <= ((smax - una) & 0xFFFFFFFF) else una
            span = (smax - una) & 0xFFFFFFFF
            ack = (una + r.randrange(0, span + 1)) & 0xFFFFFFFF
        else:
            ack = una
        self.ack_floor = ack                # the units' snd_una moves within the batch
        flags = 0x10 | (0x08 if r.random() < 0.5 else 0)
        vflags = r.choice([0, 1, 1, 2, 2])
        size = r.choice([1, 100, 536, 1460, 1460, 1460, r.randrange(1, 9000)])
        roll = r.random()
        if clean:
            roll = r.choice([0.0] * 14 + [0.6, 0.6, 0.7, 0.75, 0.8])
            if roll == 0.0 and size > self.room:
                size = self.room
                roll = roll if size else 0.6
        kw = {"seq": expect, "ack": ack, "flags": flags, "vflags": vflags, "window": 65535}
        if roll < 0.50:
            kind = "in-order"
            data = frame(payload=r.randbytes(size), **kw)
            self.room -= size
            return data, expect + size, kind
        if roll < 0.58:
            kind = "out-of-order"
            kw["seq"] = expect + r.choice([r.randrange(1, 3000), -r.randrange(1, 3000), r.getrandbits(32)])
            data = frame(payload=r.randbytes(size), **kw)
        elif roll < 0.66:
            kind = "pure-ack"
            data = frame(**kw)
        elif roll < 0.72:
            kind = "other-port"
            if r.random() < 0.5:
                kw["dport"] = LPORT + r.randrange(1, 100)
            else:
                kw["sport"] = RPORT + r.randrange(1, 100)
            data = frame(payload=r.randbytes(r.choice([0, size])), **kw)
        elif roll < 0.77:
            kind = "runt"
            full = frame(payload=r.randbytes(size), **kw)
            data = r.choice([r.randbytes(r.randrange(0, 67)), full[:r.randrange(0, 67)],
                             full[:r.randrange(66, len(full))]])
        elif roll < 0.82:
            kind = "bad-csum"
            kw["vflags"] = 0 if clean else r.choice([0, 0, 1, 2])
            data = frame(payload=r.randbytes(size), good_csum=False, **kw)
            if kw["vflags"]:                # the kernel vouches for it: in-order data after all
                return data, expect + size, kind
        elif roll < 0.86:
            kind = "options"
            opts = r.choice([bytes((1, 1, 8, 10)) + r.randbytes(8), bytes((2, 4, 5, 0xB4)), b"\x01" * 4])
            data = frame(payload=r.randbytes(r.choice([0, size])), options=opts, **kw)
        elif roll < 0.93:
            kind = "beyond-ring"
            space = self.rx_space()
            big = space + r.choice([1, r.randrange(1, 3000), r.randrange(1, 70000)])
            if r.random() < 0.2:
                big = self.BUF_SIZE - 66 + r.randrange(-2, 400)
            big = min(big, 69000)
            # an IP total length past 64 KiB wraps: the checker drops that one
            data = frame(payload=r.randbytes(big), **kw)
        else:
            kind = "random"
            data = random_frame(r)
        return data, expect, kind

    def send(self, data: bytes) -> None:
        for _ in range(3):
            try:
                self.tap_mine.send(data)
                self.stats["sent"] += 1
                return
            except BlockingIOError:
                self.stats["send_full"] += 1
                self.poll()
        # still full: the frame is lost, as on a wire

    def readable(self) -> bool:
        return bool(select.select([self.tap_units], [], [], 0)[0])

    def poll(self) -> int:
        lib, st = self.lib, self.st
        if st.place_slot >= 0:
            self.stats["guessed"] += 1
        self.op(f"fp_poll(0) place_slot={st.place_slot} rx_head={self.get('rx_head')} "
                f"rx_tail={self.get('rx_tail')}")
        n = lib.fp_poll(st, 0)
        assert 0 <= n <= lib.FP_MAX_EVENTS, n
        assert n == st.nevents, (n, st.nevents)
        for k in range(n):
            kind = st.events[k].kind
            self.stats["ev_frames"] += kind == 2
            self.stats["ev_conns"] += kind == 3
        self.check_events(reset=False)      # fp_poll resets st->nevents itself
        self.stats["polls"] += 1
        self.drain()
        return n

    def step(self) -> None:
        r = self.r
        self.now = time.monotonic()
        if self.hold == 0 and r.random() < 0.08:
            self.hold = r.randrange(3, 25)  # the application stops reading: its RX ring fills
        self.mangle_header(consume=self.hold == 0)
        if self.hold:
            self.hold -= 1
            self.stats["held"] += 1
        if self.procs == 2 and r.random() < 0.5:
            with contextlib.suppress(BlockingIOError):
                self.a.send(b"\x01")       # a doorbell: the TX processor's, concurrently
            self.stats["doorbells"] += 1
        c = self.peek()
        expect = c.rcv_nxt if c is not None else r.getrandbits(32)
        self.ack_floor = c.snd_una if c is not None else 0
        self.room = self.rcv_space()
        clean = r.random() < 0.6
        for _ in range(r.randint(1, 20)):
            data, expect, kind = self.batch_frame(expect, c, clean)
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.op(f"B.send {kind} len={len(data)} {data[:80].hex()}")
            self.send(data)
            self.stats["frames"] += 1
        self.poll()
        for _ in range(20):                 # what one wake-up left in A (buffers lent, batch done)
            if not self.readable():
                break
            self.poll()
        c = self.peek()
        if c is None or c.punted:
            self.stats["punted"] += 1
        if c is None or c.punted or r.random() < 0.02:
            self.repush()

    def close(self) -> dict:
        k = self.st.counters
        placed, misplaced = k.rx_placed, k.rx_misplaced
        if self.ringing:
            self.ringing = False
            self.bell_thread.join()
        if self.procs == 2:                 # the TX processor's own share of the work
            total = self.ffi.new("struct fp_counters *")
            self.lib.fp_counters_sum(self.st, total)
            self.stats["tx_proc_doorbells"] = tx_db = total.doorbells - k.doorbells
            self.stats["tx_proc_segments"] = total.segments - k.segments
            assert tx_db > 0, f"the TX processor took no doorbell: {self.stats}"
        self.stats.update(rx_frames=k.rx_frames, rx_placed=placed, rx_misplaced=misplaced, kinds=self.kinds,
                          punts=[int(k.punts[i]) for i in range(self.lib.FP_NPUNTS)])
        stats = super().close()
        assert placed > 0 and misplaced > 0, f"direct placement not exercised: {stats}"
        return stats


def child_poll(ffi, lib, r: random.Random, n: int, offloads: int, procs: int = 1) -> dict:
    eng = PollEngine(ffi, lib, r, offloads, procs)
    while eng.stats["frames"] < n:
        eng.step()
    return eng.close()


def child_engine(ffi, lib, r: random.Random, n: int, offloads: int, bursts_of_one: bool) -> dict:
    eng = Engine(ffi, lib, r, offloads, bursts_of_one)
    steps = 0
    while eng.stats["frames"] < n:
        eng.step()
        steps += 1
    return eng.close()


OPS: list[str] = []          # the last calls into the units, for the watchdog's report
OPS_KEEP = 48


def watchdog(seconds: float) -> threading.Timer:
    """cffi releases the GIL in C calls: a unit that never returns is reported from here."""
    def fire() -> None:
        sys.stderr.write(f"STUCK: no progress for {seconds:.0f} s; the last calls into the units, latest last:\n  "
                         + "\n  ".join(OPS) + "\n")
        sys.stderr.flush()
        os._exit(3)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def child_main(argv: list[str]) -> int:
    """argv: SEED PARSE_FRAMES ENGINE_FRAMES MODE (bursts: several calls per fp_end_burst, as
    fp_poll's bursts are; single: fp_end_burst after every call; poll: fp_poll reads the
    frames from a TAP socketpair; poll2: the same with the TX processor running, taking
    doorbells; commands: the command unit, sanitized_cmd.py) [WATCHDOG_SECONDS]."""
    import importlib

    seed, parse_frames, engine_frames = (int(a) for a in argv[:3])
    mode = argv[3]
    limit = float(argv[4]) if len(argv) > 4 else 30.0
    assert mode in ("bursts", "single", "poll", "poll2", "commands"), mode
    mod = importlib.import_module(MODULE)
    ffi, lib = mod.ffi, mod.lib
    dog = watchdog(limit)
    t0 = time.monotonic()
    r = random.Random(seed)
    report = child_parse(ffi, lib, r, parse_frames)
    t1 = time.monotonic()
    def engine(offloads: int, n: int) -> dict:
        """One engine run: fp_poll over the TAP stand-in, or the calls one by one."""
        if mode == "commands":                  # the command unit (sanitized_cmd.py)
            import sanitized_cmd
            return sanitized_cmd.child_commands(ffi, lib, random.Random(seed * 4 + 6 - offloads), n,
                                                guarded_mapping, globals())
        if mode in ("poll", "poll2"):
            return child_poll(ffi, lib, random.Random(seed * 4 + 4 - offloads), n, offloads=offloads,
                              procs=2 if mode == "poll2" else 1)
        return child_engine(ffi, lib, random.Random(seed * 4 + 2 - offloads), n, offloads=offloads,
                            bursts_of_one=mode == "single")

    e0 = engine(1, engine_frames // 2)
    e1 = engine(0, engine_frames - engine_frames // 2)
    t2 = time.monotonic()
    dog.cancel()
    print(f"DONE parse={parse_frames} {report} in {t1 - t0:.1f}s; engine ({mode}) offloads=1 {e0}; "
          f"offloads=0 {e1}; in {t2 - t1:.1f}s", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
