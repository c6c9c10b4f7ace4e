"""The LLMNR responder's decisions (RFC 4795), apart from any socket.

Contract: ``decide(data, arrival, names, interface)`` returns ``(reply_bytes,
reason)`` or ``(None, reason)`` for silence, where ``reason`` is a short label
for metrics (``answered``, ``not-ours``, ``unicast-udp``...). It never raises.

Silence, as RFC 4795 requires (section in brackets):

* shorter than a header, QR=1, opcode != 0, QDCOUNT != 1, ANCOUNT != 0 or
  NSCOUNT != 0, a malformed question [2.1.1];
* the C (conflict) bit set in a query [2.1.1];
* a UDP query not sent to the LLMNR multicast address: unicast UDP is for
  conflict resolution only, and we do not resolve conflicts over it [2.4];
* a query that arrived on an interface we do not serve, or whose source is not
  on the link of that interface [2.5];
* a name we are not authoritative for: never NXDOMAIN to a multicast query [2.1].

Answers: the node's hostname and its own aliases get the addresses of the
interface the query arrived on; device names get their configured addresses;
PTR queries for the interface's own addresses get the hostname. A name we own
with no record of the asked type gets an empty NOERROR answer [2.1]. The T
(tentative) bit is set for names a conflict was seen for [4.1].
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import AAAA, PTR, QTYPE, RR, A, DNSBuffer

from horizon_dns.core.names import name_to_text
from horizon_dns.core.wire import AA, CLASS_IN, HEADER, OPCODE_MASK, QR, RD, TC, read_name

LLMNR_PORT = 5355
LLMNR_GROUP_V4 = "224.0.0.252"
LLMNR_GROUP_V6 = "ff02::1:3"

# RFC 4795 §2.1.1: LLMNR keeps the DNS header's layout (QR, opcode, TC where DNS has
# them); its C (conflict) bit sits where DNS has AA, its T (tentative) bit where DNS has RD.
C_BIT, T_BIT = AA, RD
UDP_LIMIT = 512  # RFC 4795 §2.1: the size to keep UDP replies to "when in doubt"
CLASS_ANY = 255
_QTAIL = struct.Struct("!HH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True, slots=True)
class Interface:
    """A network interface we answer on: its name, index and addresses with prefixes."""

    name: str
    index: int
    addresses: tuple[IPInterface, ...]

    def on_link(self, source: IPAddress) -> bool:
        """RFC 4795 §2.5: the source is on this link (a prefix of ours, or IPv6 link-local)."""
        if source.version == 6 and source.is_link_local:
            return True
        return any(
            source in address.network for address in self.addresses if address.version == source.version
        )


@dataclass(frozen=True, slots=True)
class Arrival:
    """Where a query came from and how."""

    transport: str  # "udp" or "tcp"
    source: tuple[str, int]
    destination: str  # the address the query was sent to
    interface_index: int


@dataclass(slots=True)
class Names:
    """What this node answers for."""

    hostname: str
    aliases: frozenset[str] = frozenset()  # answered with the arrival interface's addresses
    devices: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    ttl: int = 30
    conflicts: set[str] = field(default_factory=set)  # names another host also answered for

    def own(self) -> set[str]:
        return {self.hostname.lower(), *(a.lower() for a in self.aliases)}

    def all(self) -> set[str]:
        return self.own() | {d.lower() for d in self.devices}


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _addresses_for(name: str, names: Names, interface: Interface) -> tuple[IPAddress, ...] | None:
    label = name.rstrip(".")
    if label in names.own():
        # Global/ULA first, link-local last: a client that can use either prefers the first.
        ordered = sorted(interface.addresses, key=lambda a: a.ip.version == 6 and a.ip.is_link_local)
        return tuple(a.ip for a in ordered)
    for device, addresses in names.devices.items():
        if device.lower() == label:
            return addresses
    return None


def _reverse_owner(name: str, names: Names, interface: Interface) -> str | None:
    for address in interface.addresses:
        if address.ip.reverse_pointer + "." == name:
            return names.hostname
    return None


def decide(
    data: bytes, arrival: Arrival, names: Names, interface: Interface | None
) -> tuple[bytes | None, str]:
    """The reply to one LLMNR message, or None and why not."""
    if len(data) < HEADER.size:
        return None, "short"
    msg_id, flags, qdcount, ancount, nscount, _arcount = HEADER.unpack_from(data)
    if flags & QR:
        return None, "response"
    if flags & OPCODE_MASK:
        return None, "opcode"
    if qdcount != 1 or ancount or nscount:
        return None, "counts"
    if flags & C_BIT:
        return None, "conflict-bit"
    if arrival.transport == "udp" and arrival.destination not in (LLMNR_GROUP_V4, LLMNR_GROUP_V6):
        return None, "unicast-udp"
    if interface is None:
        return None, "interface"
    try:
        source = ipaddress.ip_address(arrival.source[0].split("%")[0])
    except ValueError:
        return None, "off-link"
    if not interface.on_link(source):
        return None, "off-link"
    try:
        qname_wire, offset = read_name(data, HEADER.size)
        qtype, qclass = _QTAIL.unpack_from(data, offset)
    except (ValueError, struct.error):
        return None, "malformed"
    if qclass not in (CLASS_IN, CLASS_ANY):
        return None, "not-ours"
    name = name_to_text(qname_wire.lower())
    owner = name_to_text(qname_wire)  # records carry the name as the client spelled it
    records: list[RR] = []
    addresses = _addresses_for(name, names, interface)
    if addresses is not None:
        for address in addresses:
            if address.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
                records.append(RR(owner, QTYPE.A, ttl=names.ttl, rdata=A(str(address))))
            elif address.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
                records.append(RR(owner, QTYPE.AAAA, ttl=names.ttl, rdata=AAAA(str(address))))
    else:
        host = _reverse_owner(name, names, interface)
        if host is None:
            return None, "not-ours"
        if qtype in (QTYPE.PTR, QTYPE.ANY):
            records.append(RR(owner, QTYPE.PTR, ttl=names.ttl, rdata=PTR(_fqdn(host))))
    out_flags = QR | (T_BIT if name.rstrip(".") in names.conflicts else 0)
    question = data[HEADER.size : offset + 4]
    reply = _pack(msg_id, out_flags, question, records)
    if arrival.transport == "udp" and len(reply) > UDP_LIMIT:
        # RFC 4795 §2.1: UDP replies no larger than is safe, 512 octets when in doubt;
        # the records that fit, TC set (§2.1.1) so the sender asks again over TCP.
        while records and len(reply) > UDP_LIMIT:
            records.pop()
            reply = _pack(msg_id, out_flags | TC, question, records)
        return reply, "truncated"
    return reply, "answered"


def _pack(msg_id: int, flags: int, question: bytes, records: Iterable[RR]) -> bytes:
    buf = DNSBuffer()
    records = list(records)
    buf.append(HEADER.pack(msg_id, flags, 1, len(records), 0, 0))
    buf.append(question)
    for rr in records:
        rr.pack(buf)
    return bytes(buf.data)


def usable_response(data: bytes) -> bool:
    """Whether a sender may use an LLMNR response: one question (RFC 4795 §2.1.1:
    others are silently discarded), RCODE 0, and not tentative -- a T bit means the
    responder has not verified the name is its own, or lost it in a conflict (§4.1)."""
    if len(data) < HEADER.size:
        return False
    _msg_id, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(data)
    return qdcount == 1 and flags & 0xF == 0 and not flags & T_BIT


def build_query(msg_id: int, name: str, qtype: int) -> bytes:
    """An LLMNR query (RFC 4795 §2.1.1): flags all zero, one question, class IN."""
    from horizon_dns.core.names import text_to_name

    return HEADER.pack(msg_id, 0, 1, 0, 0, 0) + text_to_name(name) + _QTAIL.pack(qtype, CLASS_IN)
