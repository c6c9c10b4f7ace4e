"""Watch multicast mDNS responses for host records: goodbyes and announcements.

Contract: ``MdnsWatcher(on_record, interfaces)`` listens on UDP 5353 for the mDNS
groups 224.0.0.251 and ff02::fb on every interface ``interfaces()`` returns (IPv4
where the interface has an IPv4 address, IPv6 where it has an IPv6 one) and, for
each multicast *response* (QR=1), calls ``on_record(host, goodbye)`` once per
distinct ``(host, goodbye)`` pair among its A/AAAA records owned by ``host.local.``
-- ``host`` lowercased (ASCII, RFC 6762 §16) and without ``.local``, ``goodbye``
True when the record's TTL is 0. The server uses it to drop its cached view of a
host at once:

* a responder that stops multicasts its records again with TTL 0 (RFC 6762 §10.1);
* a responder that starts, or whose link comes back, multicasts announcements
  (RFC 6762 §8.3), which is as much a reason to forget the old view.

``await start()`` returns False when nothing could be opened (logged) and never
raises; the watcher stays active, so a later ``rejoin()`` -- called after link or
address changes -- joins interfaces that have appeared (and leaves those that went
away). ``await stop()`` closes everything. ``seen`` counts the ``(host, goodbye)``
reports made, ``goodbyes`` those with ``goodbye`` True, ``dropped`` the datagrams
thrown away before parsing (over 9000 bytes, or not from port 5353).

Only the answer and additional sections are read; owner names must be exactly one
label plus ``local.``; queries (QR=0), other opcodes and non-zero rcodes (RFC 6762
§18.3, §18.11), questions in a response (§6), responses not from port 5353 (§6),
datagrams over 9000 bytes (§17) and anything malformed are ignored, never raised.
Parsing walks the wire format by hand (:func:`hosts_in`): a busy LAN carries many
responses, nearly all of them for names we do not care about.

Sharing port 5353 (RFC 6762 §15, "Multiple Responders on the Same Machine"):
avahi, systemd-resolved and python-zeroconf all bind UDP 5353 on the wildcard
address with SO_REUSEADDR (and SO_REUSEPORT); the kernel copies each *multicast*
datagram to every socket bound to the port, but hands each *unicast* datagram to
exactly one of them -- so one more wildcard socket could take unicast replies
(answers to QU questions, §5.4) and legacy unicast queries meant for a responder.
This watcher therefore binds to the group address itself (224.0.0.251:5353, and
ff02::fb%interface:5353, one IPv6 socket per interface): a unicast datagram's
destination never matches it, so it receives multicast only and takes nothing from
anyone (SO_REUSEADDR / SO_REUSEPORT are still set, as python-zeroconf does, so the
bind coexists with their wildcard sockets). On Linux IP_MULTICAST_ALL /
IPV6_MULTICAST_ALL are turned off so only groups joined here, on the given
interfaces, are delivered. Nothing is ever sent; joining makes the kernel send an
IGMP/MLD membership report, which is unavoidable and harmless (every mDNS program
on the host has joined the same group).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable

from dnslib import QTYPE

from horizon_dns.core.wire import CLASS_IN, HEADER, OPCODE_MASK, QR, read_rr, skip_name
from horizon_dns.llmnr.responder import Interface
from horizon_dns.net.oneshot import MDNS

log = logging.getLogger("horizon_dns.net.mdns_watch")

#: RFC 6762 §17: a multicast DNS packet, including headers, may be up to 9000 bytes.
MAX_DATAGRAM = 9000
#: Datagrams read per wake-up, so one busy socket cannot starve the event loop.
BURST = 64

_TYPE_A = int(QTYPE.A)
_TYPE_AAAA = int(QTYPE.AAAA)
_RDLENGTH = {_TYPE_A: 4, _TYPE_AAAA: 16}
_CACHE_FLUSH = 0x8000  # RFC 6762 §10.2: top bit of the class in a response
_RCODE_MASK = 0x000F
_LOCAL = b"local"
_MAX_POINTERS = 16

# Linux values; Python 3.11 has no constants for them.
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)


def _host_label(data: bytes, offset: int) -> bytes | None:
    """The first label of the (possibly compressed) name at ``offset`` if the name
    is exactly ``label.local.`` (ASCII case-insensitive), else None.

    Each compression pointer must point before the start of the stretch of labels
    it ends (what every encoder writes), so the walk always ends. IndexError or
    ValueError on malformed data.
    """
    labels: list[bytes] = []
    segment = offset
    pointers = 0
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            target = ((length & 0x3F) << 8) | data[offset + 1]
            pointers += 1
            if target >= segment or pointers > _MAX_POINTERS:
                raise ValueError("compression pointer loop")
            offset = segment = target
            continue
        if length & 0xC0:
            raise ValueError("bad label type")
        if length == 0:
            break
        if len(labels) == 2:
            return None  # a third label: not a one-label .local name
        end = offset + 1 + length
        if end > len(data):
            raise ValueError("label runs past the end")
        labels.append(data[offset + 1 : end])
        offset = end
    if len(labels) != 2 or labels[1].lower() != _LOCAL:
        return None
    return labels[0]


def hosts_in(data: bytes) -> list[tuple[str, bool]]:
    """``(host, goodbye)`` for the ``host.local`` A/AAAA records of an mDNS response.

    Distinct pairs in order of first appearance; ``[]`` for a query, a response
    with another opcode or a non-zero rcode, or anything malformed (never raises).
    """
    try:
        if len(data) < HEADER.size:
            return []
        _id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
        if not flags & QR or flags & (OPCODE_MASK | _RCODE_MASK):
            return []
        offset = HEADER.size
        for _ in range(qdcount):  # RFC 6762 §6: must be empty, ignored if not
            offset = skip_name(data, offset) + 4
            if offset > len(data):
                return []
        found: dict[tuple[str, bool], None] = {}
        for index in range(ancount + nscount + arcount):
            start = offset
            rtype, rclass, ttl, fixed, offset = read_rr(data, offset)
            if ancount <= index < ancount + nscount:
                continue  # authority section: probes' proposed records, not answers
            if _RDLENGTH.get(rtype) != offset - fixed - 10 or rclass & ~_CACHE_FLUSH != CLASS_IN:
                continue
            label = _host_label(data, start)
            if label is None or b"." in label:
                continue  # a dot inside the label would read as two labels later on
            try:
                # RFC 6762 §16: names are UTF-8, compared case-insensitively for ASCII only.
                host = label.lower().decode("utf-8")
            except UnicodeDecodeError:
                continue
            found[(host, ttl == 0)] = None
        return list(found)
    except (ValueError, IndexError, struct.error):
        return []


class MdnsWatcher:
    """Reports the hosts of A/AAAA records in multicast mDNS responses (see module)."""

    def __init__(
        self, on_record: Callable[[str, bool], None], interfaces: Callable[[], list[Interface]]
    ) -> None:
        self.on_record = on_record
        self.interfaces = interfaces
        self.port = MDNS.port
        self.seen = 0
        self.goodbyes = 0
        self.dropped = 0
        self._active = False
        self._v4: socket.socket | None = None
        self._v4_joined: set[int] = set()  # interface indexes
        self._v6: dict[int, socket.socket] = {}  # interface index -> socket bound to ff02::fb%index
        self._names: dict[int, str] = {}

    # Lifecycle ---------------------------------------------------------------

    async def start(self) -> bool:
        """Open and join on the interfaces; False (logged) when nothing could be opened."""
        self._active = True
        self.rejoin()
        if not self.listening:
            log.warning("mDNS watch: no interface could be joined; goodbyes and announcements go unseen")
            return False
        return True

    async def stop(self) -> None:
        self._active = False
        if self._v4 is not None:
            self._close(self._v4)
            self._v4 = None
        for sock in self._v6.values():
            self._close(sock)
        self._v6.clear()
        self._v4_joined.clear()

    @property
    def listening(self) -> list[str]:
        """Where the watcher listens now, as ``name/IPv4`` and ``name/IPv6``."""
        v4 = [f"{self._names.get(i, i)}/IPv4" for i in sorted(self._v4_joined)]
        return v4 + [f"{self._names.get(i, i)}/IPv6" for i in sorted(self._v6)]

    def rejoin(self) -> None:
        """Listen on the interfaces as they are now: join new ones, leave vanished ones.

        Joins are repeated for every wanted interface (EADDRINUSE says it is still
        joined): a membership lost with a link going away comes back this way.
        """
        if not self._active:
            return
        try:
            interfaces = self.interfaces()
        except Exception:  # an interface listing problem must not end the watcher
            log.exception("mDNS watch: cannot list interfaces")
            return
        want4 = {i.index for i in interfaces if any(a.version == 4 for a in i.addresses)}
        want6 = {i.index for i in interfaces if any(a.version == 6 for a in i.addresses)}
        self._names.update({i.index: i.name for i in interfaces})
        before = self.listening
        for index in sorted(self._v4_joined - want4):
            self._leave4(index)
        for index in sorted(set(self._v6) - want6):
            self._close(self._v6.pop(index))
        for index in sorted(want4):
            self._join4(index)
        for index in sorted(want6):
            if index in self._v6:
                with contextlib.suppress(OSError):  # logged at debug level in _join6
                    _join6(self._v6[index], index)
                continue
            sock = self._open6(index)
            if sock is not None:
                self._v6[index] = sock
        if self.listening != before:
            log.info("mDNS watch: hearing goodbyes on %s", ", ".join(self.listening) or "nothing")

    # Sockets -----------------------------------------------------------------

    def _socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                with contextlib.suppress(OSError):  # ENOPROTOOPT on old kernels
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sys.platform.startswith("linux"):
                # Only groups joined by this socket, on the interfaces joined here.
                with contextlib.suppress(OSError):
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
                    else:
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _listen(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock)

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()

    def _join4(self, index: int) -> None:
        if self._v4 is None:
            try:
                sock = self._socket(socket.AF_INET)
                try:
                    # Bound to the group: no unicast to 5353 can land here (see module).
                    sock.bind((MDNS.v4, self.port))
                    self._listen(sock)
                except (OSError, RuntimeError):
                    sock.close()
                    raise
            except (OSError, RuntimeError) as exc:
                log.warning("mDNS watch: cannot bind %s:%d: %s%s", MDNS.v4, self.port, exc, _hint(exc))
                return
            self._v4 = sock
        mreq = socket.inet_aton(MDNS.v4) + socket.inet_aton("0.0.0.0") + struct.pack("=i", index)
        try:
            self._v4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # EADDRINUSE: already joined
                log.warning("mDNS watch: cannot join %s on %s: %s", MDNS.v4, self._names.get(index), exc)
                self._v4_joined.discard(index)
                return
        self._v4_joined.add(index)

    def _leave4(self, index: int) -> None:
        self._v4_joined.discard(index)
        if self._v4 is None:
            return
        mreq = socket.inet_aton(MDNS.v4) + socket.inet_aton("0.0.0.0") + struct.pack("=i", index)
        with contextlib.suppress(OSError):  # gone with its interface already
            self._v4.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, mreq)

    def _open6(self, index: int) -> socket.socket | None:
        name = self._names.get(index, str(index))
        try:
            sock = self._socket(socket.AF_INET6)
        except OSError as exc:
            log.warning("mDNS watch: no IPv6 socket: %s", exc)
            return None
        try:
            # Bound to ff02::fb on this interface: multicast only, this link only.
            sock.bind((MDNS.v6, self.port, 0, index))
            _join6(sock, index)
            self._listen(sock)
        except (OSError, RuntimeError) as exc:
            sock.close()
            log.warning(
                "mDNS watch: cannot listen on [%s%%%s]:%d: %s%s", MDNS.v6, name, self.port, exc, _hint(exc)
            )
            return None
        return sock

    # Receiving -----------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(BURST):
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("mDNS watch: receive error: %s", exc)
                return
            # RFC 6762 §6: responses not from port 5353 are silently ignored; §17 size cap.
            if len(data) > MAX_DATAGRAM or source[1] != MDNS.port:
                self.dropped += 1
                continue
            for host, goodbye in hosts_in(data):
                self.seen += 1
                self.goodbyes += goodbye
                try:
                    self.on_record(host, goodbye)
                except Exception:  # the consumer's bug must not stop the watcher
                    log.exception("mDNS watch: on_record(%r, %r) failed", host, goodbye)


def _join6(sock: socket.socket, index: int) -> None:
    """Join ff02::fb on interface ``index``; EADDRINUSE means it is joined already."""
    mreq = socket.inet_pton(socket.AF_INET6, MDNS.v6) + struct.pack("=i", index)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            log.debug("mDNS watch: cannot join %s on interface %d: %s", MDNS.v6, index, exc)
            raise


def _hint(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return " (another mDNS stack holds the port exclusively: set disallow-other-stacks=no for avahi)"
    return ""
