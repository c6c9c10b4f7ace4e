"""Plain-Python template renderers give exactly what Jinja gives, or step aside."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from horizon_dns.core.message import Query
from horizon_dns.core.names import text_to_name
from horizon_dns.stages.template import TemplateStage, make_environment
from horizon_dns.stages.template.fast import compile_simple

ALIASES = {"hub": "nodec", "nas": "nodeb"}
ZONE = "mydomain.tld."
PATTERN = re.compile(r"^(?:(?P<p>[^.]+)\.)?(?P<h>[^.]+)\.(?P<d>mydomain\.tld)\.$")
REFERENCES = [
    "name",
    "zone",
    "type",
    "class",
    "client",
    "group.h",
    "group.p",  # optional: unmatched renders as ""
    "group['d']",
    "match[0]",
    "match[2]",
    "group.h | alias",
    "group.h|alias",
    "match[2] | alias",
]
LABEL = st.sampled_from(["hub", "nas", "nodeb", "www", "x-1", "a"])
LITERAL = st.text(st.characters(codec="ascii", exclude_characters="{}%#\r"), max_size=12)
PART = st.one_of(LITERAL, st.sampled_from(REFERENCES).map(lambda ref: "{{ " + ref + " }}"))


def _query(name: str, client: tuple[str, int] | None) -> Query:
    wire = text_to_name(name)
    return Query(0, 0, wire, 1, 1, question=wire + b"\x00\x01\x00\x01", client=client)


@given(
    st.lists(PART, min_size=1, max_size=8),
    st.lists(LABEL, min_size=1, max_size=2),
    st.sampled_from([None, ("100.64.0.9", 5353), ("fd7a:115c:a1e0::9", 53)]),
)
def test_simple_templates_render_as_jinja_does(
    parts: list[str], labels: list[str], client: tuple[str, int] | None
) -> None:
    env = make_environment(ALIASES)
    source = "".join(parts)
    query = _query(".".join(labels) + "." + ZONE, client)
    found = PATTERN.search(query.name)
    assert found is not None
    renderer = compile_simple(env.parse(source), env)
    assert renderer is not None, source
    stage = SimpleNamespace(zone=ZONE, aliases=ALIASES)
    variables = TemplateStage.variables(stage, query, found)  # type: ignore[arg-type]
    assert renderer(query, found, ZONE) == env.from_string(source).render(variables)


@pytest.mark.parametrize(
    "source",
    [
        "{% if group.h == 'hub' %}{{ name }} A 1.2.3.4{% endif %}",
        "{% for i in range(2) %}{{ name }}{% endfor %}",
        "{{ group.h | upper }}",
        "{{ alias['hub'] }}",
        "{{ group.items }}",  # Jinja takes the dict's method before the group
        "{{ match[-1] }}",
        "{{ 'text' }}",
        "{{ name ~ '.' }}",
    ],
)
def test_anything_else_stays_with_jinja(source: str) -> None:
    env = make_environment(ALIASES)
    assert compile_simple(env.parse(source), env) is None


def test_a_group_the_match_lacks_raises_like_jinja() -> None:
    env = make_environment(ALIASES)
    source = "{{ group.other }}"
    query = _query("www.nodeb." + ZONE, None)
    found = PATTERN.search(query.name)
    assert found is not None
    renderer = compile_simple(env.parse(source), env)
    assert renderer is not None
    with pytest.raises(IndexError):
        renderer(query, found, ZONE)
    stage = SimpleNamespace(zone=ZONE, aliases=ALIASES)
    with pytest.raises(Exception, match="other"):
        env.from_string(source).render(TemplateStage.variables(stage, query, found))  # type: ignore[arg-type]
