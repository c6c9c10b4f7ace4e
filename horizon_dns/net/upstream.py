"""Asking an upstream DNS server: one message out, the matching reply back.

Contract: ``await exchange_udp(upstream, message, question_end, timeout)`` and
``exchange_tcp`` (same arguments) send ``message`` (whose ID and question the
caller chose; its question ends at ``question_end``) and
return the first reply that passes every check dnspython's ``asyncquery`` makes
(RFC 5452 §4.2, §9.1): it comes from the upstream's address and port (a fresh
connected socket per query gives a random source port and lets the kernel drop
everything else), QR is set, the ID matches, and the question is ours, compared
case-insensitively -- or, from a server without EDNS, a FORMERR with our ID and
no question (RFC 6891 §7). Anything else is ignored and waiting continues, so a
spoofed or stale datagram cannot end the exchange. Timeouts raise
``asyncio.TimeoutError``; socket errors raise ``OSError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from dataclasses import dataclass

from horizon_dns.core.address import split_host_port
from horizon_dns.core.wire import FORMERR, HEADER, QR, TCP_LENGTH, tcp_frame


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream server: ``host`` is an IP address; ``tls_name`` set means DNS over TLS."""

    host: str
    port: int = 53
    tls_name: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.tls_name is not None:
            return f"tls://{host}:{self.port}#{self.tls_name}"
        return f"{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def parse_upstream(text: str) -> Upstream:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``[::1]:53``, ``tls://9.9.9.9#dns.quad9.net``."""
    tls_name: str | None = None
    rest = text.strip()
    default_port = 53
    if rest.startswith("tls://"):
        rest = rest[len("tls://") :]
        default_port = 853
        if "#" in rest:
            rest, tls_name = rest.split("#", 1)
        if not tls_name:
            raise ValueError(f"{text!r}: DNS over TLS needs the server's name: tls://IP#NAME")
    elif "://" in rest:
        raise ValueError(f"{text!r}: only plain IP[:PORT] and tls://IP[:PORT]#NAME are supported")
    try:
        host, port = split_host_port(rest, default_port, min_port=1)
    except ValueError as exc:
        raise ValueError(f"{exc}; upstreams are IP addresses (a name would need DNS to find DNS)") from None
    return Upstream(host, port, tls_name)


def reply_matches(reply: bytes, message: bytes, question_end: int) -> bool:
    """Same ID, QR=1, one question equal to ours ignoring ASCII case (RFC 5452 §9.1).

    One exception: a FORMERR with our ID and no question section, as servers without
    EDNS send to a query with OPT (RFC 6891 §7); the caller retries without OPT. It
    must still come from the upstream's address and port.
    """
    if len(reply) < HEADER.size:
        return False
    msg_id, flags, qdcount = struct.unpack_from("!HHH", reply)
    if msg_id != struct.unpack_from("!H", message)[0] or not flags & QR:
        return False
    if qdcount == 0:
        return bool(flags & 0xF == FORMERR)
    if qdcount != 1 or len(reply) < question_end:
        return False
    return reply[HEADER.size : question_end].lower() == message[HEADER.size : question_end].lower()


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, message: bytes, question_end: int, peer: tuple[str, int]) -> None:
        self.message = message
        self.question_end = question_end
        self.peer = peer
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.ignored = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if (str(addr[0]), int(addr[1])) != self.peer and not _same_address(addr, self.peer):
            self.ignored += 1
            return
        if not reply_matches(data, self.message, self.question_end):
            self.ignored += 1
            return
        if not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("socket closed"))


def _same_address(addr: tuple[str | int, ...], peer: tuple[str, int]) -> bool:
    try:
        return ipaddress.ip_address(str(addr[0])) == ipaddress.ip_address(peer[0]) and int(addr[1]) == peer[1]
    except ValueError:
        return False


async def exchange_udp(upstream: Upstream, message: bytes, question_end: int, timeout: float) -> bytes:
    """Send over UDP from a fresh random port; return the first matching reply."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(message, question_end, upstream.address), remote_addr=upstream.address
    )
    try:
        transport.sendto(message)
        return await asyncio.wait_for(asyncio.shield(protocol.done), timeout)
    finally:
        transport.close()
        if not protocol.done.done():
            protocol.done.cancel()
        elif not protocol.done.cancelled():
            protocol.done.exception()  # mark retrieved


async def exchange_tcp(upstream: Upstream, message: bytes, question_end: int, timeout: float) -> bytes:
    """Send over a new TCP connection (RFC 7766); return the first matching reply."""

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(tcp_frame(message))
            await writer.drain()
            while True:
                (length,) = TCP_LENGTH.unpack(await reader.readexactly(2))
                data = await reader.readexactly(length)
                if reply_matches(data, message, question_end):
                    return data
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(run(), timeout)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError(f"{upstream} closed the connection") from exc
