"""Who may use an adapter: socket file permissions, the ACL format, peer credentials.

The permission tests bind a real Unix socket, secure it, and connect from a forked
child that has become uid 65534 (nobody): the kernel's own permission check is the
oracle. They run on the file system of /run (where /run/toe lives) and on tmpfs.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator, Sequence

import pytest

from offload_daemon import access
from offload_daemon.access import (
    ACL_DEFAULT_XATTR,
    ACL_XATTR,
    AccessError,
    acl_xattr,
    ensure_run_dir,
    peer_allowed,
    peer_creds,
    secure_socket,
)
from offload_daemon.config import RUN_DIR, AdapterConfig

NOBODY = 65534
OTHER = 65533          # a uid that is neither nobody nor root
GROUP = 64999          # a gid for allow_group tests (need not exist in /etc/group)
NOACL = 0xFFFF_FFFF


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root (chown, setuid in a child)")
        pytest.skip("needs root (chown, setuid in a child)")


@pytest.fixture(params=[os.path.dirname(RUN_DIR), "/dev/shm"])
def open_dir(request: pytest.FixtureRequest, root: None) -> Iterator[str]:
    """A directory anybody may search, on the file system named by the parameter."""
    d = tempfile.mkdtemp(prefix="toe-access-", dir=request.param)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def listener(path: str, cfg: AdapterConfig) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    secure_socket(path, cfg)
    s.listen(8)
    return s


def connect_as(path: str, uid: int, gid: int, groups: Sequence[int] = ()) -> int:
    """errno of connect() to `path` from a child running as uid/gid/groups; 0 if it connected."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 254
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
                code = 0
            except OSError as e:
                code = e.errno or 253
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# ---------------------------------------------------------------- the ACL's bytes


def entries(raw: bytes) -> list[tuple[int, int, int]]:
    (version,) = struct.unpack_from("<I", raw)
    assert version == 2
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]


def test_acl_with_named_users_is_sorted_and_has_a_mask():
    assert entries(acl_xattr([1001, 1000, 1001])) == [
        (0x01, 6, NOACL), (0x02, 6, 1000), (0x02, 6, 1001), (0x04, 6, NOACL), (0x10, 6, NOACL), (0x20, 0, NOACL),
    ]


def test_acl_without_named_users_is_the_mode_0660():
    assert entries(acl_xattr([])) == [(0x01, 6, NOACL), (0x04, 6, NOACL), (0x20, 0, NOACL)]


# ---------------------------------------------------------------- peer_allowed


@pytest.mark.parametrize(
    "uid, gid, groups, cfg, allowed",
    [
        (0, 0, [], AdapterConfig(), True),                                    # root, always
        (0, 5, [7], AdapterConfig(allow_users=(1000,), allow_group=9), True),
        (1000, 1000, [], AdapterConfig(), False),                             # default: nobody else
        (1000, 1000, [], AdapterConfig(allow_users=(1000,)), True),
        (1001, 1001, [], AdapterConfig(allow_users=(1000,)), False),
        (1001, GROUP, [], AdapterConfig(allow_group=GROUP), True),           # primary group
        (1001, 1001, [5, GROUP], AdapterConfig(allow_group=GROUP), True),    # supplementary group
        (1001, 1001, [5, 6], AdapterConfig(allow_group=GROUP), False),
        (1001, 0, [0], AdapterConfig(), False),                               # group root is no pass
        (1001, 1001, [], AdapterConfig(allow_users=[1001]), True),           # a list, as from JSON
    ],
)
def test_peer_allowed(uid, gid, groups, cfg, allowed):
    assert peer_allowed(uid, gid, groups, cfg) is allowed


# ---------------------------------------------------------------- peer_creds


def test_peer_creds_of_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, gid, groups = peer_creds(a)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())
    assert sorted(groups) == sorted(set(os.getgroups()))


def test_peer_creds_with_more_groups_than_getsockopt_takes(root):
    """Over 256 supplementary groups do not fit CPython's 1024-byte getsockopt buffer."""
    many = list(range(70000, 70300))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups(many)
            a, b = socket.socketpair()
            os.setgroups([])
            got = peer_creds(a)[3]
            code = 0 if sorted(got) == many else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------- secure_socket


def test_a_user_not_listed_is_refused(open_dir):
    path = os.path.join(open_dir, "t.sock")
    with listener(path, AdapterConfig()):
        st = os.stat(path)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0)
        assert connect_as(path, NOBODY, NOBODY) == errno.EACCES
        assert connect_as(path, 0, 0) == 0


def test_a_listed_user_is_let_in_by_the_acl(open_dir):
    path = os.path.join(open_dir, "t.sock")
    with listener(path, AdapterConfig(allow_users=(NOBODY,))) as srv:
        assert os.stat(path).st_mode & 0o777 == 0o660
        assert os.getxattr(path, ACL_XATTR) == acl_xattr([NOBODY])
        assert connect_as(path, NOBODY, NOBODY) == 0
        assert connect_as(path, OTHER, OTHER) == errno.EACCES
        conn, _ = srv.accept()
        with conn:
            _pid, uid, gid, groups = peer_creds(conn)
        assert (uid, gid, groups) == (NOBODY, NOBODY, [])


def test_members_of_the_allowed_group_are_let_in(open_dir):
    path = os.path.join(open_dir, "t.sock")
    with listener(path, AdapterConfig(allow_group=GROUP)) as srv:
        assert os.stat(path).st_gid == GROUP
        assert connect_as(path, NOBODY, NOBODY, [GROUP]) == 0   # supplementary
        assert connect_as(path, NOBODY, GROUP) == 0             # primary
        assert connect_as(path, NOBODY, NOBODY, [5]) == errno.EACCES
        conn, _ = srv.accept()
        with conn:
            _pid, uid, gid, groups = peer_creds(conn)
        assert (uid, gid, groups) == (NOBODY, NOBODY, [GROUP])
        assert peer_allowed(uid, gid, groups, AdapterConfig(allow_group=GROUP))


def test_a_default_acl_of_the_directory_grants_nothing(open_dir):
    """A socket inherits its directory's default ACL; secure_socket replaces it."""
    rwx = 7
    default = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in [
        (0x01, rwx, NOACL), (0x02, rwx, NOBODY), (0x04, rwx, NOACL), (0x10, rwx, NOACL), (0x20, rwx, NOACL)])
    os.setxattr(open_dir, ACL_DEFAULT_XATTR, default)
    path = os.path.join(open_dir, "t.sock")
    with listener(path, AdapterConfig()):
        assert connect_as(path, NOBODY, NOBODY) == errno.EACCES
        assert connect_as(path, OTHER, OTHER) == errno.EACCES


def test_no_acl_support_is_an_error_only_when_users_are_listed(open_dir, monkeypatch):
    def no_acls(*_a, **_kw):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(access.os, "setxattr", no_acls)
    path = os.path.join(open_dir, "t.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(path)
        secure_socket(path, AdapterConfig(allow_group=GROUP))  # mode and group suffice
        with pytest.raises(AccessError) as e:
            secure_socket(path, AdapterConfig(allow_users=(1000, 1001)))
    assert e.value.errno == errno.EOPNOTSUPP
    assert str(e.value).splitlines() == [str(e.value)] and "ACL" in str(e.value) and "1000, 1001" in str(e.value)


# ---------------------------------------------------------------- the run directory


def test_run_dir_is_created_0755(open_dir):
    d = os.path.join(open_dir, "toe")
    old = os.umask(0o077)
    try:
        assert ensure_run_dir(d) == []
    finally:
        os.umask(old)
    st = os.stat(d)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 0, 0)


def test_a_world_writable_run_dir_is_repaired(open_dir):
    d = os.path.join(open_dir, "toe")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    os.chown(d, 0, GROUP)
    os.setxattr(d, ACL_DEFAULT_XATTR, acl_xattr([NOBODY]))
    assert ensure_run_dir(d) == ["mode 1777 -> 0755", f"group {GROUP} -> 0", "default ACL removed"]
    st = os.stat(d)
    assert (st.st_mode & 0o7777, st.st_gid) == (0o755, 0)
    with pytest.raises(OSError) as e:
        os.getxattr(d, ACL_DEFAULT_XATTR)
    assert e.value.errno == errno.ENODATA
    assert ensure_run_dir(d) == []


@pytest.mark.parametrize("kind", ["file", "symlink", "foreign"])
def test_a_run_dir_that_cannot_be_trusted_is_refused(open_dir, kind):
    d = os.path.join(open_dir, "toe")
    if kind == "file":
        open(d, "w").close()
    elif kind == "symlink":
        os.symlink(open_dir, d)
    else:
        os.mkdir(d)
        os.chown(d, NOBODY, NOBODY)
    with pytest.raises(AccessError) as e:
        ensure_run_dir(d)
    assert d in str(e.value) and "\n" not in str(e.value)
