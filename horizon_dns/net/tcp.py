"""TCP connections under one set of rules, for the DNS listener and the LLMNR responder.

Contract (DECISIONS.md 6; RFC 7766 for DNS, RFC 4795 §2.4 for LLMNR): messages
arrive behind a two-byte length (RFC 1035 §4.2.2) and may be pipelined; a
:class:`FramedConnection` hands each complete one to ``on_message`` and writes
what comes back, and :class:`TcpConnections` is the table every connection of a
server must be admitted to. The rules, in the order a connection meets them:

* **Allow list first.** A client outside the listener's ``allow`` is closed in
  ``connection_made``, before it counts against any limit, without a byte read.
* **Admission.** At most ``max_connections`` in all, and ``per_client`` from one
  address off loopback. When either is reached, the connection idle longest --
  or, failing one, the one whose current message has been arriving longest -- is
  closed to make room (RFC 7766 §6.2.3 lets a server close idle connections);
  only when every candidate is busy answering is the newcomer refused. Every
  local program shares 127.0.0.1, so loopback has no per-address cap: eviction
  is what keeps a local program holding many connections from locking out
  systemd-resolved.
* **Deadlines.** ``idle_timeout`` with nothing to read, answer or send; and
  ``message_timeout`` from the first byte of a message to its last, which no
  trickle of bytes extends.
* **Backpressure.** Reading pauses while unsent replies exceed ``max_unsent``
  bytes (the transport's ``pause_writing``) or ``max_inflight`` messages are
  being answered, and resumes when both have drained: a client that sends and
  never reads costs a bounded buffer, not memory without end.
* **Framing** is incremental: bytes of an unfinished message are appended once
  and parsed once when it completes, so a trickled frame costs linear, not
  quadratic, copying.

:class:`TcpConnection` is the DNS listener's connection: each message is answered
as soon as it completes, in any order (clients match by ID, RFC 7766 §6.2.1.1), at
once when the hot path or a pipeline without I/O can, else from its own task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import cast

from horizon_dns.core.access import Acl, EdgePolicy, is_loopback
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.wire import TCP_LENGTH, tcp_frame
from horizon_dns.net.eager import start_eagerly
from horizon_dns.net.udp import InFlight

log = logging.getLogger("horizon_dns.net.tcp")

#: Reply bytes one connection may produce per turn of the event loop (~300 answers).
TURN_BUDGET = 16 * 1024


@dataclass(slots=True)
class TcpLimits:
    idle_timeout: float = 10.0
    max_connections: int = 256
    max_inflight: int = 64
    #: Seconds from a message's first byte to its last.
    message_timeout: float = 5.0
    #: Unsent reply bytes of one connection before it stops being read.
    max_unsent: int = 64 * 1024


class TcpConnections:
    """The connections of every TCP listener of one server: admission and eviction."""

    def __init__(self, limits: TcpLimits, policy: EdgePolicy | None = None) -> None:
        self.limits = limits
        self.policy = policy or EdgePolicy()
        #: In order of admission; a dict for O(1) removal.
        self.open: dict[FramedConnection, None] = {}
        self.per_client: collections.Counter[str] = collections.Counter()
        self.rejected = 0  # refused: every candidate for eviction was busy
        self.evicted = 0  # closed to make room for a newcomer

    def admit(self, conn: FramedConnection, client: str) -> bool:
        """Count ``conn`` in, closing an idle or slow connection to make room; False
        when none can be closed (every candidate is answering)."""
        capped = not is_loopback(client) and self.per_client[client] >= self.policy.tcp_per_client
        if capped and not self._evict([c for c in self.open if c.client == client]):
            self.rejected += 1
            return False
        if len(self.open) >= self.limits.max_connections and not self._evict(list(self.open)):
            self.rejected += 1
            return False
        self.open[conn] = None
        self.per_client[client] += 1
        return True

    def release(self, conn: FramedConnection) -> None:
        """Count ``conn`` out; a second call (eviction, then connection_lost) does nothing."""
        if conn in self.open:
            del self.open[conn]
            self.per_client[conn.client] -= 1
            if self.per_client[conn.client] <= 0:
                del self.per_client[conn.client]

    def _evict(self, candidates: list[FramedConnection]) -> bool:
        """Close the connection idle longest, else the slowest message; False if none."""
        idle = [c for c in candidates if c.is_idle()]
        if idle:
            victim = min(idle, key=lambda c: c.last_active)
        else:
            slow = [c for c in candidates if c.message_started is not None and not c.pending]
            if not slow:
                return False
            victim = min(slow, key=lambda c: cast(float, c.message_started))
        self.evicted += 1
        self.release(victim)  # now: its connection_lost comes a loop turn later
        victim.abort()
        return True

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close_when_idle()


class FramedConnection(asyncio.Protocol):
    """One connection under the rules above; subclasses answer ``on_message``."""

    def __init__(self, conns: TcpConnections, acl: Acl | None = None) -> None:
        self.conns = conns
        self.acl = acl
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.client = ""
        self.buffer = bytearray()
        self.need = 2  # bytes the buffer must hold before a message can complete
        self.message_started: float | None = None
        self.pending = 0
        self.paused = False
        self.write_blocked = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self._out: list[bytes] | None = None  # replies gathered for one write, inside _parse
        self._out_bytes = 0
        #: Complete messages wait in the buffer: this turn's reply budget is spent.
        self.backlog = False

    # The transport's side ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
            self.client = self.peer[0]
        if self.acl is not None and not self.acl.allows(self.client):
            self.conns.policy.refused += 1
            self.transport = None
            transport.abort()
            return
        if not self.conns.admit(self, self.client):
            self.transport = None
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.conns.limits.max_unsent)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The kernel's buffers are unsent and unparsed bytes too, and autotuned they
            # grow to megabytes (tcp_wmem, tcp_rmem): a client that never reads would
            # have us answer that much first, and a read would bring us up to 256 KiB
            # to hold. Fixed, each is max_unsent (the kernel doubles it).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.conns.limits.max_unsent)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.conns.limits.max_unsent)
        self.last_active = asyncio.get_running_loop().time()
        self._arm(self.last_active + self.conns.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.release(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def pause_writing(self) -> None:
        self.write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.backlog:
            self._resume_parsing()
        self._update_reading()

    def eof_received(self) -> bool:
        """The client has half-closed: answer what it already asked, then close.

        Returning True keeps our side open until the last pending reply is written
        (RFC 7766 §6.2.3-6.2.4: a server closes after sending what it owes).
        """
        self.closing = True
        return self.pending > 0

    def data_received(self, data: bytes) -> None:
        if self.closing or self.transport is None:
            return
        self.last_active = asyncio.get_running_loop().time()
        buffer = self.buffer
        if buffer:
            buffer += data
            if len(buffer) < self.need or self.backlog:
                return  # still arriving, or waiting its turn: nothing parsed, nothing copied again
            data = bytes(buffer)
            buffer.clear()
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Answer the complete messages of ``data``, keep the rest in the buffer.

        At most ``TURN_BUDGET`` bytes of replies per turn of the loop, and never past
        ``max_unsent`` unsent: the rest of a long pipelined burst waits in the buffer
        (reading paused) until the client has taken them, or the next turn -- so one
        connection cannot hold the loop while others wait."""
        transport = self.transport
        assert transport is not None
        now = asyncio.get_running_loop().time()
        budget = min(TURN_BUDGET, self.conns.limits.max_unsent - transport.get_write_buffer_size())
        out: list[bytes] = []
        self._out = out  # replies given without waiting join one write (RFC 7766 §6.2.1.1)
        self._out_bytes = 0
        try:
            offset, end = 0, len(data)
            while offset + 2 <= end and self._out_bytes <= budget:
                (length,) = TCP_LENGTH.unpack_from(data, offset)
                if offset + 2 + length > end:
                    break
                message = data[offset + 2 : offset + 2 + length]
                offset += 2 + length
                self.on_message(message)
                if self.transport is None:
                    return  # on_message closed the connection
        finally:
            self._out = None
        self.need = 2 if end - offset < 2 else 2 + TCP_LENGTH.unpack_from(data, offset)[0]
        self.backlog = end - offset >= self.need
        if offset < end:
            self.buffer += data[offset:]
            if not self.backlog and (self.message_started is None or offset):
                # A new message began in this read: its deadline starts now.
                self.message_started = now
                self._arm(now + self.conns.limits.message_timeout)
        else:
            self.message_started = None
        if out:
            transport.write(b"".join(out))
        if self.backlog and not self.write_blocked:
            asyncio.get_running_loop().call_soon(self._resume_parsing)
        self._update_reading()

    def _resume_parsing(self) -> None:
        """Parse the messages a budget left waiting, once the client can take replies."""
        if self.transport is None or self.closing or self.write_blocked or not self.backlog:
            return
        data = bytes(self.buffer)
        self.buffer.clear()
        self._parse(data)

    # What subclasses use ---------------------------------------------------------

    def on_message(self, message: bytes) -> None:
        """Answer one complete message: ``send`` now, or ``begin``/``finish`` around a task."""
        raise NotImplementedError

    def send(self, reply: bytes) -> None:
        """Queue one reply: with the current read's batch, or written at once."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._out is not None:
            self._out.append(tcp_frame(reply))
            self._out_bytes += len(reply) + 2
        else:
            transport.write(tcp_frame(reply))
        self.last_active = asyncio.get_running_loop().time()

    def begin(self) -> None:
        """A message whose answer comes later (from a task)."""
        self.pending += 1

    def finish(self) -> None:
        """That answer was sent (or there was none)."""
        self.pending -= 1
        transport = self.transport
        if transport is None:
            return
        if self.closing and self.pending == 0:
            transport.close()
            return
        self.last_active = asyncio.get_running_loop().time()
        self._update_reading()

    def abort(self) -> None:
        """Close at once, dropping unsent bytes (eviction, a rule broken)."""
        if self.transport is not None:
            self.transport.abort()

    def is_idle(self) -> bool:
        """Nothing being answered or waiting, no message arriving: safe to close (RFC 7766 §6.2.3)."""
        return not self.pending and not self.backlog and self.message_started is None

    def close_when_idle(self) -> None:
        """Stop reading; close now if nothing is pending, else after the last reply."""
        self.closing = True
        if self.transport is None:
            return
        if self.pending == 0:
            self.transport.close()
        else:
            self._update_reading()

    # Internals ---------------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = (
            self.closing
            or self.write_blocked
            or self.backlog
            or self.pending >= self.conns.limits.max_inflight
        )
        if pause and not self.paused:
            transport.pause_reading()
            self.paused = True
        elif not pause and self.paused:
            transport.resume_reading()
            self.paused = False

    def _arm(self, when: float) -> None:
        """Make sure the one timer fires no later than ``when`` (loop time)."""
        timer = self.timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        # One timer for both deadlines, re-armed lazily: cancelling and creating a timer
        # per read would cost more than answering a cached query.
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        limits = self.conns.limits
        now = asyncio.get_running_loop().time()
        started = self.message_started
        if started is not None and now >= started + limits.message_timeout:
            log.debug("TCP %s: message incomplete after %.1f s: closing", self.client, limits.message_timeout)
            transport.abort()
            return
        due = self.last_active + limits.idle_timeout
        if self.pending:
            due = now + limits.idle_timeout  # still answering: not idle; the reply re-arms
        if started is not None:
            due = min(due, started + limits.message_timeout)
        if due - now > 0.001:
            self._arm(due)
            return
        transport.close()


class TcpConnection(FramedConnection):
    """The DNS listener's connection: the hot path at once, the full path eagerly."""

    def __init__(
        self, handler: QueryHandler, inflight: InFlight, conns: TcpConnections, acl: Acl | None = None
    ) -> None:
        super().__init__(conns, acl)
        self.handler = handler
        self.inflight = inflight

    def on_message(self, message: bytes) -> None:
        reply = self.handler.hot_answer(message, tcp=True)
        if reply is not None:
            self.send(reply)
            return
        self.begin()
        task = start_eagerly(self._answer(message))  # a reply given without waiting joins this write
        if task is not None:
            self.inflight.add(task)

    async def _answer(self, message: bytes) -> None:
        try:
            reply = await self.handler.handle(message, self.peer, "tcp")
            if reply is not None:
                self.send(reply)
        finally:
            self.finish()
