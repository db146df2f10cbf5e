"""Set and get socket options on fresh TCP sockets and print every answer.

Run once on kernel sockets and once under the shim (test_features.py): the
two outputs must be identical.  One line per case: level, name, the value
set (None: not set), the getsockopt buffer length (None: no get), then
set=ok|errno and get=hex|errno.
"""
import socket

SOL, TCP, IPL = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP
SO_BUSY_POLL, SO_INCOMING_CPU, SO_ZEROCOPY, SO_PEEK_OFF = 46, 49, 60, 42
SO_SELECT_ERR_QUEUE, SO_RXQ_OVFL, SO_NO_CHECK, SO_TIMESTAMPNS = 45, 40, 11, 35
TCP_THIN_LINEAR_TIMEOUTS, TCP_FASTOPEN_CONNECT, TCP_INQ, TCP_TX_DELAY = 16, 30, 36, 37
IP_RECVERR_RFC4884, IP_MULTICAST_ALL, IP_MINTTL, IP_PKTINFO, IP_RECVTTL = 26, 49, 21, 8, 12
IP_BIND_ADDRESS_NO_PORT, IP_RECVTOS, IP_MTU_DISCOVER = 24, 13, 10
C = [
    (SOL, socket.SO_PRIORITY, 3, 4), (SOL, socket.SO_PRIORITY, 3, 1), (SOL, socket.SO_PRIORITY, 3, 8),
    (SOL, socket.SO_PRIORITY, 7, 4), (SOL, socket.SO_PRIORITY, b"\x03", 4), (SOL, socket.SO_PRIORITY, None, 4),
    (SOL, socket.SO_MARK, 5, 4), (SOL, socket.SO_MARK, None, 4),
    (SOL, socket.SO_RCVLOWAT, 100, 4), (SOL, socket.SO_RCVLOWAT, 0, 4), (SOL, socket.SO_RCVLOWAT, -1, 4),
    (SOL, socket.SO_RCVLOWAT, 10**9, 4), (SOL, socket.SO_RCVLOWAT, None, 4),
    (SOL, socket.SO_SNDLOWAT, 1, 4), (SOL, socket.SO_SNDLOWAT, None, 4),
    (SOL, socket.SO_DEBUG, 5, 4), (SOL, socket.SO_BROADCAST, 2, 4), (SOL, socket.SO_OOBINLINE, 1, 4),
    (SOL, socket.SO_DONTROUTE, 3, 4), (SOL, SO_NO_CHECK, 1, 4), (SOL, socket.SO_PASSCRED, 9, 4),
    (SOL, SO_ZEROCOPY, 1, 4), (SOL, SO_ZEROCOPY, 2, 4), (SOL, SO_BUSY_POLL, 10, 4), (SOL, SO_BUSY_POLL, -1, 4),
    (SOL, SO_INCOMING_CPU, None, 4), (SOL, SO_INCOMING_CPU, 1, 4), (SOL, 29, 1, 4),
    (SOL, SO_TIMESTAMPNS, 1, 4), (SOL, SO_SELECT_ERR_QUEUE, 1, 4), (SOL, SO_RXQ_OVFL, 4, 4),
    (SOL, socket.SO_PEERCRED, None, 12), (SOL, socket.SO_PEERCRED, None, 4), (SOL, socket.SO_BINDTODEVICE, None, 16),
    (SOL, SO_PEEK_OFF, None, 4), (SOL, socket.SO_DEBUG, b"\x01\x00", 4),
    (TCP, socket.TCP_QUICKACK, None, 4), (TCP, socket.TCP_QUICKACK, 0, 4), (TCP, socket.TCP_QUICKACK, 5, 4),
    (TCP, socket.TCP_USER_TIMEOUT, 1000, 4), (TCP, socket.TCP_USER_TIMEOUT, 1000, 2),
    (TCP, socket.TCP_USER_TIMEOUT, -1, 4), (TCP, socket.TCP_USER_TIMEOUT, b"\x01\x02", 4),
    (TCP, socket.TCP_USER_TIMEOUT, None, 4),
    (TCP, socket.TCP_SYNCNT, 3, 4), (TCP, socket.TCP_SYNCNT, 0, 4), (TCP, socket.TCP_SYNCNT, 128, 4),
    (TCP, socket.TCP_SYNCNT, None, 4),
    (TCP, socket.TCP_LINGER2, 0, 4), (TCP, socket.TCP_LINGER2, -5, 4), (TCP, socket.TCP_LINGER2, 30, 4),
    (TCP, socket.TCP_LINGER2, 500, 4), (TCP, socket.TCP_LINGER2, None, 4),
    (TCP, socket.TCP_DEFER_ACCEPT, 5, 4), (TCP, socket.TCP_DEFER_ACCEPT, 1, 4), (TCP, socket.TCP_DEFER_ACCEPT, 0, 4),
    (TCP, socket.TCP_DEFER_ACCEPT, -3, 4), (TCP, socket.TCP_DEFER_ACCEPT, 100, 4),
    (TCP, socket.TCP_DEFER_ACCEPT, 1000, 4),
    (TCP, socket.TCP_WINDOW_CLAMP, 100, 4), (TCP, socket.TCP_WINDOW_CLAMP, 0, 4),
    (TCP, socket.TCP_WINDOW_CLAMP, 50000, 4),
    (TCP, socket.TCP_NOTSENT_LOWAT, None, 4), (TCP, socket.TCP_NOTSENT_LOWAT, 16384, 4),
    (TCP, TCP_THIN_LINEAR_TIMEOUTS, 1, 4), (TCP, TCP_THIN_LINEAR_TIMEOUTS, 2, 4),
    (TCP, socket.TCP_FASTOPEN, 5, 4), (TCP, socket.TCP_FASTOPEN, -1, 4), (TCP, socket.TCP_FASTOPEN, 100000, 4),
    (TCP, TCP_FASTOPEN_CONNECT, 1, 4), (TCP, TCP_FASTOPEN_CONNECT, 2, 4),
    (TCP, TCP_INQ, 1, 4), (TCP, TCP_INQ, 2, 4), (TCP, TCP_TX_DELAY, 100, 4),
    (TCP, socket.TCP_CONGESTION, b"cubic", 16), (TCP, socket.TCP_CONGESTION, b"cubic", 4),
    (TCP, socket.TCP_CONGESTION, b"nosuch", None), (TCP, socket.TCP_CONGESTION, b"", None),
    (TCP, socket.TCP_CONGESTION, b"reno\0xx", 16),
    (IPL, socket.IP_TOS, 0x10, 4), (IPL, socket.IP_TOS, 0x11, 4), (IPL, socket.IP_TOS, b"\x28", 4),
    (IPL, socket.IP_TOS, 0x10, 1), (IPL, socket.IP_TOS, 0x10, 2), (IPL, socket.IP_TOS, 0x1ff, 4),
    (IPL, socket.IP_TOS, b"", 4), (IPL, socket.IP_TOS, None, 1), (IPL, socket.IP_TOS, -1, 4),
    (IPL, socket.IP_TTL, None, 4), (IPL, socket.IP_TTL, None, 1), (IPL, socket.IP_TTL, 100, 4),
    (IPL, socket.IP_TTL, 0, 4), (IPL, socket.IP_TTL, -1, 4), (IPL, socket.IP_TTL, 256, 4),
    (IPL, socket.IP_TTL, b"", 4),
    (IPL, socket.IP_TTL, b"\x07", 2), (IPL, socket.IP_TTL, 300, 3),
    (IPL, IP_MTU_DISCOVER, None, 4), (IPL, IP_MTU_DISCOVER, 2, 4), (IPL, IP_MTU_DISCOVER, 6, 4),
    (IPL, IP_MINTTL, 5, 4), (IPL, IP_MINTTL, 256, 4), (IPL, 11, 7, 4), (IPL, 11, 7, 1),
    (IPL, 15, 1, 4), (IPL, socket.IP_TRANSPARENT, 1, 4), (IPL, IP_BIND_ADDRESS_NO_PORT, 1, 4),
    (IPL, IP_RECVTOS, 1, 4), (IPL, IP_RECVTTL, 1, 4), (IPL, IP_PKTINFO, 1, 4),
    (IPL, socket.IP_MULTICAST_LOOP, None, 4), (IPL, socket.IP_MULTICAST_LOOP, 0, 4),
    (IPL, socket.IP_MULTICAST_LOOP, b"", 4),
    (IPL, IP_MULTICAST_ALL, None, 4), (IPL, IP_MULTICAST_ALL, 2, 4), (IPL, IP_RECVERR_RFC4884, 1, 4),
    (IPL, IP_RECVERR_RFC4884, 2, 4),
]
# the same on a listening socket (bound to any address, port chosen by the stack)
L = [
    (TCP, socket.TCP_FASTOPEN, 5, 4), (TCP, socket.TCP_WINDOW_CLAMP, 0, 4), (TCP, TCP_FASTOPEN_CONNECT, 1, 4),
    (SOL, socket.SO_ACCEPTCONN, None, 4), (TCP, socket.TCP_DEFER_ACCEPT, 3, 4), (IPL, socket.IP_TOS, 0x20, 1),
]
for listening, cases in ((False, C), (True, L)):
  for level, name, val, getlen in cases:
    s = socket.socket()
    if listening:
        s.bind(("0.0.0.0", 0))
        s.listen()
    out = []
    if val is not None:
        try:
            s.setsockopt(level, name, val)
            out.append("set=ok")
        except OSError as e:
            out.append(f"set={e.errno}")
    try:
        if getlen is not None:
            out.append("get=" + s.getsockopt(level, name, getlen).hex())
    except OSError as e:
        out.append(f"get={e.errno}")
    s.close()
    print("listen" if listening else "new", level, name, val, getlen, *out)
