"""One-shot questions to a link-local multicast group (LLMNR, mDNS), answers by unicast.

Contract: ``await ask_group(group, name, qtype, interface, window, family, first)``
sends one query for ``name``/``qtype`` to ``group`` out of ``interface`` from a fresh
socket on an ephemeral port, and returns ``(source address, reply)`` for each reply
that carries the query's ID and the QR bit (and that ``accept`` takes, if given) --
collected for ``window`` seconds, or until the first one when ``first``; None when
the query could not be sent. Network trouble is never an error.

Why a fresh socket on an ephemeral port, for mDNS too (RFC 6762 §5.1 "one-shot
queries", answered per §6.7 by unicast to the querier's port): a querier on port
5353 shares that port with avahi, systemd-resolved or any other mDNS program on the
host, and the kernel hands a *unicast* reply (to a QU question, or one a responder
sends because it multicast the record moments ago and rate-limits, §6) to just one
of those sockets. A process of its own then misses answers meant for it. From an
ephemeral port every reply is ours, and no responder holds it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from horizon_dns.llmnr.responder import LLMNR_GROUP_V4, LLMNR_GROUP_V6, LLMNR_PORT, QR, Interface, build_query

log = logging.getLogger("horizon_dns.net.oneshot")


@dataclass(frozen=True)
class Group:
    """A link-local multicast group that answers DNS-format questions."""

    name: str
    v4: str
    v6: str
    port: int
    hops: int  # IPv4 TTL / IPv6 hop limit of our queries


LLMNR = Group("LLMNR", LLMNR_GROUP_V4, LLMNR_GROUP_V6, LLMNR_PORT, 1)  # RFC 4795 §2.5
MDNS = Group("mDNS", "224.0.0.251", "ff02::fb", 5353, 255)  # RFC 6762 §11: sent with TTL 255


async def ask_group(
    group: Group,
    name: str,
    qtype: int,
    interface: Interface,
    window: float,
    family: int = socket.AF_INET,
    first: bool = False,
    accept: Callable[[bytes], bool] | None = None,
) -> list[tuple[str, bytes]] | None:
    """Ask ``group`` on ``interface``; return (source, reply) of the answers (see module),
    or None when the query could not be sent at all (no address of ``family`` on the
    interface, the network unreachable): nobody was asked, so silence means nothing."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    replies: list[tuple[str, bytes]] = []
    msg_id = secrets.randbits(16)
    # Flags all zero, one question, class IN: an LLMNR query (RFC 4795 §2.1.1) and an
    # mDNS one-shot query alike (RFC 6762 §18).
    message = build_query(msg_id, name, qtype)
    got_one = asyncio.Event()
    sent = False
    try:
        sock.setblocking(False)
        if family == socket.AF_INET:
            v4 = [a.ip for a in interface.addresses if a.version == 4]
            if not v4:
                return None
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(v4[0])))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, group.hops)
            sock.bind((str(v4[0]), 0))
            destination: tuple[str, int] | tuple[str, int, int, int] = (group.v4, group.port)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface.index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, group.hops)
            sock.bind(("::", 0))
            destination = (group.v6, group.port, 0, interface.index)

        def readable() -> None:
            while True:
                try:
                    data, source = sock.recvfrom(9000)
                except OSError:  # BlockingIOError included: drained
                    return
                if (
                    len(data) >= 4
                    and struct.unpack_from("!H", data)[0] == msg_id
                    and data[2] & (QR >> 8)
                    and (accept is None or accept(data))
                ):
                    replies.append((str(source[0]), data))
                    got_one.set()

        loop.add_reader(sock.fileno(), readable)
        try:
            sock.sendto(message, destination)
            sent = True
            if first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got_one.wait(), window)
            else:
                await asyncio.sleep(window)  # a collection window: every responder may answer
        finally:
            loop.remove_reader(sock.fileno())
    except OSError as exc:
        log.debug("%s query on %s failed: %s", group.name, interface.name, exc)
        if not sent:
            return None
    finally:
        sock.close()
    return replies
