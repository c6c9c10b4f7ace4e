"""The one TTL rule: every layer that bounds a reply's TTLs calls :func:`ttl_rule`.

Contract: ``ttl_rule(query, reply, low, high, negative_cap)`` returns the reply in
bytes form with every TTL rewritten once, as it is to be served and kept from then
on: a TTL with the high bit set reads 0 (RFC 2181 §8), every TTL is held to
[``low``, ``high``], and a negative answer's SOA TTL becomes its negative-caching
lifetime min(SOA TTL, SOA MINIMUM, ``negative_cap``) (RFC 2308 §5). A reply whose
name the overlay owns (``Reply.overlay_ttl``) is capped at that bound *above*
everything else -- a cache's ``min_ttl`` may not stretch it -- so the horizon
switches within its bound in every layer and in every client's cache.

TTLs only ever go down through the layers: each layer hands on what is left (the
overlay stage its remaining lifetime, the cache its entry's age), none resets them.
"""

from __future__ import annotations

from dataclasses import replace

from horizon_dns.core.encode import pack_reply
from horizon_dns.core.message import Query, Reply
from horizon_dns.core.packed import TTL_MAX, bounded_ttls


def ttl_rule(
    query: Query, reply: Reply, low: int = 0, high: int = TTL_MAX, negative_cap: int = TTL_MAX
) -> Reply:
    """``reply`` as bytes with its TTLs bounded (see the module); the same object when
    it is already bytes and nothing changes."""
    if reply.overlay_ttl is not None:
        high = min(high, reply.overlay_ttl)
        low = min(low, high)
        negative_cap = min(negative_cap, high)
    packed = pack_reply(query, reply)
    bounded = bounded_ttls(packed, low, high, negative_cap)
    if bounded is reply.packed:
        return reply
    return replace(reply, packed=bounded, answer=[], authority=[], additional=[])
