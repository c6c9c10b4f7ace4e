"""The queries every server under test is asked, and the answer expected of it.

``names(n)`` are the names of ../shared/bench/gen_queries.py (``hN.svc.mydomain.test``),
``write_queries`` writes them as a dnsperf query file, and ``ask``/``answer_ok`` are a
one-query UDP probe of 127.0.0.1 that checks for ``ANSWER`` (100.64.0.7). Nothing here
starts a process or sends anything off the loopback.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

ZONE = "svc.mydomain.test"
ANSWER = bytes([100, 64, 0, 7])  # 100.64.0.7, what every server answers


def names(n: int) -> list[str]:
    """The names of ../shared/bench/gen_queries.py: h0..h(n-1).svc.mydomain.test."""
    return [f"h{i}.{ZONE}" for i in range(n)]


def write_queries(out: Path, n: int) -> Path:
    path = out / f"queries-{n}.txt"
    path.write_text("".join(f"{name} A\n" for name in names(n)))
    return path


def dns_query(name: str, msg_id: int) -> bytes:
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", msg_id, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)


def ask(port: int, name: str, timeout: float = 0.5) -> bytes | None:
    """One UDP query for NAME A to 127.0.0.1:PORT; the reply, or None."""
    msg_id = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.send(dns_query(name, msg_id))
        try:
            while True:
                reply = sock.recv(4096)
                if len(reply) >= 12 and struct.unpack_from("!H", reply)[0] == msg_id:
                    return reply
        except (TimeoutError, ConnectionRefusedError):
            return None


def answer_ok(reply: bytes | None) -> bool:
    """NOERROR, at least one answer, and 100.64.0.7 in it."""
    if reply is None or len(reply) < 12:
        return False
    flags, _qd, ancount = struct.unpack_from("!HHH", reply, 2)
    return flags & 0x8000 != 0 and flags & 0xF == 0 and ancount > 0 and ANSWER in reply[12:]
