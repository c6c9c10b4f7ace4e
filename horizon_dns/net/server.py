"""The DNS server: UDP and TCP listeners on every configured address.

Contract: ``await DnsServer.start()`` binds UDP and TCP on each address (port 0
picks one free port shared by both protocols) and returns once all listen;
``bound`` then lists the real addresses. ``await stop(timeout)`` stops
accepting, lets in-flight queries finish for up to ``timeout`` seconds, and
closes everything. ``serve(config)`` runs a server until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Sequence

from horizon_dns.config.model import Config, ListenAddress, describe
from horizon_dns.core.handler import QueryHandler
from horizon_dns.errors import Error
from horizon_dns.llmnr.responder import Names
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.llmnr import LlmnrResponder
from horizon_dns.net.tcp import TcpConnection, TcpConnections, TcpLimits
from horizon_dns.net.udp import InFlight, UdpListener

log = logging.getLogger("horizon_dns.net.server")


class BindError(Error):
    """A listen address could not be bound."""


def _socket(host: str, port: int, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    ) -> None:
        self.handler = handler
        self.listen = list(listen)
        self.inflight = InFlight()
        self.connections = TcpConnections(tcp_limits or TcpLimits())
        self.udp: list[tuple[asyncio.DatagramTransport, UdpListener]] = []
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
                udp_sock = _socket(address.host, address.port, socket.SOCK_DGRAM)
            except OSError as exc:
                raise BindError(f"cannot listen on UDP {address}: {exc.strerror}") from exc
            port = udp_sock.getsockname()[1]
            try:
                tcp_sock = _socket(address.host, port, socket.SOCK_STREAM)
            except OSError as exc:
                udp_sock.close()
                if attempt + 1 < attempts:
                    continue  # the ephemeral UDP port is taken on TCP; pick another
                raise BindError(f"cannot listen on TCP {address}: {exc.strerror}") from exc
            break
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: UdpListener(self.handler, self.inflight), sock=udp_sock
        )
        self.udp.append((transport, protocol))
        server = await loop.create_server(
            lambda: TcpConnection(self.handler, self.inflight, self.connections),
            sock=tcp_sock,
            backlog=1024,
        )
        self.tcp.append(server)
        self.bound.append(ListenAddress(address.host, port))

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


def make_llmnr_responder(config: Config) -> LlmnrResponder | None:
    """The LLMNR responder the config asks for, not yet started."""
    settings = config.llmnr
    if settings is None:
        return None
    names = Names(
        hostname=settings.hostname or socket.gethostname().split(".")[0],
        aliases=frozenset(settings.aliases),
        devices={name: tuple(ipaddress.ip_address(a) for a in addrs) for name, addrs in settings.devices},
        ttl=settings.ttl,
    )
    wanted = settings.interfaces
    return LlmnrResponder(names, lambda: list_interfaces(wanted), tcp=settings.tcp)


def install_uvloop() -> bool:
    """Use uvloop when installed: ~18 µs less per datagram (shared/bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pipeline = config.pipeline()
    handler = QueryHandler(pipeline, config.udp_payload)
    limits = TcpLimits(config.tcp_idle_timeout, config.tcp_max_connections, config.tcp_max_inflight)
    server = DnsServer(handler, config.listen, limits)
    responder = make_llmnr_responder(config)
    background: set[asyncio.Task[object]] = set()
    try:
        await pipeline.start()
        await server.start()
        if responder is not None:
            await responder.start()
            log.info(
                "LLMNR responder for %s on %s",
                ", ".join(sorted(responder.names.all())),
                ", ".join(i.name for i in responder.interfaces.values()) or "no interface yet",
            )
            if config.llmnr is not None and config.llmnr.conflict_check:
                background.add(loop.create_task(responder.check_conflicts()))
        for issue in config.warnings:
            log.warning("%s", issue)
        log.info("%s", describe(config).replace("\n", "; "))
        log.info("listening on %s", ", ".join(str(a) for a in server.bound))
        await stop.wait()
        log.info("stopping: finishing in-flight queries (up to %.1f s)", config.shutdown_timeout)
        left = await server.stop(config.shutdown_timeout)
        if left:
            log.warning("%d queries were still running at shutdown", left)
        return 0
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if responder is not None:
            await responder.stop()
        await server.stop(0)
        await pipeline.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
