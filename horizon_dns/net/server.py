"""The DNS server: UDP and TCP listeners on every configured address.

Contract: ``await DnsServer.start()`` binds UDP and TCP on each address (port 0
picks one free port shared by both protocols) and returns once all listen;
``bound`` then lists the real addresses. ``await stop(timeout)`` stops
accepting, lets in-flight queries finish for up to ``timeout`` seconds, and
closes everything; ``rebind(listen)`` changes addresses on reload. The
daemon's lifecycle (signals, reload) is in :mod:`horizon_dns.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Sequence
from typing import cast

from horizon_dns.config.schema import ListenAddress
from horizon_dns.core.access import Acl, EdgePolicy
from horizon_dns.core.handler import QueryHandler
from horizon_dns.errors import Error
from horizon_dns.net import mmsg
from horizon_dns.net.tcp import TcpConnection, TcpConnections, TcpLimits
from horizon_dns.net.udp import BatchedUdpListener, BatchTransport, InFlight, UdpListener

log = logging.getLogger("horizon_dns.net.server")


class BindError(Error):
    """A listen address could not be bound; ``hint`` says what usually fixes it."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.hint = _BIND_HINTS.get(errno_ or 0, "change 'listen:' in the config")


_BIND_HINTS = {
    errno.EADDRINUSE: "another program (a DNS server?) holds the port; change 'listen:' in the config",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE (the shipped systemd unit"
    " grants it); or listen on a port above 1023",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address (see 'ip addr'); change 'listen:'",
}


def _socket(host: str, port: int, kind: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Worker processes share the address; the kernel spreads queries among them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One address, one family: "::" must not also grab IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DnsServer:
    """UDP+TCP listeners feeding one QueryHandler."""

    def __init__(
        self,
        handler: QueryHandler,
        listen: Sequence[ListenAddress],
        tcp_limits: TcpLimits | None = None,
        policy: EdgePolicy | None = None,
        reuse_port: bool = False,
        batched: bool | None = None,
    ) -> None:
        self.handler = handler
        self.reuse_port = reuse_port
        #: UDP through recvmmsg/sendmmsg where the platform has them (None: where available).
        self.batched = mmsg.available() if batched is None else batched
        self.listen = list(listen)
        self.inflight = InFlight()
        self.policy = policy or EdgePolicy()
        self.connections = TcpConnections(tcp_limits or TcpLimits(), self.policy)
        self.acls: list[Acl] = []
        self.udp: list[tuple[asyncio.BaseTransport, UdpListener]] = []
        self.tcp: list[asyncio.Server] = []
        self.bound: list[ListenAddress] = []

    async def start(self) -> None:
        try:
            for address in self.listen:
                await self._bind(address)
        except BaseException:
            await self.stop(0)
            raise

    async def _bind(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        attempts = 20 if address.port == 0 else 1
        for attempt in range(attempts):
            try:
                udp_sock = _socket(address.host, address.port, socket.SOCK_DGRAM, self.reuse_port)
            except OSError as exc:
                raise BindError(f"cannot listen on UDP {address}: {exc.strerror}", exc.errno) from exc
            port = udp_sock.getsockname()[1]
            try:
                tcp_sock = _socket(address.host, port, socket.SOCK_STREAM, self.reuse_port)
            except OSError as exc:
                udp_sock.close()
                if attempt + 1 < attempts:
                    continue  # the ephemeral UDP port is taken on TCP; pick another
                raise BindError(f"cannot listen on TCP {address}: {exc.strerror}", exc.errno) from exc
            break
        # Everything is made before any list grows: the five lists stay parallel, and a
        # failure leaves nothing listening that rebind would not know of.
        acl = Acl(address.allow)
        udp: tuple[asyncio.BaseTransport, UdpListener] | None = None
        try:
            if self.batched:
                batched = BatchedUdpListener(self.handler, self.inflight, acl, self.policy)
                udp = (cast(asyncio.BaseTransport, batched.attach(udp_sock)), batched)
            else:
                udp = await loop.create_datagram_endpoint(
                    lambda: UdpListener(self.handler, self.inflight, acl, self.policy), sock=udp_sock
                )
            server = await loop.create_server(
                lambda: TcpConnection(self.handler, self.inflight, self.connections, acl),
                sock=tcp_sock,
                backlog=1024,
            )
        except OSError as exc:
            if udp is not None:
                udp[0].close()
            udp_sock.close()
            tcp_sock.close()
            raise BindError(f"cannot listen on {address}: {exc.strerror or exc}", exc.errno) from exc
        self.udp.append(udp)
        self.tcp.append(server)
        self.acls.append(acl)
        self.bound.append(ListenAddress(address.host, port, address.allow))

    def udp_replies_dropped(self) -> int:
        """Replies the kernel would not take (a full socket buffer), on batched listeners."""
        return sum(
            transport.batch.dropped for transport, _ in self.udp if isinstance(transport, BatchTransport)
        )

    async def rebind(self, listen: list[ListenAddress]) -> None:
        """Listen on exactly ``listen``: bind what is new, close what is gone, keep the rest.

        All or nothing: new addresses are bound before gone ones close, so a bind that
        fails (a port taken meanwhile) raises BindError with every old listener still
        serving. Only when a new address overlaps one that goes (``0.0.0.0:53`` for
        ``127.0.0.1:53``) are the gone ones closed first -- and bound again on failure.
        """
        wanted = {(a.host, a.port) for a in listen}
        have = {(a.host, a.port) for a in self.listen}
        added = [a for a in listen if (a.host, a.port) not in have]
        gone = [a for a in self.listen if (a.host, a.port) not in wanted]
        try:
            await self._bind_all(added)
        except BindError:
            if not gone:
                raise
            self._close_listeners(gone)
            await asyncio.sleep(0)  # a datagram transport closes its socket on the next loop pass
            try:
                await self._bind_all(added)
            except BindError:
                await asyncio.sleep(0)
                await self._bind_all(gone)
                raise
        else:
            self._close_listeners(gone)
        for index, address in enumerate(self.listen):
            # Same address, perhaps a new allow list: listeners read it from here.
            new = next(a for a in listen if (a.host, a.port) == (address.host, address.port))
            if new.allow != address.allow:
                self.acls[index].update(new.allow)
                self.listen[index] = new

    async def _bind_all(self, addresses: list[ListenAddress]) -> None:
        """Bind every one of ``addresses``, or none: a failure closes those bound here."""
        bound: list[ListenAddress] = []
        try:
            for address in addresses:
                await self._bind(address)
                self.listen.append(address)
                bound.append(address)
                log.info("now listening on %s", self.bound[-1])
        except BindError:
            self._close_listeners(bound)
            raise

    def _close_listeners(self, addresses: list[ListenAddress]) -> None:
        for index in reversed(range(len(self.listen))):
            if self.listen[index] not in addresses:
                continue
            transport, _protocol = self.udp.pop(index)
            transport.close()
            self.tcp.pop(index).close()
            self.acls.pop(index)
            address = self.bound.pop(index)
            self.listen.pop(index)
            log.info("no longer listening on %s", address)

    async def stop(self, timeout: float) -> int:
        """Stop accepting, wait for in-flight queries; return how many were abandoned."""
        for server in self.tcp:
            server.close()
        for _transport, protocol in self.udp:
            protocol.accepting = False
        self.connections.close_all()
        left = await self.inflight.wait(timeout)
        for transport, _protocol in self.udp:
            transport.close()
        for server in self.tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self.udp.clear()
        self.tcp.clear()
        return left


def install_uvloop() -> bool:
    """Use uvloop when installed: ~18 µs less per datagram (shared/bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
