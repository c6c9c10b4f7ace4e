"""Unit tests of the wire edge: decode_query (wire.py), names (names.py) and encode_reply (encode.py).

No sockets: queries are built by dnspython (an independent encoder) and replies are
read back with dnspython (an independent decoder) as well as byte by byte.
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest
from dnslib import QTYPE, RR, TXT, A
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from horizon_dns.core.encode import encode_reply, udp_limit
from horizon_dns.core.message import Edns, Outcome, Query, Reply
from horizon_dns.core.names import name_to_text, text_to_name
from horizon_dns.core.wire import (
    AA,
    BADVERS,
    CD,
    EDNS_DO,
    FORMERR,
    HEADER,
    NOERROR,
    NOTIMP,
    QR,
    RA,
    RD,
    SERVFAIL,
    TC,
    Drop,
    FormatError,
    NotImplementedOpcode,
    decode_query,
    encode_error,
)

PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
OPT_FIXED = struct.Struct("!BHHIH")  # root owner, type, class (payload), TTL, rdlength


# ---------------------------------------------------------------- helpers


def make_wire(
    name: str = "nodeb.mydomain.tld",
    rdtype: int | str = "A",
    *,
    msg_id: int = 0x1234,
    edns: int | None = None,
    payload: int = 1232,
    do: bool = False,
    cd: bool = False,
    rd: bool = True,
    options: list[dns.edns.Option] | None = None,
) -> bytes:
    """A query's wire form as dnspython writes it."""
    message = dns.message.make_query(
        name,
        rdtype,
        use_edns=edns if edns is not None else (0 if do or options else False),
        payload=payload,
        want_dnssec=do,
        options=options,
    )
    message.id = msg_id
    if cd:
        message.flags |= dns.flags.CD
    if not rd:
        message.flags &= ~dns.flags.RD
    return message.to_wire()


def question_of(wire: bytes) -> bytes:
    """The question section of a dnspython-built one-question message."""
    offset = HEADER.size
    while wire[offset]:
        offset += 1 + wire[offset]
    return wire[HEADER.size : offset + 5]


def with_header(wire: bytes, **fields: int) -> bytes:
    """``wire`` with some header fields replaced (id, flags, qd, an, ns, ar)."""
    names = ("id", "flags", "qd", "an", "ns", "ar")
    values = dict(zip(names, HEADER.unpack_from(wire), strict=True))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + wire[HEADER.size :]


def opt_record(payload: int = 1232, version: int = 0, do: bool = False, owner: bytes = b"\x00") -> bytes:
    ttl = (version << 16) | (EDNS_DO if do else 0)
    return owner + struct.pack("!HHIH", 41, payload, ttl, 0)


def decoded(**kwargs: object) -> Query:
    return decode_query(make_wire(**kwargs))  # type: ignore[arg-type]


def txt_records(owner: str, count: int, size: int = 60) -> list[RR]:
    return [RR(owner, QTYPE.TXT, rdata=TXT(f"{i:03d}" + "x" * size), ttl=60) for i in range(count)]


def plain_reply(**kwargs: object) -> Reply:
    return Reply(NOERROR, "t", Outcome.ANSWER, "t", **kwargs)  # type: ignore[arg-type]


def parse_opt(reply: bytes) -> tuple[int, int, int, bytes]:
    """(payload, extended rcode, flags, options) of the OPT that ends a reply with one OPT."""
    arcount = HEADER.unpack_from(reply)[5]
    assert arcount >= 1
    # Our OPT is always the last record: walk from the end is not possible, so find it
    # with dnspython's help and cross-check the raw bytes.
    message = dns.message.from_wire(reply)
    assert message.opt is not None
    options = b"".join(
        struct.pack("!HH", opt.otype, len(opt.to_wire())) + opt.to_wire() for opt in message.options
    )
    start = len(reply) - 11 - len(options)
    owner, rtype, payload, ttl, rdlength = OPT_FIXED.unpack_from(reply, start)
    assert (owner, rtype, rdlength) == (0, 41, len(options))
    assert reply[start + 11 :] == options
    return payload, ttl >> 24, ttl & 0xFFFF, options


# ---------------------------------------------------------------- decode_query: valid queries


def test_decode_plain_query() -> None:
    wire = make_wire(msg_id=0xBEEF)
    query = decode_query(wire)
    assert query.msg_id == 0xBEEF
    assert query.flags == RD
    assert query.qname_wire == b"\x05nodeb\x08mydomain\x03tld\x00"
    assert (query.qtype, query.qclass) == (1, 1)
    assert query.edns is None
    assert query.question == query.qname_wire + b"\x00\x01\x00\x01" == wire[12:]
    assert query.name == "nodeb.mydomain.tld."


@pytest.mark.parametrize("payload", [0, 100, 512, 1232, 1400, 4096, 65535])
@pytest.mark.parametrize("do", [False, True])
def test_decode_edns_payload_and_do(payload: int, do: bool) -> None:
    wire = make_wire(edns=0, payload=payload, do=do)
    query = decode_query(wire)
    assert query.edns == Edns(udp_size=payload, version=0, do=do, options=b"")
    assert query.question == question_of(wire)
    assert query.qtype == 1


def test_decode_edns_options_and_flags() -> None:
    wire = make_wire(rdtype="AAAA", cd=True, rd=False, options=[dns.edns.GenericOption(3, b"")])
    query = decode_query(wire)
    assert query.edns is not None and query.edns.options == b"\x00\x03\x00\x00"
    assert query.flags & CD and not query.flags & RD
    assert query.qtype == 28


def test_decode_edns_version_is_reported_not_rejected() -> None:
    wire = with_header(make_wire() + opt_record(version=1), ar=1)
    query = decode_query(wire)
    assert query.edns is not None and query.edns.version == 1


def test_decode_keeps_mixed_case() -> None:
    wire = make_wire("NoDeB.MyDoMaIn.TLD", "TXT")
    query = decode_query(wire)
    assert query.qname_wire == b"\x05NoDeB\x08MyDoMaIn\x03TLD\x00"
    assert query.question == wire[12:]
    assert query.name == "nodeb.mydomain.tld."
    assert query.qtype == 16


def test_decode_root_name_and_other_class() -> None:
    message = dns.message.make_query(".", "NS", rdclass=dns.rdataclass.CH)
    query = decode_query(message.to_wire())
    assert query.qname_wire == b"\x00"
    assert (query.qtype, query.qclass) == (2, 3)
    assert query.name == "."


def test_decode_skips_records_in_answer_and_authority() -> None:
    """A query carrying records (e.g. a known-answer list) still decodes; OPT is found behind them."""
    message = dns.message.make_query("a.test", "A", use_edns=0, payload=4096, want_dnssec=True)
    message.answer.append(dns.rrset.from_text("a.test.", 60, "IN", "A", "192.0.2.1"))
    message.authority.append(dns.rrset.from_text("test.", 60, "IN", "NS", "ns.a.test."))
    query = decode_query(message.to_wire())
    assert query.edns == Edns(4096, 0, True, b"")
    assert query.qname_wire == b"\x01a\x04test\x00"


# ---------------------------------------------------------------- decode_query: errors


@pytest.mark.parametrize("size", range(12))
def test_drop_shorter_than_header(size: int) -> None:
    with pytest.raises(Drop):
        decode_query(make_wire()[:size])


def test_drop_responses() -> None:
    query = dns.message.make_query("nodeb.mydomain.tld", "A")
    response = dns.message.make_response(query)
    with pytest.raises(Drop):
        decode_query(response.to_wire())
    with pytest.raises(Drop):  # QR=1 wins over everything else, even a bad opcode
        decode_query(with_header(make_wire(), flags=QR | (5 << 11), qd=0))


def test_notimp_for_notify() -> None:
    message = dns.message.make_query("mydomain.tld", "SOA")
    message.set_opcode(dns.opcode.NOTIFY)
    message.id = 77
    with pytest.raises(NotImplementedOpcode) as info:
        decode_query(message.to_wire())
    assert info.value.msg_id == 77
    assert (info.value.flags >> 11) & 0xF == dns.opcode.NOTIFY
    assert info.value.edns is None


def test_notimp_for_update_with_edns() -> None:
    update = dns.update.UpdateMessage("mydomain.tld")
    update.use_edns(0, dns.flags.DO, 1400)
    update.add("host", 60, "A", "192.0.2.7")
    update.id = 4321
    with pytest.raises(NotImplementedOpcode) as info:
        decode_query(update.to_wire())
    assert info.value.msg_id == 4321
    assert (info.value.flags >> 11) & 0xF == dns.opcode.UPDATE
    assert info.value.edns is not None
    assert (info.value.edns.udp_size, info.value.edns.do) == (1400, True)
    # The edge's answer: NOTIMP, ID and opcode echoed, QR set.
    reply = dns.message.from_wire(encode_error(info.value.msg_id, info.value.flags, NOTIMP))
    assert reply.id == 4321 and reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == dns.opcode.UPDATE
    assert reply.flags & dns.flags.QR


@pytest.mark.parametrize("opcode", [1, 2, 3, 6, 15])
def test_notimp_for_other_opcodes(opcode: int) -> None:
    with pytest.raises(NotImplementedOpcode):
        decode_query(with_header(make_wire(), flags=RD | (opcode << 11)))


def _formerr(wire: bytes) -> FormatError:
    with pytest.raises(FormatError) as info:
        decode_query(wire)
    assert info.value.msg_id == HEADER.unpack_from(wire)[0]
    return info.value


def test_formerr_qdcount_zero() -> None:
    _formerr(HEADER.pack(0x0A0B, RD, 0, 0, 0, 0))
    _formerr(with_header(make_wire(), qd=0))


def test_formerr_qdcount_two() -> None:
    wire = make_wire("a.test")
    question = question_of(wire)
    error = _formerr(with_header(wire + question, qd=2))
    assert error.flags == RD


def test_formerr_truncated_question() -> None:
    wire = make_wire()
    for end in range(HEADER.size, len(wire)):
        _formerr(wire[:end])


def test_formerr_compression_pointer_in_question() -> None:
    _formerr(HEADER.pack(9, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01")
    # A pointer after a first label, pointing back to it.
    _formerr(HEADER.pack(9, 0, 1, 0, 0, 0) + b"\x01a\xc0\x0c" + b"\x00\x01\x00\x01")


@pytest.mark.parametrize("label_type", [0x40, 0x7F, 0x80, 0xBF])
def test_formerr_reserved_label_types(label_type: int) -> None:
    _formerr(HEADER.pack(9, 0, 1, 0, 0, 0) + bytes([label_type]) + b"x" * 70 + b"\x00\x00\x01\x00\x01")


def test_formerr_label_over_63() -> None:
    _formerr(HEADER.pack(9, 0, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01")
    # 63 is fine.
    query = decode_query(HEADER.pack(9, 0, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01")
    assert len(query.qname_wire) == 65


def test_formerr_name_over_255() -> None:
    four = b"".join(b"\x3f" + bytes([c]) * 63 for c in b"abcd")  # 256 bytes + root = 257
    _formerr(HEADER.pack(9, 0, 1, 0, 0, 0) + four + b"\x00\x00\x01\x00\x01")
    # 255 exactly is fine: three 63-byte labels, one 61-byte label, root.
    name = b"".join(b"\x3f" + bytes([c]) * 63 for c in b"abc") + b"\x3d" + b"d" * 61 + b"\x00"
    assert len(name) == 255
    assert decode_query(HEADER.pack(9, 0, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01").qname_wire == name


def test_formerr_two_opt_records() -> None:
    wire = make_wire(edns=0)
    _formerr(with_header(wire + opt_record(), ar=2))


def test_formerr_opt_with_non_root_owner() -> None:
    _formerr(with_header(make_wire() + opt_record(owner=b"\x01a\x00"), ar=1))
    _formerr(with_header(make_wire() + opt_record(owner=b"\xc0\x0c"), ar=1))


@pytest.mark.parametrize("field", ["an", "ns", "ar"])
def test_formerr_counts_beyond_the_message(field: str) -> None:
    _formerr(with_header(make_wire(), **{field: 1}))
    _formerr(with_header(make_wire(edns=0), **{field: 0xFFFF}))


def test_formerr_record_data_past_the_end() -> None:
    wire = make_wire() + b"\x00" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02"
    _formerr(with_header(wire, ar=1))


# ---------------------------------------------------------------- encode_reply


def reply_for(query: Query, reply: Reply | None = None, limit: int = 65535, ra: bool = False) -> bytes:
    return encode_reply(query, reply or plain_reply(), limit, ra)


@pytest.mark.parametrize("rd", [False, True])
@pytest.mark.parametrize("cd", [False, True])
def test_encode_echoes_id_rd_cd(rd: bool, cd: bool) -> None:
    query = decoded(msg_id=0xCAFE, rd=rd, cd=cd)
    wire = reply_for(query)
    msg_id, flags, qd, an, ns, ar = HEADER.unpack(wire[:12])
    assert msg_id == 0xCAFE
    assert flags & QR
    assert bool(flags & RD) == rd and bool(flags & CD) == cd
    assert flags & 0x7800 == 0  # opcode QUERY
    assert (qd, an, ns, ar) == (1, 0, 0, 0)


@pytest.mark.parametrize("authoritative", [False, True])
@pytest.mark.parametrize("ra", [False, True])
def test_encode_aa_and_ra_as_told(authoritative: bool, ra: bool) -> None:
    wire = reply_for(decoded(), plain_reply(authoritative=authoritative), ra=ra)
    flags = HEADER.unpack_from(wire)[1]
    assert bool(flags & AA) == authoritative
    assert bool(flags & RA) == ra
    assert not flags & TC


def test_encode_keeps_question_bytes_and_case() -> None:
    query = decoded(name="NoDeB.MyDoMaIn.TLD")
    answer = [RR("nodeb.mydomain.tld.", QTYPE.A, rdata=A("100.64.0.2"), ttl=60)]
    wire = reply_for(query, plain_reply(answer=answer, authoritative=True))
    assert wire[12 : 12 + len(query.question)] == query.question
    message = dns.message.from_wire(wire)
    assert message.question[0].name.to_text() == "NoDeB.MyDoMaIn.TLD."
    # The answer's owner points at the question, so it carries the client's case too.
    assert message.answer[0].name.to_text() == "NoDeB.MyDoMaIn.TLD."
    assert [r.to_text() for r in message.answer[0]] == ["100.64.0.2"]
    assert message.answer[0].ttl == 60


def test_encode_opt_only_when_asked() -> None:
    plain = dns.message.from_wire(reply_for(decoded()))
    assert plain.edns == -1 and plain.opt is None
    assert HEADER.unpack_from(reply_for(decoded()))[5] == 0
    with_edns = reply_for(decoded(edns=0))
    assert HEADER.unpack_from(with_edns)[5] == 1
    assert dns.message.from_wire(with_edns).edns == 0


@pytest.mark.parametrize("do", [False, True])
@pytest.mark.parametrize("client_payload", [512, 1232, 4096])
def test_encode_echoes_do_and_advertises_1232(do: bool, client_payload: int) -> None:
    wire = reply_for(decoded(edns=0, do=do, payload=client_payload))
    payload, ext_rcode, flags, options = parse_opt(wire)
    assert payload == 1232
    assert ext_rcode == 0
    assert bool(flags & EDNS_DO) == do
    assert flags & 0x7FFF == 0  # the other "Z" bits are zero (RFC 6891 §6.1.4)
    assert options == b""
    message = dns.message.from_wire(wire)
    assert message.payload == 1232
    assert bool(message.ednsflags & dns.flags.DO) == do


def test_encode_extended_dns_error() -> None:
    reply = Reply(SERVFAIL, "t", Outcome.FAILED, "t", ede=(18, "prohibited by policy"))
    wire = reply_for(decoded(edns=0), reply)
    _payload, _ext, _flags, options = parse_opt(wire)
    text = b"prohibited by policy"
    assert options == struct.pack("!HHH", 15, 2 + len(text), 18) + text  # RFC 8914 §2
    message = dns.message.from_wire(wire)
    assert message.rcode() == dns.rcode.SERVFAIL
    (ede,) = message.options
    assert ede.otype == dns.edns.OptionType.EDE
    assert isinstance(ede, dns.edns.EDEOption)
    assert ede.code == 18 and ede.text == "prohibited by policy"


def test_encode_extended_dns_error_without_text_and_without_edns() -> None:
    reply = Reply(SERVFAIL, "t", Outcome.FAILED, "t", ede=(0, ""))
    _payload, _ext, _flags, options = parse_opt(reply_for(decoded(edns=0), reply))
    assert options == struct.pack("!HHH", 15, 2, 0)
    # No OPT in the query: no OPT, hence no EDE, in the reply (RFC 6891 §7).
    message = dns.message.from_wire(reply_for(decoded(), reply))
    assert message.opt is None and message.rcode() == dns.rcode.SERVFAIL


def test_encode_badvers_splits_the_rcode() -> None:
    reply = Reply(BADVERS, "edge", Outcome.OTHER, "badvers")
    wire = reply_for(decoded(edns=0, do=True), reply)
    flags = HEADER.unpack_from(wire)[1]
    assert flags & 0xF == 0  # lower 4 bits in the header
    _payload, ext_rcode, opt_flags, _options = parse_opt(wire)
    assert ext_rcode == 1  # upper 8 bits in the OPT TTL (RFC 6891 §6.1.3)
    assert opt_flags & EDNS_DO
    message = dns.message.from_wire(wire)
    assert message.rcode() == dns.rcode.BADVERS
    assert message.edns == 0  # we answer with the version we implement


@pytest.mark.parametrize("rcode", [NOERROR, FORMERR, SERVFAIL, 3, NOTIMP, 5])
def test_encode_classic_rcodes_need_no_extension(rcode: int) -> None:
    wire = reply_for(decoded(edns=0), Reply(rcode, "t", Outcome.OTHER, "t"))
    assert HEADER.unpack_from(wire)[1] & 0xF == rcode
    assert parse_opt(wire)[1] == 0


def test_encode_truncates_without_edns() -> None:
    query = decoded(name="Big.Test", rdtype="TXT")
    reply = plain_reply(answer=txt_records("big.test.", 40), authoritative=True)
    full = reply_for(query, reply, limit=65535)
    assert len(full) > 512 and HEADER.unpack_from(full)[3] == 40
    limit = udp_limit(query)
    assert limit == 512
    wire = reply_for(query, reply, limit=limit)
    assert len(wire) <= 512
    _msg_id, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    assert flags & TC and flags & QR and flags & AA
    assert (qd, an, ns, ar) == (1, 0, 0, 0)
    assert wire[12:] == query.question  # the question, byte for byte, and nothing else
    message = dns.message.from_wire(wire)
    assert message.flags & dns.flags.TC and message.question[0].name.to_text() == "Big.Test."


def test_encode_truncates_with_edns_and_keeps_opt() -> None:
    query = decoded(name="big.test", rdtype="TXT", edns=0, payload=4096, do=True)
    assert udp_limit(query) == 1232
    reply = plain_reply(
        answer=txt_records("big.test.", 40), authority=txt_records("big.test.", 2), additional=[]
    )
    wire = reply_for(query, reply, limit=udp_limit(query))
    assert len(wire) <= 1232
    _id, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    assert flags & TC
    assert (qd, an, ns, ar) == (1, 0, 0, 1)
    assert wire[12 : 12 + len(query.question)] == query.question
    payload, _ext, opt_flags, _options = parse_opt(wire)
    assert payload == 1232 and opt_flags & EDNS_DO
    message = dns.message.from_wire(wire)
    assert not message.answer and not message.authority and message.edns == 0


def test_encode_truncation_boundary() -> None:
    """A reply of exactly ``limit`` bytes is sent whole; one byte more is truncated."""
    query = decoded(name="big.test", rdtype="TXT", edns=0)
    reply = plain_reply(answer=txt_records("big.test.", 5), ede=(0, "note"))
    full = reply_for(query, reply, limit=65535)
    assert reply_for(query, reply, limit=len(full)) == full
    cut = reply_for(query, reply, limit=len(full) - 1)
    assert HEADER.unpack_from(cut)[1] & TC and HEADER.unpack_from(cut)[3] == 0
    # The EDE survives truncation along with the OPT.
    (ede,) = dns.message.from_wire(cut).options
    assert ede.text == "note"


@pytest.mark.parametrize(
    ("client", "max_payload", "limit"),
    [
        (None, 1232, 512),
        (0, 1232, 512),
        (100, 1232, 512),
        (511, 1232, 512),
        (512, 1232, 512),
        (1000, 1232, 1000),
        (1232, 1232, 1232),
        (1233, 1232, 1232),
        (4096, 1232, 1232),
        (65535, 1232, 1232),
        (4096, 4096, 4096),
        (4096, 1400, 1400),
    ],
)
def test_udp_limit(client: int | None, max_payload: int, limit: int) -> None:
    query = decoded() if client is None else decoded(edns=0, payload=client)
    assert udp_limit(query, max_payload) == limit
    if max_payload == 1232:
        assert udp_limit(query) == limit


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        (b"\x00", "."),
        (b"\x01a\x00", "a."),
        (b"\x05NoDeB\x08mydomain\x03tld\x00", "NoDeB.mydomain.tld."),
        (b"\x03a.b\x00", "a\\.b."),
        (b"\x03a\\b\x00", "a\\\\b."),
        (b'\x07"();@$ \x00', '\\"\\(\\)\\;\\@\\$\\032.'),
        (b"\x04\x00\x7f\xff\x09\x00", "\\000\\127\\255\\009."),
        (b"\x01*\x04_tcp\x00", "*._tcp."),
        (b"\x05a-b_c\x00", "a-b_c."),
    ],
)
def test_name_text_examples(wire: bytes, text: str) -> None:
    assert name_to_text(wire) == text
    assert text_to_name(text) == wire
    assert name_to_text(wire) == dns.name.from_wire(wire, 0)[0].to_text()


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("", b"\x00"),
        ("a.b", b"\x01a\x01b\x00"),
        ("a.b.", b"\x01a\x01b\x00"),
        ("\\065\\066", b"\x02AB\x00"),
        ("a\\.b.c", b"\x03a.b\x01c\x00"),
    ],
)
def test_text_to_name_forms(text: str, wire: bytes) -> None:
    assert text_to_name(text) == wire


@pytest.mark.parametrize(
    "text",
    [
        "a..b",
        ".a",
        "x" * 64 + ".test",
        ".".join(["x" * 63] * 4),
        "a\\999",
        # A dangling escape at the end of the text is malformed too: callers (config
        # validation, `horizon-dns explain`) catch ValueError, so it must be one.
        "a\\",
    ],
)
def test_text_to_name_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        text_to_name(text)


def _labels_fit(labels: list[bytes]) -> bool:
    return sum(len(label) + 1 for label in labels) + 1 <= 255


label_lists = st.lists(st.binary(min_size=1, max_size=63), max_size=8).filter(_labels_fit)


def _wire(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


@PROPERTY
@given(labels=label_lists)
def test_name_round_trip(labels: list[bytes]) -> None:
    wire = _wire(labels)
    text = name_to_text(wire)
    assert text.isascii() and text.endswith(".")
    assert text_to_name(text) == wire
    # dnspython implements the same RFC 1035 §5.1 presentation format.
    assert text == dns.name.from_wire(wire, 0)[0].to_text()
    assert text_to_name(dns.name.Name([*labels, b""]).to_text()) == wire


@PROPERTY
@given(labels=st.lists(st.binary(min_size=60, max_size=63), min_size=3, max_size=5))
def test_name_round_trip_near_255(labels: list[bytes]) -> None:
    wire = _wire(labels)
    if len(wire) > 255:
        with pytest.raises(ValueError):
            text_to_name(name_to_text(wire))
    else:
        assert text_to_name(name_to_text(wire)) == wire


# ---------------------------------------------------------------- properties of decode/encode


header_then_bytes = st.builds(
    lambda header, tail: HEADER.pack(*header) + tail,
    st.tuples(
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF).map(lambda f: f & ~QR),
        st.sampled_from([0, 1, 1, 1, 2, 0xFFFF]),
        st.sampled_from([0, 0, 1, 2, 0xFFFF]),
        st.sampled_from([0, 0, 1, 0xFFFF]),
        st.sampled_from([0, 1, 1, 2, 0xFFFF]),
    ),
    st.binary(max_size=300),
)


@PROPERTY
@given(data=st.one_of(st.binary(max_size=600), header_then_bytes))
def test_decode_raises_only_its_three_exceptions(data: bytes) -> None:
    try:
        query = decode_query(data)
    except (Drop, NotImplementedOpcode, FormatError) as exc:
        if isinstance(exc, Drop):
            assert len(data) < 12 or data[2] & 0x80
        else:
            assert exc.msg_id == struct.unpack_from("!H", data)[0]
        return
    assert query.msg_id == struct.unpack_from("!H", data)[0]
    assert data[12 : 12 + len(query.question)] == query.question
    assert query.question.startswith(query.qname_wire)
    assert len(query.qname_wire) <= 255
    assert name_to_text(query.qname_wire)  # every decoded name has a presentation form


names_from_regex = st.from_regex(r"[A-Za-z0-9_-]{1,20}(\.[A-Za-z0-9_-]{1,20}){0,4}\.?", fullmatch=True)
names_from_labels = label_lists.filter(bool).map(lambda labels: dns.name.Name([*labels, b""]))


@PROPERTY
@given(
    name=st.one_of(names_from_regex.map(dns.name.from_text), names_from_labels),
    qtype=st.integers(1, 65535),
    msg_id=st.integers(0, 0xFFFF),
    edns=st.booleans(),
    payload=st.integers(0, 65535),
    do=st.booleans(),
    cd=st.booleans(),
    rd=st.booleans(),
)
def test_decode_then_encode_random_queries(
    name: dns.name.Name,
    qtype: int,
    msg_id: int,
    edns: bool,
    payload: int,
    do: bool,
    cd: bool,
    rd: bool,
) -> None:
    assume(len(name.to_wire()) <= 255)
    message = dns.message.make_query(name, qtype, use_edns=0 if edns else False, payload=payload)
    if edns and do:
        message.want_dnssec(True)
    message.id = msg_id
    message.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    wire = message.to_wire()

    query = decode_query(wire)
    assert query.msg_id == msg_id
    assert query.qname_wire == name.to_wire()
    assert (query.qtype, query.qclass) == (qtype, 1)
    assert query.question == wire[12 : 12 + len(name.to_wire()) + 4]
    if edns:
        assert query.edns == Edns(payload, 0, do, b"")
    else:
        assert query.edns is None
    assert query.name == name_to_text(name.to_wire().lower())

    reply_wire = encode_reply(query, Reply(NOERROR, "t", Outcome.ANSWER, "t"), udp_limit(query), False)
    reply = dns.message.from_wire(reply_wire)
    assert reply.id == msg_id
    assert reply.flags & dns.flags.QR
    assert bool(reply.flags & dns.flags.RD) == rd and bool(reply.flags & dns.flags.CD) == cd
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.question) == 1
    (question,) = reply.question
    assert question.name == name and question.name.to_wire() == name.to_wire()  # case kept too
    assert (question.rdtype, question.rdclass) == (qtype, 1)
    assert reply_wire[12 : 12 + len(query.question)] == query.question
    assert (reply.edns == 0) == edns
    if edns:
        assert reply.payload == 1232 and bool(reply.ednsflags & dns.flags.DO) == do
    assert message.is_response(reply)
