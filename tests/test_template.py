"""The template stage, table-driven through the real pipeline (no sockets)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dnslib import QTYPE
from helpers import config_from, make_query
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon_dns.core.encode import as_records
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.pattern import bounded_by_shape, compile_pattern
from horizon_dns.core.pipeline import Pipeline
from horizon_dns.core.wire import NOERROR, NXDOMAIN, REFUSED, SERVFAIL
from horizon_dns.errors import ConfigError
from horizon_dns.stages.template import TemplateStage

RULES = r"""
aliases:
  hub: nodec
zones:
  example.:
    stages:
      - template:
          name: ip
          type: [A]
          match: ['^ip-(?P<a>\d+)-(?P<b>\d+)-(?P<c>\d+)-(?P<d>\d+)\.example\.$']
          answer: ['{{ name }} 60 IN A {{ group.a }}.{{ group.b }}.{{ group.c }}.{{ group.d }}']
          example: ip-10-95-12-8.example
      - template:
          name: full
          type: [A]
          match: ['^full\.example\.$']
          answer: ['{{ name }} 30 IN A 192.0.2.1']
          additional: ['ns.example. 30 IN A 192.0.2.53']
          authority: ['example. 30 IN NS ns.example.']
      - template:
          name: gone
          match: ['^gone\.example\.$']
          rcode: NXDOMAIN
          authority: ['example. 60 IN SOA ns.example. hostmaster.example. 7 3600 600 86400 45']
      - template:
          name: gone-auto
          match: ['^gone2\.example\.$']
          rcode: NXDOMAIN
      - template:
          name: broken
          type: [A]
          match: ['^broken-(?P<x>[a-z]+)\.example\.$']
          answer: ['{{ name }} 60 IN A {{ group.x }}']
      - template:
          name: client
          type: [TXT]
          match: ['^whoami\.example\.$']
          answer: ['{{ name }} 0 IN TXT "{{ client }}"']
      - template:
          name: chaos
          class: CH
          type: [TXT]
          match: ['^version\.example\.$']
          answer: ['{{ name }} 0 CH TXT "horizon"']
      - template:
          name: cname
          type: [A, AAAA]
          match: ['^(?P<p>[^.]+)\.(?P<h>[^.]+)\.example\.$']
          answer: ['{{ name }} 60 IN CNAME {{ group.h | alias }}.example.']
      - template:
          name: loop
          type: [A]
          match: ['^loop(?P<n>[12])\.example\.$']
          answer: ["{{ name }} 60 IN CNAME loop{{ '2' if group.n == '1' else '1' }}.example."]
      - template:
          name: hosts
          type: [A]
          match: ['^(?P<h>node[a-z])\.example\.$']
          when: group.h != 'nodez'
          answer: ['{{ name }} 60 IN A 100.64.0.7']
      - template:
          name: fallback
          type: [A]
          answer: ['{{ name }} 5 IN A 192.0.2.99']
  strict.test:
    stages:
      - template:
          name: strict
          type: [A]
          match: ['^s\d+\.strict\.test\.$']
          answer: ['{{ name }} 60 IN A 192.0.2.2']
          fallthrough: false
      - template:
          name: never
          answer: ['{{ name }} 60 IN A 192.0.2.3']
  refused.test:
    stages:
      - template:
          name: deny
          rcode: REFUSED
"""


@dataclass
class Case:
    name: str
    qtype: str = "A"
    rcode: int = NOERROR
    answer: list[str] = field(default_factory=list)
    authority: list[str] = field(default_factory=list)
    additional: list[str] = field(default_factory=list)
    stage: str | None = None
    outcome: Outcome | None = None
    qclass: int = 1


CASES = [
    Case("ip-10-95-12-8.example.", answer=["ip-10-95-12-8.example. 60 IN A 10.95.12.8"], stage="template:ip"),
    Case(
        "full.example.",
        answer=["full.example. 30 IN A 192.0.2.1"],
        authority=["example. 30 IN NS ns.example."],
        additional=["ns.example. 30 IN A 192.0.2.53"],
    ),
    Case(
        "gone.example.",
        rcode=NXDOMAIN,
        authority=["example. 60 IN SOA ns.example. hostmaster.example. 7 3600 600 86400 45"],
        outcome=Outcome.NXDOMAIN,
    ),
    # Without authority lines the zone's SOA goes in, for negative caching (RFC 2308 §3).
    Case(
        "gone2.example.",
        qtype="AAAA",
        rcode=NXDOMAIN,
        authority=["example. 30 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 30"],
    ),
    Case("anything.refused.test.", qtype="MX", rcode=REFUSED, stage="template:deny", outcome=Outcome.REFUSED),
    Case("whoami.example.", qtype="TXT", answer=['whoami.example. 0 IN TXT "198.51.100.7"']),
    # Alias map: grafana.hub -> nodec; then the CNAME target is chased to an A record.
    Case(
        "grafana.hub.example.",
        answer=["grafana.hub.example. 60 IN CNAME nodec.example.", "nodec.example. 60 IN A 100.64.0.7"],
    ),
    Case(
        "www.nodeb.example.",
        answer=["www.nodeb.example. 60 IN CNAME nodeb.example.", "nodeb.example. 60 IN A 100.64.0.7"],
    ),
    # `when` false: counts as no match, the next template answers.
    Case("nodez.example.", answer=["nodez.example. 5 IN A 192.0.2.99"], stage="template:fallback"),
    # No regex matched, fallthrough (default) -> next stage answers.
    Case("unmatched.example.", answer=["unmatched.example. 5 IN A 192.0.2.99"], stage="template:fallback"),
    # Class mismatch passes on; the CH template answers CH.
    Case("version.example.", qtype="TXT", qclass=3, answer=['version.example. 0 CH TXT "horizon"']),
    # A CNAME chain that loops is SERVFAIL, not an endless chase.
    Case("loop1.example.", rcode=SERVFAIL, stage="template:loop", outcome=Outcome.FAILED),
    # A rendered line that is not a record -> SERVFAIL.
    Case("broken-abc.example.", rcode=SERVFAIL, stage="template:broken", outcome=Outcome.FAILED),
]


def _text(records: list) -> list[str]:  # type: ignore[type-arg]
    return [" ".join(rr.toZone().split()) for rr in records]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return config_from(tmp_path_factory.mktemp("tpl"), RULES).pipeline()


def resolve(pipeline: Pipeline, query: Query) -> Reply:
    """The pipeline's reply in record form, whichever form the stage chose."""
    return as_records(query, asyncio.run(pipeline.resolve(query))[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}{c.qtype}")
def test_template_table(pipeline: Pipeline, case: Case) -> None:
    reply = resolve(pipeline, make_query(case.name, case.qtype, case.qclass, client="198.51.100.7"))
    assert reply.rcode == case.rcode, reply
    assert _text(reply.answer) == [" ".join(x.split()) for x in case.answer]
    assert _text(reply.authority) == [" ".join(x.split()) for x in case.authority]
    assert _text(reply.additional) == [" ".join(x.split()) for x in case.additional]
    if case.stage:
        assert reply.stage == case.stage
    if case.outcome:
        assert reply.outcome is case.outcome


def test_no_match_without_fallthrough_is_servfail(pipeline: Pipeline) -> None:
    reply = resolve(pipeline, make_query("other.strict.test."))
    assert reply.rcode == SERVFAIL and reply.stage == "template:strict"
    stage = next(s for s in pipeline.stages if s.name == "template:strict")
    assert isinstance(stage, TemplateStage)
    called = []

    async def next_(query: Query) -> Reply:
        called.append(query)
        return Reply(NOERROR, "next", Outcome.ANSWER, "next")

    reply = asyncio.run(stage.handle(make_query("other.strict.test."), next_))
    assert reply.rcode == SERVFAIL and reply.reason == "template:strict:no-match"
    assert called == []
    reply = asyncio.run(stage.handle(make_query("s1.strict.test."), next_))
    assert reply.rcode == NOERROR and called == []


def test_type_mismatch_passes_on_and_ends_in_nodata(pipeline: Pipeline) -> None:
    # nodeb matches `hosts` (A only); for MX nothing answers, but the name exists:
    # NODATA with the zone SOA, never NXDOMAIN or SERVFAIL (RFC 2308 §2.2).
    reply = resolve(pipeline, make_query("nodeb.example.", "MX"))
    assert reply.rcode == NOERROR and reply.answer == []
    assert reply.outcome is Outcome.NODATA
    assert [rr.rtype for rr in reply.authority] == [QTYPE.SOA]


def test_stage_mismatch_calls_next_exactly_once(pipeline: Pipeline) -> None:
    stage = next(s for s in pipeline.stages if s.name == "template:ip")
    seen: list[str] = []

    async def next_(query: Query) -> Reply:
        seen.append(query.name)
        return Reply(NXDOMAIN, "next", Outcome.NXDOMAIN, "next")

    reply = asyncio.run(stage.handle(make_query("ip-1-2-3-4.example.", "TXT"), next_))
    assert seen == ["ip-1-2-3-4.example."] and reply.stage == "next"
    seen.clear()
    reply = asyncio.run(stage.handle(make_query("ip-1-2-3-4.example.", "A", qclass=3), next_))
    assert seen == ["ip-1-2-3-4.example."]


def test_bad_record_is_logged_and_counted(pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    handler = QueryHandler(pipeline)
    query = make_query("broken-xyz.example.")
    with caplog.at_level(logging.WARNING, logger="horizon_dns.stages.template"):
        wire = asyncio.run(handler.answer(query))
    assert wire[3] & 0xF == SERVFAIL
    assert handler.replies[("template:broken", "failed", "template:broken:bad-record")] == 1
    assert "is not a valid record" in caplog.text


def test_question_case_is_matched_lowercase(pipeline: Pipeline) -> None:
    reply = resolve(pipeline, make_query("IP-10-1-2-3.ExAmPlE."))
    # Matched lowercase; the owner points to the question, so it reads in the client's case.
    assert _text(reply.answer) == ["IP-10-1-2-3.ExAmPlE. 60 IN A 10.1.2.3"]


# Properties -------------------------------------------------------------------

octet = st.integers(0, 255)


@settings(max_examples=200, deadline=None)
@given(a=octet, b=octet, c=octet, d=octet)
def test_ip_template_renders_the_address_in_the_name(
    pipeline: Pipeline, a: int, b: int, c: int, d: int
) -> None:
    reply = resolve(pipeline, make_query(f"ip-{a}-{b}-{c}-{d}.example."))
    assert [str(rr.rdata) for rr in reply.answer] == [f"{a}.{b}.{c}.{d}"]


label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@settings(max_examples=200, deadline=None)
@given(prefix=label, host=label)
def test_cname_target_is_alias_or_host(pipeline: Pipeline, prefix: str, host: str) -> None:
    if prefix.startswith("ip-") or host in ("refused",):
        return
    reply = resolve(pipeline, make_query(f"{prefix}.{host}.example."))
    first = reply.answer[0]
    assert first.rtype == QTYPE.CNAME
    expected = "nodec" if host == "hub" else host
    assert str(first.rdata.label) == f"{expected}.example."


any_name = st.lists(st.binary(min_size=1, max_size=20), min_size=0, max_size=6).map(
    lambda labels: b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
)


@settings(max_examples=300, deadline=None)
@given(wire=any_name, qtype=st.integers(0, 65535), qclass=st.sampled_from([1, 3, 4, 254, 255, 42]))
def test_every_stage_returns_a_reply_for_any_query(
    pipeline: Pipeline, wire: bytes, qtype: int, qclass: int
) -> None:
    query = Query(
        1, 0x0100, wire, qtype, qclass, question=wire + qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big")
    )
    reply, _zone = asyncio.run(pipeline.resolve(query))
    assert isinstance(reply, Reply)
    assert 0 <= reply.rcode < 4096


def test_template_compiles_with_tmp_path(tmp_path: Path) -> None:
    """A `when` expression and the alias filter work from a freshly loaded config."""
    config = config_from(
        tmp_path,
        r"""
        aliases: {printer: laserjet}
        zones:
          lan.:
            stages:
              - template:
                  match: ['^(?P<h>[^.]+)\.lan\.$']
                  when: group.h in alias
                  answer: ['{{ name }} 60 IN CNAME {{ group.h | alias }}.lan.']
        """,
    )
    reply = resolve(config.pipeline(), make_query("printer.lan.", "CNAME"))
    assert _text(reply.answer) == ["printer.lan. 60 IN CNAME laserjet.lan."]


# Names a host name cannot be, and regexes that never finish ---------------------------


@pytest.mark.parametrize(
    ("name", "owner_labels"),
    [
        ("www\\.nodeb.example.", [b"www.nodeb", b"example"]),  # two labels, not www.nodeb.example.
        ("x.a\\;b.example.", [b"x", b"a;b", b"example"]),
        ('x.a\\"b.example.', [b"x", b'a"b', b"example"]),
        ("x.\\(.example.", [b"x", b"(", b"example"]),
        ("x.a\\000b.example.", [b"x", b"a\x00b", b"example"]),
    ],
)
def test_escaped_octets_keep_label_boundaries_and_never_reach_a_rendered_line(
    pipeline: Pipeline, name: str, owner_labels: list[bytes]
) -> None:
    """RFC 2181 §11: a label may hold any octet; RFC 1035 §5.1 escapes must not turn into structure.

    The cname template (``^(?P<p>[^.]+)\\.(?P<h>[^.]+)\\.example\\.$``, rendering group h)
    must neither see ``www\\.nodeb`` as two labels nor render ``a;b`` into its line; the
    catch-all template behind it answers with the query's own name as owner.
    """
    reply = resolve(pipeline, make_query(name))
    assert reply.stage == "template:fallback", reply
    assert [list(rr.rname.label) for rr in reply.answer] == [owner_labels]
    assert [str(rr.rdata) for rr in reply.answer] == ["192.0.2.99"]


RUNAWAY = r"""
zones:
  t.test:
    stages:
      - template:
          name: runaway
          match: ['^(a|aa)+$']
          answer: ['{{ name }} 60 IN A 192.0.2.1']
"""


def test_a_catastrophic_regex_is_an_error_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, RUNAWAY)
    issue = next(i for i in info.value.issues if "backtracks catastrophically" in i.message)
    assert issue.line == 7 and issue.file.endswith("10-test.yaml") and "(a|aa)+" in str(issue.hint)


def test_a_regex_that_runs_away_on_a_query_costs_that_query_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Had the load-time probe missed it: the match is cut off and answered SERVFAIL."""
    monkeypatch.setattr("horizon_dns.stages.template.builder.runaway_on", lambda _pattern: None)
    handler = QueryHandler(config_from(tmp_path, RUNAWAY).pipeline())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="horizon_dns.stages.template"):
        wire = asyncio.run(handler.answer(make_query("a" * 40 + ".t.test.")))
    assert wire[3] & 0xF == SERVFAIL
    assert time.monotonic() - started < 1.0  # unbounded, this takes minutes
    assert handler.replies[("template:runaway", "failed", "template:runaway:regex-timeout")] == 1
    assert "took over 10 ms" in caplog.text
    # The same name again fails from the stage's memory, without another 10 ms search.
    stage = next(s for s in handler.pipeline.stages if isinstance(s, TemplateStage))
    searched = []
    monkeypatch.setattr("horizon_dns.stages.template.stage.search", lambda *args: searched.append(args))
    wire = asyncio.run(handler.answer(make_query("a" * 40 + ".t.test.")))
    assert wire[3] & 0xF == SERVFAIL and searched == [] and stage.regex_timeouts == 2


def test_ra_is_the_servers_so_a_template_zone_carries_it_beside_a_forwarder(tmp_path: Path) -> None:
    """RFC 1035 §4.1.1: RA tells whether the server recurses; dig warns when it is missing."""
    rules = r"""
    zones:
      mydomain.tld:
        stages:
          - template: {type: [A], answer: ['{{ name }} 60 IN A 100.64.0.1']}
      .:
        stages:
          - forward: {upstreams: ["127.0.0.1:9"]}
    """
    handler = QueryHandler(config_from(tmp_path, rules).pipeline())
    wire = asyncio.run(handler.answer(make_query("nodeb.mydomain.tld.")))
    assert wire[3] & 0x80, "RA clear on the template zone's answer"
    (tmp_path / "alone").mkdir()
    alone = QueryHandler(config_from(tmp_path / "alone", RULES).pipeline())
    wire = asyncio.run(alone.answer(make_query("ip-10-1-2-3.example.")))
    assert not wire[3] & 0x80, "no forwarder anywhere: no recursion to offer"


def test_the_zone_soa_answers_at_the_apex_when_no_stage_does(pipeline: Pipeline) -> None:
    reply = resolve(pipeline, make_query("Example.", "SOA"))
    assert reply.rcode == NOERROR and reply.authoritative
    assert _text(reply.answer) == ["example. 30 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 30"]
    # Only at the apex: below it an SOA query is NODATA, the SOA in authority.
    below = resolve(pipeline, make_query("zzz.example.", "SOA"))
    assert below.rcode == NOERROR and below.answer == [] and below.outcome is Outcome.NODATA


def test_an_unknown_filter_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    rules = """
    zones:
      t.test:
        stages:
          - template:
              answer: ['{{ name | nosuchfilter }} 60 IN A 192.0.2.1']
          - template:
              name: w
              when: "name | nofilter"
              answer: ['{{ name }} 60 IN A 192.0.2.1']
    """
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, rules)
    found = {(i.line, i.message) for i in info.value.issues}
    assert (6, "template error: No filter named 'nosuchfilter'.") in found
    assert (9, "expression error: No filter named 'nofilter'.") in found


def test_a_negative_answer_carries_the_soa_with_the_negative_ttl(tmp_path: Path) -> None:
    """RFC 2308 §3: the SOA's TTL in NXDOMAIN/NODATA is min(SOA TTL, MINIMUM)."""
    rules = """
    zones:
      soa.test:
        soa: {ttl: 300, minimum: 10}
        stages:
          - template: {match: ['^known[.]'], type: [A], answer: ['{{ name }} 60 IN A 192.0.2.1']}
          - template: {name: gone, match: ['^other[.]'], rcode: NXDOMAIN}
    """
    pipeline = config_from(tmp_path, rules).pipeline()
    for name, qtype in (("known.soa.test.", "MX"), ("other.soa.test.", "A")):
        reply = resolve(pipeline, make_query(name, qtype))
        assert reply.outcome in (Outcome.NODATA, Outcome.NXDOMAIN), reply
        assert [rr.ttl for rr in reply.authority] == [10], reply


@pytest.mark.parametrize(
    ("source", "bounded"),
    [
        (".*", True),
        (r"^(?P<p>.+)\.(?P<h>[^.]+)\.(?P<d>mydomain\.tld)\.$", True),  # the shipped rules
        (r"^(foo|bar)\.x\.$", True),
        (r"^(a+)+$", False),  # repetition in repetition
        (r"^(a|aa)+$", False),  # alternation in repetition
        (r".*.*x", False),  # unanchored: n starts times n**2
        (r"^.*.*.*x", False),  # three long repetitions: n**3
        (r"(\w)\1", False),  # backreference
        (r"^(?=a).*", False),  # lookaround
        ("^" + "(?:a|.)" * 24 + "b", False),  # alternations in a row: 2**24 splits
        ("^" + "a?" * 24 + "a" * 24 + "$", False),  # optional parts in a row
        ("^" + "a{0,16}" * 6 + "b", False),  # short repetitions in a row
        ("(?>(?:a+)+b)", False),  # inside an atomic group
        (r"^(?P<h>node[a-z])\.example\.$", True),
    ],
)
def test_a_regex_runs_on_re_only_when_its_shape_bounds_its_time(source: str, bounded: bool) -> None:
    assert bounded_by_shape(source) is bounded
    assert isinstance(compile_pattern(source), re.Pattern) is bounded


def test_private_regex_parser_shape() -> None:
    """bounded_by_shape reads re's private parser (no public one exists): pin the shape
    it relies on, so a Python release that changes it fails here, not silently."""
    from re import _parser  # type: ignore[attr-defined]

    tree = list(_parser.parse(r"^(a|b)+c"))
    ops = [op for op, _av in tree]
    assert ops == [_parser.AT, _parser.MAX_REPEAT, _parser.LITERAL]
    assert tree[0][1] == _parser.AT_BEGINNING
    low, high, body = tree[1][1]
    assert (low, high) == (1, _parser.MAXREPEAT)
    assert [op for op, _av in body] == [_parser.SUBPATTERN]
    assert tree[2][1] == ord("c")
