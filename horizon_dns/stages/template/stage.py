"""The template stage at query time: match, render, pack, answer.

Contract: :class:`TemplateStage` answers a query whose name one of its regexes
matches with the records its templates render (packed once per rendered text),
passes every other query on, and turns a rendered line that is not a record into
SERVFAIL with reason ``template:NAME:bad-record``. The YAML it is built from is
documented in :mod:`horizon_dns.stages.template`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from dnslib import RR, DNSLabel

from horizon_dns.core.bounded import remember
from horizon_dns.core.edns import EDE_OTHER
from horizon_dns.core.encode import pack_reply
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.packed import Packed
from horizon_dns.core.pattern import (
    Match,
    Pattern,
    PatternTimeout,
    search,
)
from horizon_dns.core.stage import Next
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.stages.template.compile import (
    ANY,
    Lines,
)
from horizon_dns.stages.template.records import (
    DIGIT_ESCAPE_NEEDED,
    STAND_IN,
    BadRecord,
    digit_escape,
    in_zone,
    labels,
    parse_zone_lines,
)

log = logging.getLogger("horizon_dns.stages.template")

_UNSEEN = object()


class _TimedOut(str):
    """A name's remembered PatternTimeout (its message): a fresh exception each time."""


_RR_CACHE_SIZE = 2048  # rendered texts kept parsed and packed; bounds memory under a flood of names


class TemplateStage:
    """Answers queries whose name matches one of its regexes, from rendered lines."""

    recurses = False

    def __init__(
        self,
        name: str,
        zone: str,
        qclass: int,
        qtypes: frozenset[int],
        zones: tuple[str, ...],
        patterns: list[Pattern],
        answer: Lines,
        additional: Lines,
        authority: Lines,
        rcode: int,
        ttl: int,
        fallthrough: bool,
        aliases: dict[str, str],
        soa: RR | None,
        when: Callable[..., Any] | None = None,
    ) -> None:
        self.name = f"template:{name}"
        self.zone = zone
        self.qclass = qclass
        self.qtypes = qtypes
        self.zones = zones
        self.patterns = patterns
        self.answer = answer
        self.additional = additional
        self.authority = authority
        self.rcode = rcode
        self.ttl = ttl
        self.fallthrough = fallthrough
        self.aliases = aliases
        self.soa = soa
        self.when = when
        # An answer rendered from the client's address must not be cached for others.
        self.uses_client = getattr(when, "uses_client", False) or any(
            "client" in jinja2.meta.find_undeclared_variables(t.environment.parse(src))
            for lines in (answer, additional, authority)
            for src, t in zip(lines.sources, lines.templates, strict=True)
        )
        self.bad_records = 0
        self.regex_timeouts = 0
        #: Groups the lines and ``when`` read (names, indexes); None: not known statically.
        self.rendered_groups: frozenset[str | int] | None = None
        self._rr_cache: dict[str, list[RR]] = {}
        self._matched: dict[str, Match | object | None] = {}
        self._packed_cache: dict[tuple[bytes | str, ...], Packed] = {}
        # Every line renders without Jinja: the variables dict is never needed.
        self.all_fast = all(
            len(lines.fast) == len(lines.templates) and all(f is not None for f in lines.fast)
            for lines in (answer, additional, authority)
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def matches_name(self, name: str) -> Match | None:
        """The first regex's match on ``name``; raises PatternTimeout on a runaway regex.

        Remembered per name, a timeout too: a search on the timed engine costs 3-10 µs
        (up to 10 ms when it times out), a dict lookup well under one, and names repeat.
        """
        found = self._matched.get(name, _UNSEEN)
        if found is _UNSEEN:
            found = None
            try:
                for pattern in self.patterns:
                    found = search(pattern, name)
                    if found is not None:
                        break
            except PatternTimeout as exc:
                found = _TimedOut(exc)  # asked again, the name fails at once: no 10 ms each time
            remember(self._matched, name, found, _RR_CACHE_SIZE)
        if isinstance(found, _TimedOut):
            raise PatternTimeout(found)
        return found  # type: ignore[return-value]

    async def handle(self, query: Query, next: Next) -> Reply:
        if self.qclass != ANY and query.qclass != self.qclass:
            query.note(f"  class {query.class_name} not handled -> next")
            return await next(query)
        name = query.name
        if self.zones and not any(in_zone(name, z) for z in self.zones):
            query.note("  name outside this template's zones -> next")
            return await next(query)
        # A label may hold any octet (RFC 2181 §11); the text form escapes the odd ones
        # (RFC 1035 §5.1). The regexes see each as \DDD, so a "." they see is always a
        # label boundary: www\.nodeb.example. is two labels, not www.nodeb.example.
        escaped = "\\" in name
        text = DIGIT_ESCAPE_NEEDED.sub(digit_escape, name) if escaped else name
        try:
            found = self.matches_name(text)
        except PatternTimeout as exc:
            self.regex_timeouts += 1
            if self.regex_timeouts & (self.regex_timeouts - 1) == 0:  # 1, 2, 4, ...: no log flood
                log.warning(
                    "%s: %s on %s; answering SERVFAIL (%d so far)", self.name, exc, name, self.regex_timeouts
                )
            query.note(f"  {exc} -> SERVFAIL")
            return Reply(SERVFAIL, self.name, Outcome.FAILED, f"{self.name}:regex-timeout")
        if found is not None and escaped and self._renders_an_escape(found):
            # Rendered into a zone-file line, the escape would be read as structure
            # (a ';' starts a comment): this template cannot answer for such a label.
            query.note("  a group the template renders holds an escaped octet -> no match")
            found = None
        if found is not None and self.when is not None and not self._when(query, found):
            query.note("  regex matched but 'when' is false")
            found = None
        if ANY not in self.qtypes and query.qtype not in self.qtypes:
            if found is not None:
                query.name_exists = query.name_exists or self.name
            query.note(f"  type {query.type_name} not handled -> next")
            return await next(query)
        if found is None:
            if self.fallthrough:
                query.note("  no regex matched -> next (fallthrough)")
                return await next(query)
            query.note("  no regex matched, fallthrough off -> SERVFAIL")
            return Reply(SERVFAIL, self.name, Outcome.FAILED, f"{self.name}:no-match")
        if query.trace is not None:
            query.note(f"  matched {found.re.pattern!r} groups {found.groupdict()}")
        return self.render_reply(query, found)

    def _renders_an_escape(self, found: Match) -> bool:
        """Whether a group the lines or ``when`` read holds an escaped octet."""
        refs = self.rendered_groups
        if refs is None:  # read in a way we cannot see statically: every group counts
            values = [found.group(0), *found.groups()]
        else:
            named = found.groupdict()
            values = [
                named.get(r) if isinstance(r, str) else found.group(r)
                for r in refs
                if r in named or (isinstance(r, int) and r <= found.re.groups)
            ]
        return any(value is not None and "\\" in value for value in values)

    def _when(self, query: Query, found: Match) -> bool:
        assert self.when is not None
        try:
            return bool(self.when(self.variables(query, found)))
        except Exception as exc:  # templates call methods: any exception may surface
            log.warning("%s: 'when' failed: %s", self.name, exc)
            return False

    def variables(self, query: Query, found: Match) -> dict[str, Any]:
        groups = {k: (v if v is not None else "") for k, v in found.groupdict().items()}
        numbered = [found.group(0)] + [g if g is not None else "" for g in found.groups()]
        return {
            "name": query.name,
            "zone": self.zone,
            "type": query.type_name,
            "class": query.class_name,
            "group": groups,
            "match": numbered,
            "client": query.client[0] if query.client else "",
            "alias": self.aliases,
        }

    def render_reply(self, query: Query, found: Match) -> Reply:
        variables = None if self.all_fast else self.variables(query, found)
        texts: list[str] = []  # every rendered line, sections apart: what the reply's bytes follow from
        try:
            answer = self._render(self.answer, variables, query, found, texts)
            texts.append("\x00")
            additional = (
                self._render(self.additional, variables, query, found, texts)
                if self.additional.sources
                else []
            )
            texts.append("\x00")
            authority = (
                self._render(self.authority, variables, query, found, texts) if self.authority.sources else []
            )
        except BadRecord as exc:
            self.bad_records += 1
            log.warning("%s: %s", self.name, exc)
            query.note(f"  bad record: {exc}")
            return Reply(
                SERVFAIL,
                self.name,
                Outcome.FAILED,
                f"{self.name}:bad-record",
                ede=(EDE_OTHER, f"{self.name} rendered an invalid record"),
            )
        rcode = self.rcode
        if not self.authority.sources and not answer and rcode in (NOERROR, NXDOMAIN):
            authority = [self.soa] if self.soa is not None else []
        if rcode == NOERROR:
            outcome = Outcome.ANSWER if answer else Outcome.NODATA
        elif rcode == NXDOMAIN:
            outcome = Outcome.NXDOMAIN
        else:
            outcome = Outcome.REFUSED if rcode == 5 else Outcome.OTHER
        # The records as wire bytes, remembered per name and rendered records: the
        # same name rendering the same lines packs to the same bytes (RFC 1035
        # §4.1.4 pointers into the question depend only on the name, not its case).
        # The reply is those bytes alone: one representation, which every later TTL
        # rule rewrites (a second copy as records could disagree with it).
        key: tuple[bytes | str, ...] = (query.qname_wire.lower(), *texts)
        packed = self._packed_cache.get(key)
        if packed is None:
            records = Reply(
                rcode, self.name, outcome, self.name,
                answer=answer, additional=additional, authority=authority, authoritative=True,
            )  # fmt: skip
            packed = remember(self._packed_cache, key, pack_reply(query, records), _RR_CACHE_SIZE)
        return Reply(rcode, self.name, outcome, self.name, packed=packed, cacheable=not self.uses_client)

    def _render(
        self,
        lines: Lines,
        variables: dict[str, Any] | None,
        query: Query,
        found: Match,
        texts: list[str],
    ) -> list[RR]:
        records: list[RR] = []
        for source, template, fast in zip(lines.sources, lines.templates, lines.fast, strict=True):
            try:
                if fast is not None:
                    text = fast(query, found, self.zone)
                else:
                    assert variables is not None
                    text = template.render(variables)
            except Exception as exc:  # templates call methods: any exception may surface
                raise BadRecord(f"template {source!r} failed: {type(exc).__name__}: {exc}") from None
            texts.append(text)
            if query.trace is not None:
                query.note(f"  rendered {text!r}")
            if "\\" in query.name:
                records.extend(self._parse_escaped_owner(text, query))
            else:
                records.extend(self.parse_records(text))
        return records

    def _parse_escaped_owner(self, text: str, query: Query) -> list[RR]:
        """Records for a query name that needs escapes (a dot, a quote, a byte >= 0x80 in a label).

        A label may hold any octet (RFC 2181 §11), but dnslib's zone parser reads
        ``\\.`` as a label break and punycodes high bytes. So a line whose owner is
        the query's name is parsed with a stand-in owner, which is then replaced by the
        query's own wire labels: the answer is for the name asked (RFC 1034 §4.3.2).
        """
        owner = DNSLabel([label.lower() for label in labels(query.qname_wire)])
        records: list[RR] = []
        for line in text.splitlines():
            fields = line.split(None, 1)
            if not fields:
                continue
            if fields[0] == query.name and len(fields) == 2:
                parsed = parse_zone_lines(f"{STAND_IN} {fields[1]}", self.ttl)
                for rr in parsed:
                    rr.rname = owner
                records.extend(parsed)
            else:
                records.extend(parse_zone_lines(line, self.ttl))
        return records

    def parse_records(self, text: str) -> list[RR]:
        """Zone-file text to records, memoised (dnslib's parser costs ~95 µs a line)."""
        cached = self._rr_cache.get(text)
        if cached is not None:
            return cached
        records = parse_zone_lines(text, self.ttl)
        return remember(self._rr_cache, text, records, _RR_CACHE_SIZE)
