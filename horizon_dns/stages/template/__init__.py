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

from horizon_dns.stages.template.builder import build
from horizon_dns.stages.template.compile import make_environment
from horizon_dns.stages.template.stage import TemplateStage

__all__ = ["TemplateStage", "build", "make_environment"]
