"""The ``overlay`` stage: ``host.mydomain.tld`` answered by asking the overlay for ``host``.

YAML::

    - overlay:
        name: lan
        host: '^(?P<host>[^.]+)\\.mydomain\\.tld\\.$'   # default: the one label left of the zone
        methods: [mdns, llmnr, peers]   # default: mdns and llmnr, plus peers when any are given
        interfaces: [zt0]               # multicast on these (default: every up, multicast one)
        peers: [100.64.0.2]             # unicast peers, for overlays without multicast
        peers_file: /etc/horizon-dns/peers      # one address a line, or JSON
        peers_command: tailscale status --json  # run every peers_refresh seconds
        peers_refresh: 60
        prefer: [100.64.0.0/10, "fd7a:115c:a1e0::/48"]   # these addresses first
        timeout: 0.3                    # seconds for a lookup, all methods at once
        ttl: 30                         # of answers (held to the switch bound below)
        negative_ttl: 30                # a host not found is not asked again for this long (likewise)
        switch_within: 10               # seconds: the horizon follows a host leaving or returning
        on_miss: nxdomain               # or next: a host nobody knows goes to the next stage
        max_lookups: 256                # distinct lookups in flight; beyond, SERVFAIL (final)
        multicast_rate: 50              # multicast queries per second at most (burst: multicast_burst)
        multicast_burst: 100

Contract: for A and AAAA of a name whose host label it can derive, the stage
asks every method concurrently for both IP versions and answers with the first
method's addresses of the asked version -- never link-local ones, which a client
elsewhere cannot use, and those inside ``prefer`` first. A host found only with
the other version gets NODATA (NOERROR + SOA), never NXDOMAIN (mixed answers
break musl). A host nobody knows gets NXDOMAIN, so a zone ``fallback`` can ask
public DNS instead. Results are cached per host and version (positive ``ttl``,
negative ``negative_ttl``) and identical lookups in flight are shared. Names it
cannot derive a host from, other classes and other types pass to the next stage
(other types on a known host end in NODATA).

The switch bound: every reply for a name this stage owns -- found, not found, and
whatever the zone's fallback answers in its place -- carries ``overlay_ttl`` =
``hold`` = ``switch_within`` - ceil(``timeout``) - 1 seconds (8 by default), and what
the stage remembers lives no longer, counting down (its records carry the time
left, never a fresh TTL). No layer keeps such a reply longer, no client is told a
longer TTL, nothing serves it stale; so a host that leaves silently or comes back is
noticed at the next lookup, at most ``hold`` + ``timeout`` after the change.
:meth:`OverlayStage.forget` drops the stage's memory at once when the horizon is
known to have moved (this node's link or address changed, an mDNS goodbye).

A local limit -- ``max_lookups`` lookups in flight, or the multicast budget spent --
is not a finding about the host: the reply is a final SERVFAIL with an Extended DNS
Error, which no zone fallback overrides (an inside name must not get the public
answer because this node was busy).
"""

from horizon_dns.stages.overlay.builder import build
from horizon_dns.stages.overlay.stage import UNASKED_TTL, OverlayStage, switch_hold, usable

__all__ = ["UNASKED_TTL", "OverlayStage", "build", "switch_hold", "usable"]
