"""TCP listener: length-prefixed messages, pipelined (RFC 7766 §6.2.1.1, §8).

Contract: each message of a connection is answered as soon as it completes, in
any order (clients match by ID): at once when it needs no I/O, else from its own
task. A connection closes after ``idle_timeout`` seconds with nothing to read or send
(RFC 7766 §6.2.3) -- a slowloris holds a connection no longer than that.
Reading pauses while ``max_inflight`` queries of one connection are unanswered.
Connections beyond ``max_connections``, or beyond the policy's per-client cap,
are closed at once. A client outside the listener's allow list gets REFUSED.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import cast

from horizon_dns.core.access import Acl, EdgePolicy
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.wire import REFUSED, TCP_LENGTH, short_reply, tcp_frame
from horizon_dns.net.eager import start_eagerly
from horizon_dns.net.udp import InFlight

log = logging.getLogger("horizon_dns.net.tcp")


@dataclass(slots=True)
class TcpLimits:
    idle_timeout: float = 10.0
    max_connections: int = 256
    max_inflight: int = 64


class TcpConnections:
    """Connections shared by every TCP listener of a server, in all and per client."""

    def __init__(self, limits: TcpLimits, policy: EdgePolicy | None = None) -> None:
        self.limits = limits
        self.policy = policy or EdgePolicy()
        self.open: set[TcpConnection] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.rejected = 0

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close_when_idle()


class TcpConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self, handler: QueryHandler, inflight: InFlight, conns: TcpConnections, acl: Acl | None = None
    ) -> None:
        self.handler = handler
        self.inflight = inflight
        self.conns = conns
        self.acl = acl
        self.refusing = False  # a client outside the allow list: every query gets REFUSED
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.buffer = bytearray()
        self.pending = 0
        self.paused = False
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self._out: list[bytes] | None = None  # replies gathered for one write, inside data_received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
        client = self.peer[0] if self.peer else ""
        conns = self.conns
        if (
            len(conns.open) >= conns.limits.max_connections
            or conns.per_client[client] >= conns.policy.tcp_per_client
        ):
            conns.rejected += 1
            transport.abort()
            return
        conns.open.add(self)
        conns.per_client[client] += 1
        if self.acl is not None and not self.acl.allows(client):
            self.refusing = True
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.conns.open:
            self.conns.open.discard(self)
            client = self.peer[0] if self.peer else ""
            self.conns.per_client[client] -= 1
            if self.conns.per_client[client] <= 0:
                del self.conns.per_client[client]
        if self.idle is not None:
            self.idle.cancel()
        self.transport = None

    def eof_received(self) -> bool:
        """The client has half-closed: answer what it already asked, then close.

        Returning True keeps our side open until the last pending reply is written
        (RFC 7766 §6.2.3-6.2.4: a server closes after sending what it owes).
        """
        self.closing = True
        return self.pending > 0

    def _arm_idle(self) -> None:
        # Called on every read and reply: only remember when; the one timer re-arms
        # itself for the rest of the interval when it fires early. Cancelling and
        # creating a timer per read costs more than answering a cached query.
        self.last_active = time.monotonic()
        if self.idle is None:
            loop = asyncio.get_running_loop()
            self.idle = loop.call_later(self.conns.limits.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self.idle = None
        if self.transport is None:
            return
        timeout = self.conns.limits.idle_timeout
        left = self.last_active + timeout - time.monotonic()
        if self.pending:
            left = timeout  # a query still being answered: not idle; its reply re-arms
        if left > 0.001:
            self.idle = asyncio.get_running_loop().call_later(left, self._on_idle)
            return
        self.transport.close()

    def close_when_idle(self) -> None:
        """Stop reading; close now if nothing is pending, else after the last reply."""
        self.closing = True
        if self.transport is None:
            return
        if self.pending == 0:
            self.transport.close()
        elif not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._arm_idle()
        buffer = self.buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
        # Every complete message of this read; the replies the hot path gives at once
        # leave in one write (one system call for a pipelined burst, RFC 7766 §6.2.1.1).
        out: list[bytes] = []
        offset = 0
        end = len(data)
        while offset + 2 <= end:
            (length,) = TCP_LENGTH.unpack_from(data, offset)
            if offset + 2 + length > end:
                break
            message = data[offset + 2 : offset + 2 + length]
            offset += 2 + length
            if self.refusing:
                self.conns.policy.refused += 1
                refusal = short_reply(message, REFUSED)
                if refusal is not None:
                    out.append(tcp_frame(refusal))
                continue
            reply = self.handler.hot_answer(message, tcp=True)
            if reply is not None:
                out.append(tcp_frame(reply))
                continue
            self.pending += 1
            self._out = out  # a reply the pipeline gives without waiting joins this write
            task = start_eagerly(self._answer(message))
            self._out = None
            if task is not None:
                self.inflight.add(task)
        if offset < end:
            self.buffer = bytearray(data[offset:])
        elif buffer:
            self.buffer = bytearray()
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out))
        if self.pending >= self.conns.limits.max_inflight and not self.paused:
            transport.pause_reading()
            self.paused = True

    async def _answer(self, message: bytes) -> None:
        try:
            reply = await self.handler.handle(message, self.peer, "tcp")
            transport = self.transport
            if reply is not None and transport is not None and not transport.is_closing():
                if self._out is not None:
                    self._out.append(tcp_frame(reply))
                else:
                    transport.write(tcp_frame(reply))
        finally:
            self.pending -= 1
            self._after_reply()

    def _after_reply(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.closing:
            if self.pending == 0:
                transport.close()
            return
        if self.paused and self.pending < self.conns.limits.max_inflight:
            transport.resume_reading()
            self.paused = False
        self._arm_idle()
