"""Building a template stage from its YAML section, test-rendered at load time.

Contract: ``build(section, ctx)`` reads, compiles and test-renders one template
(against ``example`` or sample groups) and returns the stage, or None after
recording every problem with file and line.
"""

from __future__ import annotations

import re

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from dnslib import QTYPE

from horizon_dns.config.source import Section, Where, as_bool, as_str, int_range, item_node
from horizon_dns.core.message import Query
from horizon_dns.core.pattern import (
    RUNAWAY_HINT,
    Pattern,
    PatternError,
    compile_pattern,
    runaway_on,
)
from horizon_dns.core.wire import NOERROR
from horizon_dns.stages.context import BuildContext
from horizon_dns.stages.template.compile import (
    ANY,
    compile_lines,
    compile_when,
    make_environment,
    parse_qclass,
    parse_qtype,
    parse_rcode,
    rendered_groups,
)
from horizon_dns.stages.template.records import (
    BadRecord,
    in_zone,
    parse_zone_lines,
    zone_name,
)
from horizon_dns.stages.template.stage import TemplateStage

MAX_REGEX_LENGTH = 1024


def build(section: Section, ctx: BuildContext) -> TemplateStage | None:
    """Read, compile and test-render one template; record every problem found."""
    errors_before = section.where.error_count()
    name = section.get("name", as_str, default=f"{ctx.zone.rstrip('.') or 'root'}#{ctx.index}")
    qclass = section.get("class", parse_qclass, default=1)
    qtypes: set[int] = set()
    for i, text in enumerate(section.string_list("type", default=["ANY"])):
        try:
            qtypes.add(parse_qtype(text))
        except ValueError as exc:
            section.where.child("type").child(i).error(section.node_of("type"), str(exc))
    zones = tuple(zone_name(z) for z in section.string_list("zones", default=[]))
    for z in zones:
        if not in_zone(z, ctx.zone):
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
    answer = compile_lines(section, "answer", env, groups, ngroups)
    additional = compile_lines(section, "additional", env, groups, ngroups)
    authority = compile_lines(section, "authority", env, groups, ngroups)
    when_source = section.get("when", as_str, default="")
    when = compile_when(section, when_source, env, groups, ngroups)
    rcode = section.get("rcode", parse_rcode, default=NOERROR)
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
    stage.rendered_groups = rendered_groups(env, lines, when_source)
    test_render(stage, section.where, section, example)
    return stage


_EXAMPLE_HINT = "add 'example: NAME' to test the template with a real name at load time"


def test_render(stage: TemplateStage, where: Where, section: Section, example: str) -> None:
    """Render every line once at load time: against ``example`` or sample groups."""
    if example:
        name = zone_name(example)
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
            except BadRecord as exc:
                if example:
                    item.error(node, f"for example {name}: {exc}")
                else:
                    item.warn(node, f"with every group as '0': {exc}", _EXAMPLE_HINT)
