"""The two objects every stage speaks: :class:`Query` in, :class:`Reply` out.

A Query is what the wire edge decoded (see :mod:`horizon_dns.core.wire`) plus where
it came from. A Reply is what a stage decided: an rcode, its records in exactly one
form -- dnslib ``RR`` lists (``answer``/``authority``/``additional``) *or* the packed
bytes of those sections (``packed``), never both, so no rule can rewrite one and
miss the other -- and three fields every observer reads: ``stage`` (who answered),
``outcome`` (what kind of answer) and ``reason`` (a short, low-cardinality why,
e.g. ``template:hub-alias``). Neither object touches a socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from horizon_dns.core.bounded import remember
from horizon_dns.core.names import name_to_text

if TYPE_CHECKING:
    from dnslib import RR

    from horizon_dns.core.packed import Packed

QTYPE_NAMES: dict[int, str] = {}
CLASS_NAMES = {1: "IN", 3: "CH", 4: "HS", 254: "NONE", 255: "ANY"}


def qtype_name(qtype: int) -> str:
    """Mnemonic for a type code (``A``, ``AAAA``), ``TYPE65280`` when unknown (RFC 3597 §5)."""
    name = QTYPE_NAMES.get(qtype)
    if name is None:
        from dnslib import QTYPE

        name = QTYPE.get(qtype, f"TYPE{qtype}")
        if not isinstance(name, str) or name.isdigit():
            name = f"TYPE{qtype}"
        QTYPE_NAMES[qtype] = name
    return name


def class_name(qclass: int) -> str:
    """Mnemonic for a class code, ``CLASS42`` when unknown (RFC 3597 §5)."""
    return CLASS_NAMES.get(qclass, f"CLASS{qclass}")


@dataclass(slots=True, frozen=True)
class Edns:
    """The client's OPT record (RFC 6891 §6.1.2), as decoded."""

    udp_size: int
    version: int
    do: bool
    options: bytes = b""


class Outcome(enum.Enum):
    """What kind of reply a stage produced; a metrics label, so the set is closed."""

    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    REFUSED = "refused"
    FAILED = "failed"
    OTHER = "other"


#: Lowercased wire name -> presentation form: the same names are asked again and again.
_NAMES: dict[bytes, str] = {}


@dataclass(slots=True)
class Query:
    """One question being resolved.

    ``qname_wire`` and ``question`` keep the client's letter case (echoed back,
    RFC 1035 §7.3 / draft-vixie-dnsext-dns0x20); ``name`` is the lowercased
    presentation form with a trailing dot that stages match on (RFC 4343).
    """

    msg_id: int
    flags: int
    qname_wire: bytes
    qtype: int
    qclass: int
    edns: Edns | None = None
    question: bytes = b""
    client: tuple[str, int] | None = None
    transport: str = "udp"
    # Set by a stage that knows the name exists although it has no record of
    # this type, so the end of the chain says NODATA instead of SERVFAIL.
    name_exists: str | None = None
    # CNAME chasing depth; 0 for a client's own question.
    depth: int = 0
    # When not None, stages append human-readable steps for `explain`.
    trace: list[str] | None = None
    _name: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """Lowercased presentation name with trailing dot."""
        if self._name is None:
            lower = self.qname_wire.lower()
            name = _NAMES.get(lower)
            if name is None:
                name = remember(_NAMES, lower, name_to_text(lower), 4096)
            self._name = name
        return self._name

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def class_name(self) -> str:
        return class_name(self.qclass)

    def note(self, text: str) -> None:
        """Record a step for ``explain``; free when nobody is tracing."""
        if self.trace is not None:
            self.trace.append(("  " * self.depth) + text)

    def derive(self, qname_wire: bytes) -> Query:
        """A sub-query for another name with the same type, class and client (CNAME chasing)."""
        return Query(
            msg_id=self.msg_id,
            flags=self.flags,
            qname_wire=qname_wire,
            qtype=self.qtype,
            qclass=self.qclass,
            edns=self.edns,
            question=qname_wire + struct.pack("!HH", self.qtype, self.qclass),
            client=self.client,
            transport=self.transport,
            depth=self.depth + 1,
            trace=self.trace,
        )


@dataclass(slots=True)
class Reply:
    """A stage's decision: records as dnslib RRs, or as ``packed`` bytes -- one of the two.

    Change a reply's TTLs only through :func:`horizon_dns.core.ttl.ttl_rule`, which
    returns the bytes form.
    """

    rcode: int
    stage: str
    outcome: Outcome
    reason: str
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    authoritative: bool = False
    # RFC 8914 Extended DNS Error: (info-code, extra text).
    ede: tuple[int, str] | None = None
    # The reply's record sections as bytes (forwarded, cached, a template's records
    # packed once); the record lists are then empty.
    packed: Packed | None = None
    # False when the answer depends on who asked (e.g. a template using `client`).
    cacheable: bool = True
    # Set when the name belongs to the overlay: the longest time, in seconds, that any
    # layer may keep or hand out this reply (its TTLs are capped to it), so the horizon
    # switches within the zone's bound. Such replies are never served stale.
    overlay_ttl: int | None = None
    # A decision no zone fallback may override: a local limit (lookup cap, multicast
    # rate, upstream in-flight cap) -- an inside name must never get the public answer
    # because this node was busy (DECISIONS.md 1).
    final: bool = False

    def has_records(self) -> bool:
        """Whether the reply is in record form with at least one record."""
        return bool(self.answer or self.authority or self.additional)
