"""Who may use an adapter: the permissions of its sockets and the check at accept time.

The daemon runs as root; a process that can connect to its control socket gets
sockets, ring memory and packets on the wire in its name. Two locks, both from
the adapter's AdapterConfig (`allow_users`, `allow_group`; docs/security.md):

* the socket files: connecting to a Unix socket needs write permission on its
  file, so `secure_socket()` makes each one root:<allow_group> mode 0660 plus a
  POSIX ACL entry `user:<uid>:rw-` per allowed uid. Call it right after bind(), the
  file being owner-only until then (bound under umask 0177, or not yet listening):
  it never accepts a connection under laxer permissions;
* the peer's credentials: at accept(), `peer_allowed(*peer_creds(conn)[1:], cfg)`
  checks the uid, gid and supplementary groups the kernel recorded when the
  peer called connect() (so a later setuid of the peer changes nothing).

The directory holding them, RUN_DIR, is root's, mode 0755 (`ensure_run_dir()`).
Every failure is an OSError whose str() is one readable line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
from collections.abc import Sequence

from offload_daemon.config import RUN_DIR, AdapterConfig

ACL_XATTR = "system.posix_acl_access"
ACL_DEFAULT_XATTR = "system.posix_acl_default"
ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFF_FFFF
PERM_R, PERM_W, PERM_X = 4, 2, 1
SOCKET_MODE = 0o660
RUN_DIR_MODE = 0o755
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536
_UCRED = struct.Struct("=iII")          # struct ucred: pid_t pid, uid_t uid, gid_t gid


class AccessError(OSError):
    """An OSError (errno kept) whose str() is its one-line message, without "[Errno N]"."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


def acl_xattr(users: Sequence[int]) -> bytes:
    """The `system.posix_acl_access` value for mode 0660 plus `user:<uid>:rw-` per uid.

    Format (linux/posix_acl_xattr.h): u32 version, then (u16 tag, u16 perm, u32 id)
    entries, little-endian, sorted by tag then id. Named users need a MASK entry.
    """
    rw = PERM_R | PERM_W
    entries = [(ACL_USER_OBJ, rw, ACL_UNDEFINED_ID)]
    entries += [(ACL_USER, rw, uid) for uid in sorted(set(users))]
    entries.append((ACL_GROUP_OBJ, rw, ACL_UNDEFINED_ID))
    if users:
        entries.append((ACL_MASK, rw, ACL_UNDEFINED_ID))
    entries.append((ACL_OTHER, 0, ACL_UNDEFINED_ID))
    return struct.pack("<I", ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def secure_socket(path: str, cfg: AdapterConfig) -> None:
    """Make the just-bound Unix socket file `path` usable by root, cfg.allow_users and
    members of cfg.allow_group only: root:<allow_group or 0>, mode 0660, ACL user entries.

    Raises OSError (one line) when the file system refuses the ACL and allow_users is
    not empty: without it the listed users would be locked out (or, worse, someone
    would widen the mode to let them in).
    """
    os.chown(path, 0, cfg.allow_group if cfg.allow_group is not None else 0, follow_symlinks=False)
    os.chmod(path, SOCKET_MODE)
    # Always written, also without named users: it replaces whatever a default ACL on
    # the directory gave the file (a minimal ACL is just the mode; the kernel stores none).
    try:
        os.setxattr(path, ACL_XATTR, acl_xattr(cfg.allow_users), follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise AccessError(e.errno, f"cannot set the ACL of {path}: {e.strerror}") from None
        if cfg.allow_users:
            users = ", ".join(map(str, cfg.allow_users))
            raise AccessError(e.errno, f"the file system of {path} does not support POSIX ACLs, "
                              f"needed to let uids {users} in; use --allow-group instead") from None


def ensure_run_dir(path: str = RUN_DIR) -> list[str]:
    """Create `path` as root's directory, mode 0755, or repair one that is not (e.g.
    world writable, group not root, a default ACL); refuse one that is not a directory
    or not owned by root. Returns what was repaired, for the caller to tell."""
    try:
        os.mkdir(path, RUN_DIR_MODE)
        created = True
    except FileExistsError:
        created = False
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise AccessError(errno.ENOTDIR, f"{path} is not a directory; remove it")
    if st.st_uid != 0:
        raise AccessError(errno.EPERM, f"{path} is owned by uid {st.st_uid}, not root; remove it "
                      "(anything in it may have been planted)")
    repaired = []
    if stat.S_IMODE(st.st_mode) != RUN_DIR_MODE:  # also what the umask took from a new one
        os.chmod(path, RUN_DIR_MODE)
        repaired.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {RUN_DIR_MODE:04o}")
    if st.st_gid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
        repaired.append(f"group {st.st_gid} -> 0")
    try:  # (removing a default ACL that is not there succeeds: look first)
        os.getxattr(path, ACL_DEFAULT_XATTR, follow_symlinks=False)
        os.removexattr(path, ACL_DEFAULT_XATTR, follow_symlinks=False)
        repaired.append("default ACL removed")
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise AccessError(e.errno, f"cannot remove the default ACL of {path}: {e.strerror}") from None
    return [] if created else repaired


def peer_allowed(uid: int, gid: int, groups: Sequence[int], cfg: AdapterConfig) -> bool:
    """True if a peer with these credentials may use the adapter: root, a uid in
    cfg.allow_users, or cfg.allow_group as its primary or a supplementary group."""
    if uid == 0 or uid in cfg.allow_users:
        return True
    return cfg.allow_group is not None and (gid == cfg.allow_group or cfg.allow_group in groups)


def peer_creds(sock: socket.socket) -> tuple[int, int, int, list[int]]:
    """(pid, uid, gid, supplementary groups) of a connected Unix socket's peer, as the
    kernel recorded them at connect() (SO_PEERCRED, SO_PEERGROUPS)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    try:  # CPython caps getsockopt's buffer at 1024 bytes: 256 groups
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as e:
        if e.errno != errno.ERANGE:
            raise
        raw = _peergroups_large(sock.fileno())
    n = len(raw) // 4
    return pid, uid, gid, list(struct.unpack(f"={n}I", raw[: 4 * n]))


def _peergroups_large(fd: int) -> bytes:
    """SO_PEERGROUPS with room for NGROUPS_MAX groups (through libc: see peer_creds)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(4 * NGROUPS_MAX)
    size = ctypes.c_uint32(len(buf))
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise AccessError(err, f"SO_PEERGROUPS: {os.strerror(err)}")
    return buf.raw[: size.value]
