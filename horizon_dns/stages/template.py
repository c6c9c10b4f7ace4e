"""The ``template`` stage: answers rendered from regex matches over the query name.

CoreDNS's ``template`` plugin semantics, with the traps removed: every template
is compiled and test-rendered when the configuration loads, so a typo such as
``{{ grup.h }}`` is a ``check`` error with file and line, not a SERVFAIL at 3 a.m.

YAML (one template per stage; list several stages to try several templates)::

    - template:
        name: host-cname            # used in reasons/metrics: template:host-cname
        class: IN                   # or ANY; default IN
        type: [A, AAAA]             # qtypes answered; ANY matches every qtype; default ANY
        zones: [mydomain.tld]       # optional: only names under these (inside the stage's zone)
        match:                      # tried in order on the lowercased FQDN; first match wins
          - '^(?:[^.]+\\.)+(?P<h>[^.]+)\\.(?P<d>mydomain\\.tld)\\.$'
        answer:
          - '{{ name }} 60 IN CNAME {{ group.h | alias }}.{{ group.d }}.'
        additional: []              # zone-file lines, rendered the same way
        authority: []
        rcode: NOERROR              # NXDOMAIN, REFUSED, ...
        ttl: 60                     # TTL of rendered lines that give none
        fallthrough: true           # no regex matched -> next stage (false: SERVFAIL)
        when: group.h in alias      # optional Jinja expression: false counts as no match
        example: www.nodeb.mydomain.tld   # optional: must match and render valid records at load

Template language: sandboxed Jinja2 (conditionals, filters, lookups; no access to
Python internals). Variables: ``name`` (query name, lowercase, trailing dot),
``zone``, ``type``, ``class``, ``group`` (named groups), ``match`` (``match[0]`` the
whole match, ``match[1]``... numbered groups), ``client`` (client IP), ``alias``
(the rules' alias map). Filter ``alias``: ``x | alias`` is ``alias[x]`` when ``x``
is an alias, else ``x`` -- the seed's ``{{ if eq .Group.h "hub" }}...`` in one word.

Semantics: a class, type or ``zones`` mismatch passes the query on (a type
mismatch on a matching name marks the name as existing, so the chain ends in
NODATA rather than SERVFAIL). An empty NOERROR answer or an NXDOMAIN without
``authority`` lines carries the zone's SOA (RFC 2308 §3). A rendered line that is
not a valid record makes the reply SERVFAIL with reason
``template:NAME:bad-record`` and a log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from dnslib import CLASS, QTYPE, RCODE, RR, DNSBuffer, DNSLabel
from yaml.nodes import Node

from horizon_dns.config.source import Section, Where, as_bool, as_str, int_range, item_node
from horizon_dns.core.bounded import remember
from horizon_dns.core.edns import EDE_OTHER
from horizon_dns.core.encode import pack_reply
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.packed import Packed
from horizon_dns.core.pattern import (
    RUNAWAY_HINT,
    Match,
    Pattern,
    PatternError,
    PatternTimeout,
    compile_pattern,
    runaway_on,
    search,
)
from horizon_dns.core.stage import Next
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.stages.context import BuildContext
from horizon_dns.stages.template_fast import Renderer, compile_simple

log = logging.getLogger("horizon_dns.stages.template")

MAX_REGEX_LENGTH = 1024
MAX_RENDERED = 16384
_UNSEEN = object()


class _TimedOut(str):
    """A name's remembered PatternTimeout (its message): a fresh exception each time."""


_RR_CACHE_SIZE = 2048  # rendered texts kept parsed and packed; bounds memory under a flood of names
_VARIABLES = frozenset({"name", "zone", "type", "class", "group", "match", "client", "alias"})
ANY = 255


def _alias_filter(aliases: dict[str, str]) -> Any:
    def alias(value: Any) -> str:
        text = str(value)
        return aliases.get(text, text)

    return alias


_FILTERS_HINT = "filters are 'alias' and Jinja's built-ins (lower, upper, replace, default, join, ...)"


def make_environment(aliases: dict[str, str]) -> jinja2.Environment:
    """A sandboxed Jinja2 environment where any undefined name is an error."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["alias"] = _alias_filter(aliases)
    return env


@dataclass(slots=True)
class _Lines:
    sources: list[str]
    templates: list[jinja2.Template]
    #: Per template, its plain-Python renderer when it is simple enough (template_fast).
    fast: list[Renderer | None] = field(default_factory=list)


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
        answer: _Lines,
        additional: _Lines,
        authority: _Lines,
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
        if self.zones and not any(_in_zone(name, z) for z in self.zones):
            query.note("  name outside this template's zones -> next")
            return await next(query)
        # A label may hold any octet (RFC 2181 §11); the text form escapes the odd ones
        # (RFC 1035 §5.1). The regexes see each as \DDD, so a "." they see is always a
        # label boundary: www\.nodeb.example. is two labels, not www.nodeb.example.
        escaped = "\\" in name
        text = _DIGIT_ESCAPE_NEEDED.sub(_digit_escape, name) if escaped else name
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
        except _BadRecord as exc:
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
        lines: _Lines,
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
                raise _BadRecord(f"template {source!r} failed: {type(exc).__name__}: {exc}") from None
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
        owner = DNSLabel([label.lower() for label in _labels(query.qname_wire)])
        records: list[RR] = []
        for line in text.splitlines():
            fields = line.split(None, 1)
            if not fields:
                continue
            if fields[0] == query.name and len(fields) == 2:
                parsed = parse_zone_lines(f"{_STAND_IN} {fields[1]}", self.ttl)
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


class _BadRecord(Exception):
    pass


_STAND_IN = "horizon-dns-owner.invalid."  # RFC 6761 §6.4: .invalid is never a real name


def _labels(wire: bytes) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while wire[offset]:
        out.append(wire[offset + 1 : offset + 1 + wire[offset]])
        offset += 1 + wire[offset]
    return out


def parse_zone_lines(text: str, ttl: int) -> list[RR]:
    """Parse rendered zone-file text; raise _BadRecord with a readable reason."""
    if len(text) > MAX_RENDERED:
        raise _BadRecord(f"rendered text is {len(text)} characters, over {MAX_RENDERED}")
    if not text.strip():
        return []
    try:
        records = list(RR.fromZone(text, ttl=ttl))
    except Exception as exc:  # dnslib raises many types on bad text
        raise _BadRecord(f"{text.strip()!r} is not a valid record: {exc or type(exc).__name__}") from None
    if not records:
        raise _BadRecord(f"{text.strip()!r} is not a valid record")
    for rr in records:
        try:
            rr.pack(DNSBuffer())
        except Exception as exc:
            raise _BadRecord(f"{text.strip()!r} cannot be encoded: {exc}") from None
    return records


def _in_zone(name: str, zone: str) -> bool:
    return zone == "." or name == zone or name.endswith("." + zone)


# Building from configuration -------------------------------------------------


def _qtype(text: str) -> int:
    upper = text.upper()
    if upper == "ANY":
        return ANY
    if upper.startswith("TYPE") and upper[4:].isdigit():
        return int(upper[4:])
    code = QTYPE.reverse.get(upper)
    if code is None:
        raise ValueError(f"unknown record type {text!r}")
    return int(code)


def _qclass(text: str) -> int:
    upper = text.upper()
    if upper == "ANY":
        return ANY
    code = CLASS.reverse.get(upper)
    if code is None:
        raise ValueError(f"unknown class {text!r}; use IN, CH or ANY")
    return int(code)


def _rcode(text: str) -> int:
    code = RCODE.reverse.get(str(text).upper())
    if code is None:
        raise ValueError(f"unknown rcode {text!r}; use NOERROR, NXDOMAIN, REFUSED, SERVFAIL")
    return int(code)


def _compile_lines(
    section: Section, key: str, env: jinja2.Environment, groups: set[str], ngroups: int
) -> _Lines:
    sources = section.string_list(key, default=[])
    where = section.where.child(key)
    node = section.node_of(key)
    templates: list[jinja2.Template] = []
    fast: list[Renderer | None] = []
    for i, source in enumerate(sources):
        item_where = where.child(i)
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            item_where.error(
                item_node(node, i), f"template syntax error: {exc.message}", "check {{ }} and {% %} pairs"
            )
            continue
        try:
            if not _check_references(ast, item_where, item_node(node, i), groups, ngroups):
                continue
            templates.append(env.from_string(source))
        except jinja2.TemplateError as exc:  # an unknown filter or test surfaces at compile time
            item_where.error(item_node(node, i), f"template error: {exc.message or exc}", _FILTERS_HINT)
            continue
        fast.append(compile_simple(ast, env))
    if len(templates) != len(sources):
        return _Lines([], [])
    return _Lines(sources, templates, fast)


def _check_references(
    ast: jinja2.nodes.Template, where: Where, node: Node | None, groups: set[str], ngroups: int
) -> bool:
    """Report unknown variables and groups a template uses; True when all are known."""
    ok = True
    for variable in sorted(jinja2.meta.find_undeclared_variables(ast) - _VARIABLES):
        where.error(
            node, f"unknown template variable {variable!r}", f"available: {', '.join(sorted(_VARIABLES))}"
        )
        ok = False
    for ref in _group_references(ast):
        if isinstance(ref, str) and ref not in groups:
            hint = (
                f"named groups: {', '.join(sorted(groups))}" if groups else "the regexes have no named groups"
            )
            where.error(node, f"group {ref!r} is not a named group of any match regex", hint)
            ok = False
        elif isinstance(ref, int) and ref > ngroups:
            where.error(node, f"match[{ref}] but the regexes have at most {ngroups} groups")
            ok = False
    return ok


def _compile_when(
    section: Section, source: str, env: jinja2.Environment, groups: set[str], ngroups: int
) -> Callable[..., Any] | None:
    if not source:
        return None
    where, node = section.where.child("when"), section.node_of("when")
    try:
        ast = env.parse("{{ " + source + " }}")
    except jinja2.TemplateSyntaxError as exc:
        where.error(
            node,
            f"expression syntax error: {exc.message}",
            "write a Jinja expression such as: group.h in alias",
        )
        return None
    try:
        if not _check_references(ast, where, node, groups, ngroups):
            return None
        expression = env.compile_expression(source)
    except jinja2.TemplateError as exc:  # an unknown filter or test surfaces at compile time
        where.error(node, f"expression error: {exc.message or exc}", _FILTERS_HINT)
        return None
    # Remembered so the stage can tell whether its answers depend on the client.
    expression.uses_client = "client" in jinja2.meta.find_undeclared_variables(ast)  # type: ignore[attr-defined]
    return expression


def _group_references(ast: jinja2.nodes.Template) -> list[str | int]:
    """Group names and indexes a template reads: ``group.h``, ``group['h']``, ``match[1]``."""
    refs: list[str | int] = []
    for node in ast.find_all(jinja2.nodes.Getattr):
        if isinstance(node.node, jinja2.nodes.Name) and node.node.name == "group":
            refs.append(node.attr)
    for item in ast.find_all(jinja2.nodes.Getitem):
        target, arg = item.node, item.arg
        if not isinstance(target, jinja2.nodes.Name) or not isinstance(arg, jinja2.nodes.Const):
            continue
        if (target.name == "group" and isinstance(arg.value, str)) or (
            target.name == "match" and isinstance(arg.value, int)
        ):
            refs.append(arg.value)
    return refs


def build(section: Section, ctx: BuildContext) -> TemplateStage | None:
    """Read, compile and test-render one template; record every problem found."""
    errors_before = section.where.error_count()
    name = section.get("name", as_str, default=f"{ctx.zone.rstrip('.') or 'root'}#{ctx.index}")
    qclass = section.get("class", _qclass, default=1)
    qtypes: set[int] = set()
    for i, text in enumerate(section.string_list("type", default=["ANY"])):
        try:
            qtypes.add(_qtype(text))
        except ValueError as exc:
            section.where.child("type").child(i).error(section.node_of("type"), str(exc))
    zones = tuple(_zone_name(z) for z in section.string_list("zones", default=[]))
    for z in zones:
        if not _in_zone(z, ctx.zone):
            section.where.child("zones").error(
                section.node_of("zones"),
                f"{z} is outside the stage's zone {ctx.zone}",
                "a template only sees names of the zone it is listed under",
            )
    patterns: list[Pattern] = []
    match_where = section.where.child("match")
    for i, source in enumerate(section.string_list("match", default=[".*"])):
        if len(source) > MAX_REGEX_LENGTH:
            match_where.child(i).error(
                item_node(section.node_of("match"), i), f"regex longer than {MAX_REGEX_LENGTH} characters"
            )
            continue
        try:
            pattern = compile_pattern(source)
        except PatternError as exc:
            match_where.child(i).error(
                item_node(section.node_of("match"), i),
                f"invalid regex {source!r}: {exc}",
                "use Python syntax: named groups are (?P<name>...)",
            )
            continue
        runaway = runaway_on(pattern)
        if runaway is not None:
            match_where.child(i).error(
                item_node(section.node_of("match"), i), f"regex {source!r} {runaway}", RUNAWAY_HINT
            )
            continue
        patterns.append(pattern)
    groups = {g for p in patterns for g in p.groupindex}
    ngroups = max((p.groups for p in patterns), default=0)
    env = make_environment(ctx.aliases)
    answer = _compile_lines(section, "answer", env, groups, ngroups)
    additional = _compile_lines(section, "additional", env, groups, ngroups)
    authority = _compile_lines(section, "authority", env, groups, ngroups)
    when_source = section.get("when", as_str, default="")
    when = _compile_when(section, when_source, env, groups, ngroups)
    rcode = section.get("rcode", _rcode, default=NOERROR)
    ttl = section.get("ttl", int_range(0, 2**31 - 1), default=60)
    fallthrough = section.get("fallthrough", as_bool, default=True)
    example = section.get("example", as_str, default="")
    section.finish()
    if section.where.error_count() != errors_before:
        return None
    if not answer.sources and rcode == NOERROR and not authority.sources:
        section.where.error(
            section.node,
            "template has no answer, authority or rcode: it would answer every match with NODATA",
            "add answer: lines, or an rcode such as NXDOMAIN or REFUSED",
        )
        return None
    stage = TemplateStage(
        name,
        ctx.zone,
        qclass,
        frozenset(qtypes),
        zones,
        patterns,
        answer,
        additional,
        authority,
        rcode,
        ttl,
        fallthrough,
        ctx.aliases,
        ctx.soa,
        when,
    )
    lines = [*answer.sources, *additional.sources, *authority.sources]
    stage.rendered_groups = _rendered_groups(env, lines, when_source)
    _test_render(stage, section.where, section, example)
    return stage


def _rendered_groups(env: jinja2.Environment, sources: list[str], when: str) -> frozenset[str | int] | None:
    """The groups the lines and ``when`` read by name or index; None if any reads them otherwise.

    ``{{ group.h }}`` and ``{{ match[1] }}`` are seen; ``{{ group | join }}`` is not.
    """
    refs: set[str | int] = set()
    for source in [*sources, "{{ " + when + " }}" if when else ""]:
        ast = env.parse(source)
        found = _group_references(ast)
        uses = sum(1 for n in ast.find_all(jinja2.nodes.Name) if n.name in ("group", "match"))
        if uses != len(found):
            return None
        refs.update(found)
    return frozenset(refs)


# Every escape but \DDD (RFC 1035 §5.1), rewritten as \DDD for the regexes.
_DIGIT_ESCAPE_NEEDED = re.compile(r"\\([^0-9])")


def _digit_escape(escape: re.Match[str]) -> str:
    return f"\\{ord(escape.group(1)):03d}"


def _zone_name(text: str) -> str:
    text = text.lower()
    return text if text.endswith(".") else text + "."


_EXAMPLE_HINT = "add 'example: NAME' to test the template with a real name at load time"


def _test_render(stage: TemplateStage, where: Where, section: Section, example: str) -> None:
    """Render every line once at load time: against ``example`` or sample groups."""
    if example:
        name = _zone_name(example)
        found = stage.matches_name(name)
        if found is None:
            where.child("example").error(
                section.node_of("example"), f"example {name} matches no regex of this template"
            )
            return
    else:
        name = f"sample.{stage.zone}" if stage.zone != "." else "sample."
        found = None
    qtype = next((t for t in sorted(stage.qtypes) if t != ANY), int(QTYPE.A))
    query = Query(0, 0, b"\x00", qtype, stage.qclass if stage.qclass != ANY else 1, client=("127.0.0.1", 0))
    query._name = name
    if found is not None:
        variables = stage.variables(query, found)
    else:
        # Without an example every group renders as "0": a valid label, number and address byte.
        variables = stage.variables(query, re.match(".*", name))  # type: ignore[arg-type]
        variables["group"] = {g: "0" for p in stage.patterns for g in p.groupindex}
        variables["match"] = ["0"] * (1 + max((p.groups for p in stage.patterns), default=0))
    for key, lines in (
        ("answer", stage.answer),
        ("additional", stage.additional),
        ("authority", stage.authority),
    ):
        for i, (source, template) in enumerate(zip(lines.sources, lines.templates, strict=True)):
            item = where.child(key).child(i)
            node = item_node(section.node_of(key), i)
            try:
                text = template.render(variables)
            except Exception as exc:  # templates call methods: any exception may surface
                problem = f"template {source!r} fails to render: {type(exc).__name__}: {exc}"
                if example or isinstance(exc, jinja2.UndefinedError):
                    item.error(node, problem if not example else f"for example {name}: {problem}")
                else:
                    item.warn(node, f"with every group as '0': {problem}", _EXAMPLE_HINT)
                continue
            try:
                parse_zone_lines(text, stage.ttl)
            except _BadRecord as exc:
                if example:
                    item.error(node, f"for example {name}: {exc}")
                else:
                    item.warn(node, f"with every group as '0': {exc}", _EXAMPLE_HINT)
