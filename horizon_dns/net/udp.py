"""UDP listener: one datagram in, at most one datagram back to the sender.

Contract: every datagram is handed to the sans-I/O handler in its own task; the
reply goes back to the address it came from. The listener keeps no per-client
state. ``InFlight`` tracks unfinished tasks so shutdown can wait for them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from horizon_dns.core.handler import QueryHandler

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
    """Feeds datagrams to the handler and sends replies back."""

    def __init__(self, handler: QueryHandler, inflight: InFlight) -> None:
        self.handler = handler
        self.inflight = inflight
        self.transport: asyncio.DatagramTransport | None = None
        self.accepting = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.accepting:
            return
        # The hot path: a cached answer is sent from here, with no task and no await.
        reply = self.handler.fast_answer(data)
        if reply is not None:
            assert self.transport is not None
            self.transport.sendto(reply, addr)
            return
        self.inflight.add(asyncio.get_running_loop().create_task(self._answer(data, addr)))

    async def _answer(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = await self.handler.handle(data, (str(addr[0]), int(addr[1])), "udp")
        transport = self.transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("UDP error: %s", exc)
