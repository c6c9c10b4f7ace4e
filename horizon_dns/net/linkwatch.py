"""Watch this node's interfaces over rtnetlink, so overlay-derived answers drop when they change.

Contract: ``LinkWatcher(on_change, interfaces)``; ``start()`` (inside a running
asyncio loop) opens a ``NETLINK_ROUTE`` socket subscribed to ``RTMGRP_LINK``,
``RTMGRP_IPV4_IFADDR`` and ``RTMGRP_IPV6_IFADDR`` (rtnetlink(7), netlink(7)) and
registers it with ``loop.add_reader``; it returns False, logging at debug, where
netlink is not available (not Linux, or the socket cannot be opened). From then on
``on_change(reason)`` is called synchronously from the reader callback, once per
change, with a short reason:

* ``link eth0 up`` / ``link eth0 down``: the interface's up-ness flipped, where
  up-ness is ``IFF_UP and IFF_RUNNING``. The kernel sets ``IFF_RUNNING`` in
  ``ifi_flags`` exactly when ``IFLA_OPERSTATE`` is UP or UNKNOWN (RFC 2863
  operstate; a tun device such as tailscale0 reports UNKNOWN while its owner has
  it open), so the flags alone are the one truth; the operstate is parsed for
  logs only.
* ``link eth0 removed``: ``RTM_DELLINK``.
* ``address 100.64.0.1/24 added on eth0`` / ``address fd7a::1/64 removed from eth0``.
* ``netlink overflow``: the kernel dropped events because the socket's buffer was
  full (``ENOBUFS`` from ``recv``, netlink(7)), so anything may have changed. The
  messages still queued are then skipped, the state is read afresh, and only then
  is the overflow reported, once: a change made before that read is covered by the
  report, one made after it is compared with the fresh state.

Only changes are reported. ``RTM_NEWLINK`` is sent for many reasons (MTU, flag
noise, carrier counters, a bridge port's state), so the last up-ness of every
interface is kept and only a flip counts; an interface first seen is assumed down
(deleting a link that is up yields ``down``, then ``removed``: the kernel closes
it first). ``RTM_NEWADDR`` is sent again for an address that already exists (IPv6
duplicate address detection completing, lifetime refreshes from router
advertisements, an IPv4 secondary promoted), so the addresses of every interface
are kept and only a new one counts; every ``RTM_DELADDR`` counts. ``start()``
seeds both from an ``RTM_GETLINK`` and an ``RTM_GETADDR`` dump, so the first
event is compared with the truth: the socket subscribes before the dump, so no
change falls between them, and one made while ``start()`` runs is part of the
state it starts from. Link messages of another family than ``AF_UNSPEC`` are
ignored: a bridge sends ``RTM_DELLINK`` with ``AF_BRIDGE`` when a port *leaves*
it, and the port still exists. IPv6 link-local addresses (fe80::/10) are ignored:
they come and go with every link and carry no overlay traffic. IPv4 link-local
(169.254/16) is reported like any other address.

Which interfaces count: those ``interfaces()`` names when it returns a non-empty
list (asked at every event, so it may follow a config reload), otherwise every
interface but ``lo``. ``changes`` counts the calls of ``on_change``.

Why netlink and not polling: the server must drop cached overlay answers within
two seconds of a change, and cost no CPU while nothing changes. The kernel pushes
each change to the socket as it happens; the loop wakes only then.

``parse_messages(data)`` is the pure decoder (no I/O, never raises) of one
datagram into :class:`LinkEvent` and :class:`AddressEvent` values.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from horizon_dns.net.interfaces import IFF_RUNNING, IFF_UP

log = logging.getLogger("horizon_dns.net.linkwatch")

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h, linux/if.h
NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
IFLA_IFNAME, IFLA_OPERSTATE = 3, 16
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 10  # Linux's numbers, whatever the build platform

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
_RECV_SIZE = 65536  # above any rtnetlink datagram (dump pages are at most 32 KiB)
_RCVBUF = 1 << 20  # room for bursts; the kernel caps it at net.core.rmem_max
_DUMP_TIMEOUT = 1.0
_DRAIN_LIMIT = 10_000  # datagrams per wake-up
_FE80 = ipaddress.IPv6Network("fe80::/10")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """An RTM_NEWLINK (``removed`` False) or RTM_DELLINK of family AF_UNSPEC."""

    index: int
    name: str | None
    flags: int
    operstate: int | None
    removed: bool = False

    @property
    def up(self) -> bool:
        return self.flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """An RTM_NEWADDR (``removed`` False) or RTM_DELADDR."""

    index: int
    address: IPInterface
    label: str | None
    removed: bool = False


Event = LinkEvent | AddressEvent


def _align(length: int) -> int:
    return (length + 3) & ~3


def _messages(data: bytes) -> Iterator[tuple[int, memoryview]]:
    """(type, payload) of each nlmsghdr in ``data``; stops at the first malformed one."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            return
        yield kind, view[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def _attributes(view: memoryview) -> dict[int, memoryview]:
    """rtattr type -> value; a malformed attribute ends the list."""
    found: dict[int, memoryview] = {}
    offset = 0
    while offset + _RTATTR.size <= len(view):
        length, kind = _RTATTR.unpack_from(view, offset)
        if length < _RTATTR.size or offset + length > len(view):
            break
        found.setdefault(kind & NLA_TYPE_MASK, view[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return found


def _text(value: memoryview | None) -> str | None:
    if value is None:
        return None
    return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace") or None


def _link(kind: int, payload: memoryview) -> LinkEvent | None:
    if len(payload) < _IFINFOMSG.size:
        return None
    family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    if family != AF_UNSPEC:
        return None  # AF_BRIDGE port notices: the interface itself did not change
    attrs = _attributes(payload[_IFINFOMSG.size :])
    operstate = attrs.get(IFLA_OPERSTATE)
    return LinkEvent(
        index,
        _text(attrs.get(IFLA_IFNAME)),
        flags,
        operstate[0] if operstate is not None and len(operstate) >= 1 else None,
        removed=kind == RTM_DELLINK,
    )


def _address(kind: int, payload: memoryview) -> AddressEvent | None:
    if len(payload) < _IFADDRMSG.size:
        return None
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(payload)
    size = {AF_INET: 4, AF_INET6: 16}.get(family)
    if size is None or prefixlen > size * 8:
        return None
    attrs = _attributes(payload[_IFADDRMSG.size :])
    # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on a point-to-point
    # link, and the address itself otherwise (IPv6 sends IFA_LOCAL only with a peer).
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    if raw is None or len(raw) != size:
        return None
    address: IPInterface
    if family == AF_INET:
        address = ipaddress.IPv4Interface((bytes(raw), prefixlen))
    else:
        address = ipaddress.IPv6Interface((bytes(raw), prefixlen))
    return AddressEvent(index, address, _text(attrs.get(IFA_LABEL)), removed=kind == RTM_DELADDR)


def parse_messages(data: bytes) -> list[Event]:
    """The link and address events in one netlink datagram; never raises.

    Other message types, link messages of another family than AF_UNSPEC, and
    malformed messages yield nothing; a message that overruns the datagram ends it.
    """
    events: list[Event] = []
    for kind, payload in _messages(data):
        event: Event | None = None
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            event = _link(kind, payload)
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            event = _address(kind, payload)
        if event is not None:
            events.append(event)
    return events


def _dump(kind: int, body: bytes) -> list[Event]:
    """The events of one rtnetlink dump request, over a short-lived blocking socket."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    events: list[Event] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.bind((0, 0))
        sock.sendto(header + body, (0, 0))
        while True:
            data = sock.recv(_RECV_SIZE)
            events.extend(parse_messages(data))
            for message, payload in _messages(data):
                if message == NLMSG_DONE:
                    return events
                if message == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EPROTO
                    if code == 0:
                        continue  # an acknowledgement
                    raise OSError(code, f"rtnetlink dump {kind} failed: {errno.errorcode.get(code, code)}")


class LinkWatcher:
    """Calls ``on_change(reason)`` when a watched interface goes up or down or gains or
    loses an address; event driven over rtnetlink (see the module docstring)."""

    def __init__(
        self, on_change: Callable[[str], None], interfaces: Callable[[], Sequence[str]] | None = None
    ) -> None:
        self._on_change = on_change
        self._interfaces = interfaces
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up: dict[int, bool] = {}
        self._names: dict[int, str] = {}
        self._addresses: dict[int, set[IPInterface]] = {}
        self.changes = 0

    def start(self) -> bool:
        """Open the socket and watch it; False where netlink is not available.

        Needs a running asyncio loop (RuntimeError without one: a caller's bug).
        """
        if self._sock is not None:
            return True
        loop = asyncio.get_running_loop()
        if sys.platform != "linux":
            log.debug("link watcher off: rtnetlink needs Linux, not %s", sys.platform)
            return False
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
        except OSError as exc:
            log.debug("link watcher off: no rtnetlink socket: %s", exc)
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            # Subscribe before the dump: a change in between is then queued on this socket.
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            loop.add_reader(sock.fileno(), self._on_readable)
        except (OSError, NotImplementedError) as exc:
            sock.close()
            log.debug("link watcher off: %s", exc)
            return False
        self._sock, self._loop = sock, loop
        self._seed()
        return True

    def stop(self) -> None:
        """Stop watching and close the socket; idempotent."""
        sock, loop = self._sock, self._loop
        self._sock = self._loop = None
        if sock is None:
            return
        if loop is not None and not loop.is_closed():
            loop.remove_reader(sock.fileno())
        sock.close()

    def _seed(self) -> None:
        """Read the current links and addresses, so the first event is compared with the truth."""
        self._up.clear()
        self._names.clear()
        self._addresses.clear()
        try:
            events = _dump(RTM_GETLINK, _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0))
            events += _dump(RTM_GETADDR, _IFADDRMSG.pack(AF_UNSPEC, 0, 0, 0, 0))
        except OSError as exc:
            # Without a seed every interface counts as down: at worst one extra "up".
            log.debug("link watcher: no rtnetlink dump: %s", exc)
            return
        for event in events:
            self._apply(event, report=False)

    def _on_readable(self) -> None:
        sock = self._sock
        overflow = False
        for _ in range(_DRAIN_LIMIT):  # a bound, should changes ever come faster than we read
            if self._sock is not sock or sock is None:
                return  # on_change stopped the watcher
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log.debug("link watcher: recv failed: %s", exc)
                    break
                overflow = True
                continue
            if not overflow:  # after an overflow the state is read afresh below instead
                for event in parse_messages(data):
                    self._apply(event, report=True)
        if overflow:
            # Events were lost: read the state again, then report once. In this order, a
            # change made before the dump is covered by the report, and one made after it
            # is queued on the socket and compared with the fresh state.
            self._seed()
            self._report("netlink overflow")

    def _name(self, index: int, fallback: str | None = None) -> str:
        name = self._names.get(index)
        if name is None:
            try:
                name = socket.if_indextoname(index)
            except OSError:
                name = fallback or f"if{index}"
        return name

    def _apply(self, event: Event, *, report: bool) -> None:
        if isinstance(event, LinkEvent):
            if event.name is not None:
                self._names[event.index] = event.name
            name = self._name(event.index)
            if event.removed:
                self._up.pop(event.index, None)
                self._names.pop(event.index, None)
                self._addresses.pop(event.index, None)
                reason = f"link {name} removed"
            else:
                was, self._up[event.index] = self._up.get(event.index, False), event.up
                if was == event.up:
                    return
                reason = f"link {name} {'up' if event.up else 'down'}"
            detail = f" (flags {event.flags:#x}, operstate {event.operstate})"
        else:
            address = event.address
            if address.version == 6 and address.ip in _FE80:
                return
            known = self._addresses.setdefault(event.index, set())
            name = self._name(event.index, event.label)
            if event.removed:
                known.discard(address)
                reason = f"address {address} removed from {name}"
            elif address in known:
                return
            else:
                known.add(address)
                reason = f"address {address} added on {name}"
            detail = ""
        if report and self._counts(name):
            log.debug("link watcher: %s%s", reason, detail)
            self._report(reason)

    def _counts(self, name: str) -> bool:
        try:
            wanted = self._interfaces() if self._interfaces is not None else ()
        except Exception:
            log.exception("link watcher: interfaces() failed; counting %s", name)
            return True  # an extra flush is harmless, a missed one serves stale answers
        return name in wanted if wanted else name != "lo"

    def _report(self, reason: str) -> None:
        self.changes += 1
        try:
            self._on_change(reason)
        except Exception:
            # The reader must keep draining the socket whatever the callback does.
            log.exception("link watcher: on_change(%r) failed", reason)
