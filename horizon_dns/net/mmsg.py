"""Many datagrams per system call: recvmmsg(2) and sendmmsg(2) through ctypes (Linux).

Contract: ``DatagramBatch(sock, slots)`` owns preallocated message headers,
address slots and buffers for one non-blocking UDP socket. ``receive()`` reads
up to ``slots`` datagrams in one call and returns how many arrived;
``message(i)`` gives datagram ``i`` and its sender's raw socket address;
``queue(i, reply)`` stages a reply to the sender of datagram ``i``;
``flush()`` sends every staged reply in one call and returns how many the
kernel took (a full socket buffer drops the rest, as it would drop any UDP).

Why: per query, a Python server spends more time in two system calls than in
finding the answer (bench/RESULTS.md). Batching ten datagrams per call is what
lets it keep pace with dnsmasq. ``available()`` says whether this platform can
do it (glibc, 64-bit); everywhere else the listener falls back to one datagram
per call through the event loop's transport.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform
import socket
import struct
import sys

# A slot holds the largest possible UDP payload, so no datagram is ever cut short
# (MSG_TRUNC cannot happen). The buffers are anonymous memory mappings, so
# only the pages the kernel writes into become resident: a slot costs 4 KiB of RSS
# for ordinary queries, not 64.
SLOT_BYTES = 65536
NAME_BYTES = 32  # sockaddr_in6 is 28 bytes; sockaddr_in 16
MSG_DONTWAIT = 0x40


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


HDR = ctypes.sizeof(_MMsgHdr)
IOV = ctypes.sizeof(_IoVec)
_NAME = _MsgHdr.msg_name.offset
_NAMELEN = _MsgHdr.msg_namelen.offset
_IOVP = _MsgHdr.msg_iov.offset
_IOVLEN = _MsgHdr.msg_iovlen.offset
_FLAGS = _MsgHdr.msg_flags.offset
_LEN = _MMsgHdr.msg_len.offset
_IOV_LEN = _IoVec.iov_len.offset

_libc: ctypes.CDLL | None = None


def available() -> bool:
    """Whether recvmmsg/sendmmsg can be used here (Linux, glibc, 64-bit)."""
    global _libc
    if _libc is not None:
        return True
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False  # musl lays msghdr out with explicit padding fields
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("recvmmsg", "sendmmsg"):
            function = getattr(libc, name)
            function.restype = ctypes.c_int
        libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    _libc = libc
    return True


def decode_address(name: bytes) -> tuple[str, int] | tuple[str, int, int, int]:
    """A raw sockaddr_in/sockaddr_in6 as the tuple ``socket.sendto`` takes."""
    (family,) = struct.unpack_from("=H", name)
    (port,) = struct.unpack_from("!H", name, 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, name[4:8]), port
    if family == socket.AF_INET6:
        (flowinfo,) = struct.unpack_from("!I", name, 4)
        (scope_id,) = struct.unpack_from("=I", name, 24)
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, scope_id
    raise ValueError(f"address family {family} is not IP")


class DatagramBatch:
    """Receive and send buffers for batched datagram I/O on one socket."""

    def __init__(self, sock: socket.socket, slots: int = 64) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self.fd = sock.fileno()
        self.slots = slots
        self.namelen = 16 if sock.family == socket.AF_INET else 28
        # One mapping per kind of data; offsets below are within each.
        self.headers = mmap.mmap(-1, 2 * slots * HDR + 2 * slots * IOV + slots * NAME_BYTES)
        self.buffers = mmap.mmap(-1, 2 * slots * SLOT_BYTES)
        head = _address(self.headers)
        buffers = _address(self.buffers)
        self._send_headers = slots * HDR
        iovs = 2 * slots * HDR
        self._send_iovs = iovs + slots * IOV
        self.names_offset = iovs + 2 * slots * IOV  # where sender addresses start in ``headers``
        self._send_buffers = slots * SLOT_BYTES
        self._head_address = head
        self.name_addresses = [head + self.names_offset + i * NAME_BYTES for i in range(slots)]
        for i in range(slots):
            recv_iov = iovs + i * IOV
            send_iov = self._send_iovs + i * IOV
            struct.pack_into("PN", self.headers, recv_iov, buffers + i * SLOT_BYTES, SLOT_BYTES)
            struct.pack_into("PN", self.headers, send_iov, buffers + self._send_buffers + i * SLOT_BYTES, 0)
            recv = i * HDR
            struct.pack_into("P", self.headers, recv + _NAME, self.name_addresses[i])
            struct.pack_into("I", self.headers, recv + _NAMELEN, NAME_BYTES)
            struct.pack_into("P", self.headers, recv + _IOVP, head + recv_iov)
            struct.pack_into("N", self.headers, recv + _IOVLEN, 1)
            send = self._send_headers + i * HDR
            struct.pack_into("I", self.headers, send + _NAMELEN, self.namelen)
            struct.pack_into("P", self.headers, send + _IOVP, head + send_iov)
            struct.pack_into("N", self.headers, send + _IOVLEN, 1)
        # Word views of the headers: one indexed read or write per field on the hot
        # path instead of a struct call. Every field they touch is naturally aligned.
        self._u32 = memoryview(self.headers).cast("I")
        self._u64 = memoryview(self.headers).cast("Q")
        self.queued = 0
        self.dropped = 0  # replies the kernel would not take (socket buffer full)

    def receive(self) -> int:
        """Read up to ``slots`` waiting datagrams; 0 when none. Other errors raise OSError."""
        assert _libc is not None
        # The kernel rewrites msg_namelen per datagram; on one socket it is always the
        # family's size, so it needs no reset between calls.
        count: int = _libc.recvmmsg(self.fd, self._head_address, self.slots, MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(code, errno.errorcode.get(code, str(code)))
        return count

    def message(self, i: int) -> tuple[bytes, bytes]:
        """Datagram ``i`` of the last receive and its sender's raw socket address."""
        length = self._u32[(i * HDR + _LEN) >> 2]
        start = i * SLOT_BYTES
        where = self.names_offset + i * NAME_BYTES
        name = self.headers[where : where + self.namelen]
        return self.buffers[start : start + length], name

    def queue(self, i: int, reply: bytes) -> None:
        """Stage ``reply`` for the sender of datagram ``i``; sent by the next ``flush``."""
        k = self.queued
        start = self._send_buffers + k * SLOT_BYTES
        size = len(reply)
        if size > SLOT_BYTES:
            return  # a UDP reply is at most 65,507 bytes; nothing larger is ever built
        self.buffers[start : start + size] = reply
        u64 = self._u64
        u64[(self._send_headers + k * HDR + _NAME) >> 3] = self.name_addresses[i]
        u64[(self._send_iovs + k * IOV + _IOV_LEN) >> 3] = size
        self.queued = k + 1

    def flush(self) -> int:
        """Send the staged replies; return how many the kernel accepted."""
        assert _libc is not None
        total = self.queued
        self.queued = 0
        sent = accepted = 0
        while sent < total:
            count: int = _libc.sendmmsg(
                self.fd, self._head_address + self._send_headers + sent * HDR, total - sent, MSG_DONTWAIT
            )
            if count > 0:
                sent += count
                accepted += count
                continue
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code in (errno.EAGAIN, errno.ENOBUFS):
                self.dropped += total - sent
                break
            # sendmmsg reports an error only for the first message it tried: that one
            # reply cannot go out (say, an address the route table rejects); go on.
            self.dropped += 1
            sent += 1
        return accepted


def _address(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))
