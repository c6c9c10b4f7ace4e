"""One-shot questions to a link-local multicast group (LLMNR, mDNS), answers by unicast.

Contract: ``await ask_group(group, name, qtype, interface, window, family, first)``
sends one query for ``name``/``qtype`` to ``group`` out of ``interface`` from a fresh
socket on an ephemeral port, and returns ``(source address, reply)`` for each reply
that carries the query's ID and the QR bit (and that ``accept`` takes, if given) --
collected for ``window`` seconds, or until the first one when ``first``; None when
the query could not be sent. Network trouble is never an error. ``qtype`` may be a
tuple: one message with several questions (mDNS only, RFC 6762 §5.3 and §6 allow
it; LLMNR allows one, RFC 4795 §2.1.1).

Why a fresh socket on an ephemeral port, for mDNS too (RFC 6762 §5.1 "one-shot
queries", answered per §6.7 by unicast to the querier's port): a querier on port
5353 shares that port with avahi, systemd-resolved or any other mDNS program on the
host, and the kernel hands a *unicast* reply (to a QU question, or one a responder
sends because it multicast the record moments ago and rate-limits, §6) to just one
of those sockets. A process of its own then misses answers meant for it. From an
ephemeral port every reply is ours, and no responder holds it back.

Against multicast storms (a flood of random unknown names, each one a lookup):

* :class:`MulticastBudget` is a token bucket of outgoing multicast packets per
  second, shared by every lookup of a process. A lookup pays for all its packets
  at once, before sending any; when the bucket refuses, nothing is sent and the
  lookup raises :class:`horizon_dns.errors.LocalLimit` -- not "not found", which
  would be cached and could send the name to public DNS. ``sent`` and ``limited``
  are its counters for metrics.
* :class:`QueryPool` shares a query in flight: a lookup that needs the very same
  message (group, name, types, interface, family) reads the replies of the one
  already sent instead of sending another, and pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from horizon_dns.core.clock import Clock, now
from horizon_dns.core.names import text_to_name
from horizon_dns.core.wire import CLASS_IN, HEADER, QR
from horizon_dns.errors import LocalLimit
from horizon_dns.llmnr.responder import (
    LLMNR_GROUP_V4,
    LLMNR_GROUP_V6,
    LLMNR_PORT,
    Interface,
    build_query,
)

log = logging.getLogger("horizon_dns.net.oneshot")

T = TypeVar("T")
_QTAIL = struct.Struct("!HH")


@dataclass(frozen=True)
class Group:
    """A link-local multicast group that answers DNS-format questions."""

    name: str
    v4: str
    v6: str
    port: int
    hops: int  # IPv4 TTL / IPv6 hop limit of our queries
    questions: int = 1  # how many questions one message may carry
    # Whether any reply settles a question, even one without the records wanted: only
    # the owner of a name answers in LLMNR, and its empty answer means "no such type".
    final: bool = False


LLMNR = Group("LLMNR", LLMNR_GROUP_V4, LLMNR_GROUP_V6, LLMNR_PORT, 1, final=True)  # RFC 4795 §2.5
# RFC 6762 §11: sent with TTL 255; §5.3/§6: a query may hold several questions.
MDNS = Group("mDNS", "224.0.0.251", "ff02::fb", 5353, 255, questions=8)


class MulticastBudget:
    """Outgoing multicast queries per second, shared by every lookup of a process.

    A token bucket: ``burst`` packets at once, refilled at ``rate`` packets a second
    on ``clock`` (CLOCK_BOOTTIME by default; tests pass a fake one). ``take(n)``
    spends n packets or, when fewer are left, nothing at all and returns False:
    the caller then sends nothing. Tokens never go negative and never exceed
    ``burst``; a clock that steps back refills nothing.

    Counters for metrics: ``sent``, packets allowed so far; ``limited``, queries
    (calls of ``take``) refused so far.
    """

    def __init__(self, rate: float = 50.0, burst: int = 100, clock: Clock = now) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"multicast budget: rate {rate} and burst {burst} must not be negative")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.limited = 0
        self.sent = 0

    def take(self, packets: int = 1) -> bool:
        """Spend ``packets`` if the bucket holds that many; False (nothing spent) if not."""
        if packets < 0:
            raise ValueError(f"cannot take {packets} packets")
        moment = self.clock()
        if moment > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (moment - self.stamp) * self.rate)
        self.stamp = moment
        # The epsilon forgives float error in elapsed * rate (0.02 s * 50/s = 0.99999...).
        if packets > self.tokens + 1e-9:
            self.limited += 1
            return False
        self.tokens = max(0.0, self.tokens - packets)
        self.sent += packets
        return True


def build_questions(msg_id: int, name: str, qtypes: Sequence[int]) -> bytes:
    """A query with one question per type for ``name``, class IN, flags all zero."""
    if len(qtypes) == 1:
        return build_query(msg_id, name, qtypes[0])
    question = text_to_name(name)
    return HEADER.pack(msg_id, 0, len(qtypes), 0, 0, 0) + b"".join(
        question + _QTAIL.pack(qtype, CLASS_IN) for qtype in qtypes
    )


async def ask_group(
    group: Group,
    name: str,
    qtype: int | tuple[int, ...],
    interface: Interface,
    window: float,
    family: int = socket.AF_INET,
    first: bool = False,
    accept: Callable[[bytes], bool] | None = None,
    on_reply: Callable[[str, bytes], None] | None = None,
) -> list[tuple[str, bytes]] | None:
    """Ask ``group`` on ``interface``; return (source, reply) of the answers (see module),
    or None when the query could not be sent at all (no address of ``family`` on the
    interface, the network unreachable): nobody was asked, so silence means nothing.
    ``on_reply`` sees each answer as it arrives. Sends whatever the caller asks: the
    budget is paid by the layer above (:class:`QueryPool`)."""
    qtypes = (qtype,) if isinstance(qtype, int) else qtype
    if not 1 <= len(qtypes) <= group.questions:
        raise ValueError(f"{group.name} takes 1 to {group.questions} questions a message, not {len(qtypes)}")
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    replies: list[tuple[str, bytes]] = []
    msg_id = secrets.randbits(16)
    # Flags all zero, class IN: an LLMNR query (RFC 4795 §2.1.1) and an mDNS one-shot
    # query alike (RFC 6762 §18).
    message = build_questions(msg_id, name, qtypes)
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
                    if on_reply is not None:
                        on_reply(str(source[0]), data)

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


class SharedQuery:
    """One query in flight on one interface and the replies it got so far.

    Every lookup that claimed it (:meth:`QueryPool.claim`) reads the replies with
    :meth:`first`; when the last one is done, the query stops listening.
    """

    def __init__(self, final: bool = False) -> None:
        self.final = final  # the first reply settles it (Group.final)
        self.replies: list[bytes] = []
        self.users = 0
        self.task: asyncio.Task[list[tuple[str, bytes]] | None] | None = None
        self._changed = asyncio.Event()

    def arrived(self, _source: str, reply: bytes) -> None:
        self.replies.append(reply)
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def first(self, pick: Callable[[bytes], list[T]], timeout: float) -> list[T] | None:
        """What ``pick`` finds in the first reply it finds anything in (in the first
        reply at all when ``final``), within ``timeout`` and the query's window; []
        when nothing; None when the query was not sent. Releases the caller's claim."""
        assert self.task is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        try:
            while True:
                changed = self._changed
                for reply in self.replies[seen:]:
                    found = pick(reply)
                    if found or self.final:
                        return found
                seen = len(self.replies)
                if self.task.done():
                    return None if not self.task.cancelled() and self.task.result() is None else []
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
        finally:
            self.users -= 1
            if self.users <= 0 and not self.task.done():
                self.task.cancel()  # nobody reads the replies any more: close the socket


#: One shared query: (interface, address family of the group, question types).
Ask = tuple[Interface, int, tuple[int, ...]]
_Key = tuple[str, int, int, tuple[int, ...]]  # name, interface index, family, types


class QueryPool:
    """Queries to ``group`` in flight, shared by lookups, paid from ``budget`` (None: unlimited)."""

    def __init__(
        self,
        group: Group,
        budget: MulticastBudget | None = None,
        accept: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.group = group
        self.budget = budget
        self.accept = accept
        self.inflight: dict[_Key, SharedQuery] = {}

    def claim(self, name: str, asks: Sequence[Ask], window: float) -> list[SharedQuery]:
        """Join the query in flight for each ask, or start it; the budget pays for the
        new ones all at once, before any is sent. Raises LocalLimit, having sent
        nothing, when it refuses. Each returned query must be read with ``first``
        (one claimed and never read listens out its window, no longer)."""
        keys = [(name.lower(), interface.index, family, qtypes) for interface, family, qtypes in asks]
        new = {key for key in keys if self._live(key) is None}
        if self.budget is not None and not self.budget.take(len(new)):
            raise LocalLimit(
                f"{self.group.name} query for {name} not sent: over the multicast budget "
                f"of {self.budget.rate:g} packets/s"
            )
        loop = asyncio.get_running_loop()
        out: list[SharedQuery] = []
        for key, (interface, family, qtypes) in zip(keys, asks, strict=True):
            query = self._live(key)
            if query is None:
                query = SharedQuery(self.group.final)
                query.task = loop.create_task(
                    ask_group(
                        self.group, name, qtypes, interface, window, family,
                        accept=self.accept, on_reply=query.arrived,
                    )
                )  # fmt: skip
                query.task.add_done_callback(functools.partial(self._finished, key, query))
                self.inflight[key] = query
            query.users += 1
            out.append(query)
        return out

    def _live(self, key: _Key) -> SharedQuery | None:
        """The query in flight for ``key``; not one whose window just ended (its
        done-callback may not have run yet)."""
        query = self.inflight.get(key)
        return query if query is not None and query.task is not None and not query.task.done() else None

    def _finished(self, key: _Key, query: SharedQuery, _task: object) -> None:
        if self.inflight.get(key) is query:
            del self.inflight[key]
        query.wake()
