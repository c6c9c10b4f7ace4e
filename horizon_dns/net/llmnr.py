"""LLMNR sockets (RFC 4795): the responder's listeners and a multicast/TCP query client.

Contract: ``LlmnrResponder.start()`` binds UDP 5355 on IPv4 and IPv6 (shared
with other responders through SO_REUSEADDR), joins 224.0.0.252 and ff02::1:3 on
each served interface, listens on TCP 5355 on the interfaces' unicast addresses,
and answers through :func:`horizon_dns.llmnr.responder.decide`. Arrival
interface and destination come from IP_PKTINFO / IPV6_PKTINFO ancillary data.
UDP replies leave with IP TTL / hop limit 255, TCP with TTL 1 (RFC 4795 §2.5).
Interfaces and addresses that appear later are picked up by a periodic rescan,
as is a changed hostname. If TCP 5355 is taken (systemd-resolved with LLMNR=yes
or resolve), UDP keeps working and :attr:`LlmnrResponder.tcp_error` says exactly
what to change.

``query_tcp`` is the unicast client side, used by the overlay lookup stage; multicast
questions (the overlay stage, conflict detection, RFC 4795 §4) go through
:func:`horizon_dns.net.oneshot.ask_group`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Iterable

from horizon_dns.core.access import EdgePolicy
from horizon_dns.errors import Error
from horizon_dns.llmnr.responder import (
    LLMNR_GROUP_V4,
    LLMNR_GROUP_V6,
    LLMNR_PORT,
    Arrival,
    Interface,
    Names,
    build_query,
    decide,
)
from horizon_dns.net.oneshot import LLMNR, ask_group
from horizon_dns.net.tcp import FramedConnection, TcpConnections, TcpLimits
from horizon_dns.net.upstream import Upstream, exchange_tcp

log = logging.getLogger("horizon_dns.net.llmnr")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python 3.11 lacks the constant on Linux
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)

RESOLVED_HINT = (
    "TCP port 5355 is in use, most likely by systemd-resolved's own LLMNR responder. "
    "Put 'LLMNR=no' under [Resolve] in /etc/systemd/resolved.conf.d/horizon-dns.conf "
    "(see contrib/systemd-resolved/) and run 'systemctl restart systemd-resolved'. "
    "Until then horizon-dns answers LLMNR over UDP only."
)


class LlmnrError(Error):
    """The responder could not open its sockets."""


#: The TCP rules of the DNS listener (DECISIONS.md 6), sized for LLMNR: 64 connections,
#: 8 from one on-link host (a host asks one question at a time: RFC 4795 §2.4), one
#: message answered at a time, 2 s to send it. Beyond, the idle or slowest goes.
TCP_LIMITS = TcpLimits(idle_timeout=10.0, max_connections=64, max_inflight=1, message_timeout=2.0)
TCP_PER_HOST = 8


def _tcp_listener(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> socket.socket:
    """A listening TCP socket whose every packet, the SYN-ACK included, leaves with
    TTL / hop limit 1 (RFC 4795 §2.5): an off-link client cannot even connect."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(ip), port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _pktinfo(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, str] | None:
    """(interface index, destination address) from IP_PKTINFO / IPV6_PKTINFO."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            ifindex = struct.unpack_from("=i", data)[0]
            return ifindex, socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            ifindex = struct.unpack_from("=i", data, 16)[0]
            return ifindex, socket.inet_ntop(socket.AF_INET6, data[:16])
    return None


class LlmnrResponder:
    """Answers LLMNR queries for this node's names on the served interfaces."""

    def __init__(
        self,
        names: Names,
        interfaces: Callable[[], list[Interface]],
        tcp: bool = True,
        rescan: float = 10.0,
        port: int = LLMNR_PORT,
        follow_hostname: bool = True,
    ) -> None:
        self.names = names
        #: False when the config names the host: then the system's hostname is not ours.
        self.follow_hostname = follow_hostname
        self.list_interfaces = interfaces
        self.tcp = tcp
        self.rescan_interval = rescan
        self.port = port
        self.interfaces: dict[int, Interface] = {}
        self.sockets: list[socket.socket] = []
        self.joined: set[tuple[int, int]] = set()  # (family, ifindex)
        self.tcp_servers: dict[str, asyncio.Server] = {}
        self.tcp_error = ""
        self.counts: collections.Counter[str] = collections.Counter()
        self.conflicts_seen = 0
        self._rescan_task: asyncio.Task[None] | None = None
        self.tcp_connections = TcpConnections(TCP_LIMITS, EdgePolicy(tcp_per_client=TCP_PER_HOST))

    # Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for family in (socket.AF_INET, socket.AF_INET6):
            sock = self._udp_socket(family)
            self.sockets.append(sock)
            loop.add_reader(sock.fileno(), self._readable, sock)
        await self.rescan()
        self._rescan_task = loop.create_task(self._rescan_loop())

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._rescan_task is not None:
            self._rescan_task.cancel()
            await asyncio.gather(self._rescan_task, return_exceptions=True)
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()
        for server in self.tcp_servers.values():
            server.close()
        for conn in list(self.tcp_connections.open):
            conn.abort()
        self.tcp_servers.clear()

    def _udp_socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # Shared with systemd-resolved's responder when it runs (RFC 4795 allows
            # several responders per host; each answers only for its own names).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)  # RFC 4795 §2.5
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.bind(("0.0.0.0", self.port))
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.bind(("::", self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise LlmnrError(f"cannot bind UDP port {self.port} for LLMNR: {exc.strerror}") from exc
        return sock

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            try:
                await self.rescan()
            except Exception:  # a failed rescan must not end the responder
                log.exception("LLMNR interface rescan failed")

    async def rescan(self) -> None:
        """Serve interfaces and addresses as they are now; follow hostname changes."""
        hostname = socket.gethostname().split(".")[0] if self.follow_hostname else ""
        if hostname and hostname != self.names.hostname:
            log.info("LLMNR: hostname is now %s", hostname)
            self.names.hostname = hostname
        current = {i.index: i for i in self.list_interfaces()}
        self.interfaces = current
        for index in current:
            for family in (socket.AF_INET, socket.AF_INET6):
                if (family, index) not in self.joined:
                    self._join(family, index)
        if self.tcp and not self.tcp_error:
            await self._listen_tcp(current.values())

    def _join(self, family: int, index: int) -> None:
        sock = next(s for s in self.sockets if s.family == family)
        try:
            if family == socket.AF_INET:
                mreq = (
                    socket.inet_aton(LLMNR_GROUP_V4) + socket.inet_aton("0.0.0.0") + struct.pack("=i", index)
                )
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            else:
                mreq6 = socket.inet_pton(socket.AF_INET6, LLMNR_GROUP_V6) + struct.pack("=i", index)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # already joined
                log.debug("LLMNR: cannot join group on interface %d: %s", index, exc)
                return
        self.joined.add((family, index))

    async def _listen_tcp(self, interfaces: Iterable[Interface]) -> None:
        for interface in interfaces:
            for address in interface.addresses:
                ip = address.ip
                if ip.version == 6 and ip.is_link_local:
                    continue  # needs a scope; LLMNR over TCP goes to routable addresses
                key = str(ip)
                if key in self.tcp_servers:
                    continue
                try:
                    server = await asyncio.get_running_loop().create_server(
                        lambda: LlmnrTcpConnection(self), sock=_tcp_listener(ip, self.port)
                    )
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        self.tcp_error = RESOLVED_HINT
                        log.error("LLMNR: %s", RESOLVED_HINT)
                        return
                    log.warning("LLMNR: cannot listen on TCP %s:%d: %s", key, self.port, exc.strerror)
                    continue
                self.tcp_servers[key] = server

    # Receiving -----------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded per wake-up so one busy socket cannot starve the loop
            try:
                data, ancdata, _flags, source = sock.recvmsg(9000, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("LLMNR receive error: %s", exc)
                return
            info = _pktinfo(ancdata)
            if info is None:
                self.counts["no-pktinfo"] += 1
                continue
            index, destination = info
            arrival = Arrival("udp", (str(source[0]), int(source[1])), destination, index)
            reply, reason = decide(data, arrival, self.names, self.interfaces.get(index))
            self.counts[reason] += 1
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, source)

    def interface_of(self, local: str) -> Interface | None:
        """The interface of ours that holds address ``local`` (a connection's own end), or None."""
        try:
            ip = ipaddress.ip_address(local.split("%")[0])
        except ValueError:
            return None
        for interface in self.interfaces.values():
            if any(address.ip == ip for address in interface.addresses):
                return interface
        return None

    # Conflict detection (RFC 4795 §4) -------------------------------------------

    async def check_conflicts(self, wait: float = 1.0) -> set[str]:
        """Ask for each of our unique names; a reply from another host is a conflict."""
        ours = {a.ip for i in self.interfaces.values() for a in i.addresses}
        conflicts: set[str] = set()
        for name in sorted(self.names.own()):
            for interface in self.interfaces.values():
                replies = await ask_group(LLMNR, name, 1, interface, wait) or []
                others = [
                    src for src, _data in replies if ipaddress.ip_address(src.split("%")[0]) not in ours
                ]
                if others:
                    conflicts.add(name)
                    log.warning(
                        "LLMNR conflict: %s also answers for %r on %s; setting the T bit (RFC 4795 §4)",
                        others[0],
                        name,
                        interface.name,
                    )
        self.conflicts_seen += len(conflicts - self.names.conflicts)
        self.names.conflicts |= conflicts
        return conflicts


class LlmnrTcpConnection(FramedConnection):
    """One TCP connection to the responder (RFC 4795 §2.4): each message decided by
    ``decide``, the answer sent, silence closing the connection."""

    def __init__(self, responder: LlmnrResponder) -> None:
        super().__init__(responder.tcp_connections)
        self.responder = responder
        self.local = ""
        self.interface: Interface | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        local = transport.get_extra_info("sockname")
        self.local = str(local[0]) if local else ""
        self.interface = self.responder.interface_of(self.local)
        super().connection_made(transport)
        if self.transport is None:
            self.responder.counts["tcp-over-cap"] += 1

    def on_message(self, message: bytes) -> None:
        # TTL 1 (RFC 4795 §2.5) comes with the socket, from its listener (_tcp_listener).
        index = self.interface.index if self.interface else 0
        arrival = Arrival("tcp", self.peer or ("", 0), self.local, index)
        reply, reason = decide(message, arrival, self.responder.names, self.interface)
        self.responder.counts[reason] += 1
        if reply is None:
            self.close_when_idle()  # silence over TCP: close
            return
        self.send(reply)


# The client side ---------------------------------------------------------------


async def query_tcp(address: str, name: str, qtype: int, timeout: float) -> bytes | None:
    """Ask one host over TCP 5355 (RFC 4795 §2.4: unicast queries go over TCP); None on no answer."""
    message = build_query(secrets.randbits(16), name, qtype)
    try:
        return await exchange_tcp(Upstream(address, LLMNR_PORT), message, len(message), timeout)
    except (OSError, TimeoutError, ConnectionError):
        return None
