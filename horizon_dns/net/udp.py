"""UDP listener: one datagram in, at most one datagram back to the sender.

Contract: a datagram the hot path can answer is answered at once; every other
one goes to the sans-I/O handler, started at once and carried on in a task only
if it has to wait for I/O; the reply goes back to the address it came from.
The listener keeps no per-client state. ``InFlight`` tracks unfinished tasks so
shutdown can wait for them.

``UdpListener`` is an asyncio protocol: one datagram per system call, on any
platform. ``BatchedUdpListener`` is the same listener reading and writing
through recvmmsg/sendmmsg (:mod:`horizon_dns.net.mmsg`): the datagrams that
arrived together are screened and answered in one pass and their replies leave
in one call.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, cast

from horizon_dns.core.access import Acl, EdgePolicy, is_loopback
from horizon_dns.core.bounded import remember
from horizon_dns.core.clock import now as clock_now
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.wire import REFUSED, SERVFAIL, short_reply
from horizon_dns.net.eager import start_eagerly
from horizon_dns.net.mmsg import DatagramBatch, decode_address

log = logging.getLogger("horizon_dns.net.udp")


class InFlight:
    """The set of query tasks not yet finished, shared by all listeners."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for running queries; return how many were left."""
        if not self.tasks:
            return 0
        _done, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        return len(pending)


class UdpListener(asyncio.DatagramProtocol):
    """Feeds datagrams to the handler and sends replies back.

    Before the handler: clients outside ``acl`` get silence (or REFUSED, by
    policy); a client over its rate gets TC=1 so a real one retries over TCP (the
    "slip" of response rate limiting); beyond ``max_inflight`` running queries,
    new ones get SERVFAIL at once rather than queueing without bound.
    Loopback clients -- the local stub resolver -- are not rate limited.
    """

    def __init__(
        self,
        handler: QueryHandler,
        inflight: InFlight,
        acl: Acl | None = None,
        policy: EdgePolicy | None = None,
    ) -> None:
        self.handler = handler
        self.inflight = inflight
        self.acl = acl
        self.policy = policy or EdgePolicy()
        self.transport: asyncio.DatagramTransport | None = None
        self.accepting = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.immediate_reply(data, addr)
        if reply is not None:
            transport = self.transport
            assert transport is not None
            transport.sendto(reply, addr)

    def immediate_reply(self, data: bytes, addr: tuple[str | int, ...]) -> bytes | None:
        """The reply to send back at once -- a hot-path answer, a refusal, a slip or an
        overload SERVFAIL -- or None: silence, or an answer from the full path, which
        sends its own reply (at once when it needed no I/O)."""
        if not self.accepting:
            return None
        client: str = addr[0]  # type: ignore[assignment]  # an IP string for AF_INET/AF_INET6
        policy = self.policy
        if self.acl is not None and not self.acl.allows(client):
            policy.refused += 1
            if policy.refuse_udp == "refused":
                return short_reply(data, REFUSED)
            return None
        if not is_loopback(client) and not policy.limiter.allow(client):
            return short_reply(data, 0, truncated=True)
        # The hot path: a cached answer is sent from here, with no task and no await.
        reply = self.handler.hot_answer(data)
        if reply is not None:
            return reply
        if len(self.inflight.tasks) >= policy.max_inflight:
            policy.overloaded += 1
            return short_reply(data, SERVFAIL)
        # Answered here when the pipeline needs no I/O; a task only if it must wait.
        task = start_eagerly(self._answer(data, addr))
        if task is not None:
            self.inflight.add(task)
        return None

    async def _answer(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = await self.handler.handle(data, (str(addr[0]), int(addr[1])), "udp")
        transport = self.transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("UDP error: %s", exc)


Address = tuple[Any, ...]
_ADDRESS_MEMO = 4096


class BatchTransport:
    """The ``sendto`` a listener calls: queued into the batch while one is being
    answered (the reply goes to the datagram's own sender), sent at once otherwise
    (a reply from a task, after the batch it came in has gone)."""

    def __init__(self, sock: socket.socket, batch: DatagramBatch) -> None:
        self.sock = sock
        self.batch = batch
        self.current = -1  # the datagram being answered, or -1 outside a batch
        self.closing = False

    def sendto(self, data: bytes, addr: Address) -> None:
        if self.current >= 0:
            self.batch.queue(self.current, data)
            return
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:  # a full buffer or an unroutable client: UDP drops it
            self.batch.dropped += 1
            log.debug("UDP reply to %s not sent: %s", addr[0], exc)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()


class BatchedUdpListener(UdpListener):
    """``UdpListener`` fed by recvmmsg and answering through sendmmsg (Linux)."""

    ROUNDS = 8  # batches per readiness event, so TCP and timers are not starved
    SLOTS = 64  # datagrams per recvmmsg call

    def attach(self, sock: socket.socket) -> BatchTransport:
        """Start reading ``sock`` (non-blocking, bound) on the running loop."""
        transport = BatchTransport(sock, DatagramBatch(sock, self.SLOTS))
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Raw sockaddr -> (the tuple sendto takes, whether it is loopback): stub
        # resolvers reuse few source ports, so each is decoded once.
        senders: dict[bytes, tuple[Address, bool]] = {}
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, transport, senders)
        return transport

    def _readable(self, transport: BatchTransport, senders: dict[bytes, tuple[Address, bool]]) -> None:
        batch = transport.batch
        message = batch.message
        queue = batch.queue
        immediate_reply = self.immediate_reply
        hot_answer_known = self.handler.hot_answer_known
        acl = self.acl
        for _round in range(self.ROUNDS):
            try:
                count = batch.receive()
            except OSError as exc:
                log.debug("UDP receive error: %s", exc)
                return
            if not count:
                return
            now = clock_now()
            shortcut = self.accepting
            try:
                for i in range(count):
                    data, name = message(i)
                    sender = senders.get(name)
                    if sender is None:
                        try:
                            address = decode_address(name)
                        except ValueError:
                            continue
                        sender = remember(senders, name, (address, is_loopback(address[0])), _ADDRESS_MEMO)
                    addr, loopback = sender
                    # The local stub resolver's repeated questions: a loopback client the
                    # allow list admits is never rate limited, so the reply the hot path keeps
                    # needs no other screening. A miss goes the whole way below.
                    if shortcut and loopback and (acl is None or acl.allows(addr[0])):
                        reply = hot_answer_known(data, now)
                        if reply is not None:
                            queue(i, reply)
                            continue
                    transport.current = i  # a full-path answer sent meanwhile joins the batch
                    try:
                        reply = immediate_reply(data, addr)
                    except Exception:  # one datagram's bug must not drop the rest of the batch
                        log.exception("UDP datagram from %s failed", addr[0])
                        continue
                    if reply is not None:
                        queue(i, reply)
            finally:
                transport.current = -1
            batch.flush()
            if count < batch.slots:
                return  # drained: the next datagram wakes the loop again
