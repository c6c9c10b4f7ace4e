"""Compiling a template's parts: the Jinja environment, zone-file lines and ``when``.

Contract: ``make_environment(aliases)`` is the sandboxed environment every template
renders in; ``compile_lines`` and ``compile_when`` compile a section's sources and
report unknown variables and groups with file and line (returning empty
:class:`Lines` or None on error); ``parse_qtype``/``parse_qclass``/``parse_rcode``
read the mnemonics a rules file uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from dnslib import CLASS, QTYPE, RCODE
from yaml.nodes import Node

from horizon_dns.config.source import Section, Where, item_node
from horizon_dns.stages.template.fast import Renderer, compile_simple

ANY = 255
_VARIABLES = frozenset({"name", "zone", "type", "class", "group", "match", "client", "alias"})


def _alias_filter(aliases: dict[str, str]) -> Any:
    def alias(value: Any) -> str:
        text = str(value)
        return aliases.get(text, text)

    return alias


FILTERS_HINT = "filters are 'alias' and Jinja's built-ins (lower, upper, replace, default, join, ...)"


def make_environment(aliases: dict[str, str]) -> jinja2.Environment:
    """A sandboxed Jinja2 environment where any undefined name is an error."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["alias"] = _alias_filter(aliases)
    return env


@dataclass(slots=True)
class Lines:
    sources: list[str]
    templates: list[jinja2.Template]
    #: Per template, its plain-Python renderer when it is simple enough (fast.py).
    fast: list[Renderer | None] = field(default_factory=list)


def parse_qtype(text: str) -> int:
    upper = text.upper()
    if upper == "ANY":
        return ANY
    if upper.startswith("TYPE") and upper[4:].isdigit():
        return int(upper[4:])
    code = QTYPE.reverse.get(upper)
    if code is None:
        raise ValueError(f"unknown record type {text!r}")
    return int(code)


def parse_qclass(text: str) -> int:
    upper = text.upper()
    if upper == "ANY":
        return ANY
    code = CLASS.reverse.get(upper)
    if code is None:
        raise ValueError(f"unknown class {text!r}; use IN, CH or ANY")
    return int(code)


def parse_rcode(text: str) -> int:
    code = RCODE.reverse.get(str(text).upper())
    if code is None:
        raise ValueError(f"unknown rcode {text!r}; use NOERROR, NXDOMAIN, REFUSED, SERVFAIL")
    return int(code)


def compile_lines(
    section: Section, key: str, env: jinja2.Environment, groups: set[str], ngroups: int
) -> Lines:
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
            if not check_references(ast, item_where, item_node(node, i), groups, ngroups):
                continue
            templates.append(env.from_string(source))
        except jinja2.TemplateError as exc:  # an unknown filter or test surfaces at compile time
            item_where.error(item_node(node, i), f"template error: {exc.message or exc}", FILTERS_HINT)
            continue
        fast.append(compile_simple(ast, env))
    if len(templates) != len(sources):
        return Lines([], [])
    return Lines(sources, templates, fast)


def check_references(
    ast: jinja2.nodes.Template, where: Where, node: Node | None, groups: set[str], ngroups: int
) -> bool:
    """Report unknown variables and groups a template uses; True when all are known."""
    ok = True
    for variable in sorted(jinja2.meta.find_undeclared_variables(ast) - _VARIABLES):
        where.error(
            node, f"unknown template variable {variable!r}", f"available: {', '.join(sorted(_VARIABLES))}"
        )
        ok = False
    for ref in group_references(ast):
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


def compile_when(
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
        if not check_references(ast, where, node, groups, ngroups):
            return None
        expression = env.compile_expression(source)
    except jinja2.TemplateError as exc:  # an unknown filter or test surfaces at compile time
        where.error(node, f"expression error: {exc.message or exc}", FILTERS_HINT)
        return None
    # Remembered so the stage can tell whether its answers depend on the client.
    expression.uses_client = "client" in jinja2.meta.find_undeclared_variables(ast)  # type: ignore[attr-defined]
    return expression


def group_references(ast: jinja2.nodes.Template) -> list[str | int]:
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


def rendered_groups(env: jinja2.Environment, sources: list[str], when: str) -> frozenset[str | int] | None:
    """The groups the lines and ``when`` read by name or index; None if any reads them otherwise.

    ``{{ group.h }}`` and ``{{ match[1] }}`` are seen; ``{{ group | join }}`` is not.
    """
    refs: set[str | int] = set()
    for source in [*sources, "{{ " + when + " }}" if when else ""]:
        ast = env.parse(source)
        found = group_references(ast)
        uses = sum(1 for n in ast.find_all(jinja2.nodes.Name) if n.name in ("group", "match"))
        if uses != len(found):
            return None
        refs.update(found)
    return frozenset(refs)
