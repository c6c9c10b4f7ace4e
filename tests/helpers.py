"""Test helpers: configs from YAML text, queries from names, small loopback exchanges."""

from __future__ import annotations

import asyncio
import socket
import struct
import textwrap
from pathlib import Path

from dnslib import QTYPE

from horizon_dns.config.load import load_config
from horizon_dns.config.schema import Config
from horizon_dns.core.message import Edns, Query
from horizon_dns.core.names import text_to_name


def write_config(tmp: Path, rules: str | dict[str, str], server: str = "") -> Path:
    """A server file plus rules file(s) under ``tmp``; return the server file's path."""
    rules_dir = tmp / "rules"
    rules_dir.mkdir(exist_ok=True)
    files = rules if isinstance(rules, dict) else {"10-test.yaml": rules}
    for name, text in files.items():
        (rules_dir / name).write_text(textwrap.dedent(text))
    config = tmp / "horizon.yaml"
    config.write_text("rules: rules\n" + textwrap.dedent(server))
    return config


def config_from(tmp: Path, rules: str | dict[str, str], server: str = "") -> Config:
    return load_config(write_config(tmp, rules, server))


def make_query(
    name: str,
    qtype: str | int = "A",
    qclass: int = 1,
    client: str = "127.0.0.1",
    edns: bool = False,
) -> Query:
    code = qtype if isinstance(qtype, int) else int(getattr(QTYPE, qtype))
    wire = text_to_name(name)
    return Query(
        msg_id=4242,
        flags=0x0100,
        qname_wire=wire,
        qtype=code,
        qclass=qclass,
        edns=Edns(1232, 0, False) if edns else None,
        question=wire + code.to_bytes(2, "big") + qclass.to_bytes(2, "big"),
        client=(client, 5353),
    )


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a stream; EOFError when the peer closes first (bounded by the socket timeout)."""
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {size} bytes")
        out += chunk
    return bytes(out)


def tcp_read(sock: socket.socket) -> bytes:
    """One length-prefixed DNS message from a TCP stream (RFC 1035 §4.2.2)."""
    (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    return recv_exactly(sock, length)


async def udp_exchange(port: int, wire: bytes, timeout: float) -> bytes | None:
    """Send ``wire`` to 127.0.0.1:``port`` over UDP; the reply, or None after ``timeout``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, wire)
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None
    finally:
        sock.close()


class FakeClock:
    """A clock a test moves by hand (``clock.now += 10``), in place of core.clock.now
    (CLOCK_BOOTTIME, which counts suspend too)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
