"""The overlay stage's logic with scripted lookups (no network)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from dnslib import AAAA, QTYPE, RR, A, DNSRecord
from helpers import FakeClock as Clock
from helpers import config_from, make_query

from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.net.overlay import IPAddress, PeerLookup, addresses_in, ask_interfaces, parse_peers
from horizon_dns.stages.overlay import UNASKED_TTL, OverlayStage, usable


class Scripted:
    """A lookup method with fixed answers per (host, version), an optional delay, and a call log."""

    def __init__(self, answers: dict[tuple[str, int], list[str]], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, version: int, timeout: float) -> list[IPAddress]:
        self.calls.append((host, version))
        if self.delay:
            # Like a real method: nothing found when the answer would come after the timeout.
            await asyncio.sleep(min(self.delay, timeout))
            if self.delay > timeout:
                return []
        return [ipaddress.ip_address(a) for a in self.answers.get((host, version), [])]


async def _next(query: Query) -> Reply:
    return Reply(NXDOMAIN, "next", Outcome.NXDOMAIN, "next")


def stage(methods: dict[str, Scripted], **kwargs: object) -> OverlayStage:
    return OverlayStage("overlay:t", "mydomain.tld.", methods, **kwargs)  # type: ignore[arg-type]


def resolve(st: OverlayStage, name: str, qtype: str = "A") -> Reply:
    return asyncio.run(st.handle(make_query(name, qtype), _next))


def addresses(reply: Reply) -> list[str]:
    return [str(rr.rdata) for rr in reply.answer]


NODEB = {("nodeb", 4): ["100.64.0.2"], ("nodeb", 6): ["fe80::2", "fd7a:115c:a1e0::2"]}


def test_first_method_with_an_answer_wins() -> None:
    slow, fast = Scripted(NODEB, delay=0.2), Scripted(NODEB)
    st = stage({"mdns": slow, "llmnr": fast})
    reply = resolve(st, "nodeb.mydomain.tld.")
    assert addresses(reply) == ["100.64.0.2"] and reply.reason == "overlay:t:llmnr"
    assert reply.authoritative and reply.outcome is Outcome.ANSWER


def test_link_local_is_never_returned_and_preferred_prefix_first() -> None:
    st = stage({"mdns": Scripted(NODEB)})
    assert addresses(resolve(st, "nodeb.mydomain.tld.", "AAAA")) == ["fd7a:115c:a1e0::2"]
    nets = [ipaddress.ip_network("100.64.0.0/10")]
    mixed = [ipaddress.ip_address(a) for a in ("192.168.1.5", "100.64.0.2", "169.254.1.1", "100.64.0.2")]
    assert [str(a) for a in usable(mixed, nets)] == ["100.64.0.2", "192.168.1.5"]


def test_v4_only_host_gets_nodata_for_aaaa_never_nxdomain() -> None:
    st = stage({"mdns": Scripted({("nodec", 4): ["100.64.0.3"]})}, soa=None)
    reply = resolve(st, "nodec.mydomain.tld.", "AAAA")
    assert reply.rcode == NOERROR and reply.outcome is Outcome.NODATA and not reply.answer


def test_unknown_host_is_nxdomain_and_negatively_cached() -> None:
    clock = Clock()
    method = Scripted({})
    st = stage({"mdns": method}, clock=clock, negative_ttl=30)
    assert resolve(st, "ghost.mydomain.tld.").rcode == NXDOMAIN
    calls = len(method.calls)
    assert resolve(st, "ghost.mydomain.tld.").rcode == NXDOMAIN
    assert len(method.calls) == calls  # from the negative cache
    clock.now += 31
    resolve(st, "ghost.mydomain.tld.")
    assert len(method.calls) > calls


def test_positive_answers_are_cached_for_ttl() -> None:
    clock = Clock()
    method = Scripted(NODEB)
    st = stage({"mdns": method}, clock=clock, ttl=30)
    resolve(st, "nodeb.mydomain.tld.")
    calls = len(method.calls)
    assert addresses(resolve(st, "nodeb.mydomain.tld.")) == ["100.64.0.2"]
    assert len(method.calls) == calls


def test_concurrent_lookups_for_one_host_coalesce() -> None:
    method = Scripted(NODEB, delay=0.05)
    st = stage({"mdns": method})

    async def many() -> list[Reply]:
        return await asyncio.gather(*(st.handle(make_query("nodeb.mydomain.tld."), _next) for _ in range(20)))

    replies = asyncio.run(many())
    assert all(addresses(r) == ["100.64.0.2"] for r in replies)
    assert sorted(method.calls) == [("nodeb", 4), ("nodeb", 6)]


def test_lookup_is_bounded_by_the_timeout() -> None:
    st = stage({"mdns": Scripted(NODEB, delay=5)}, timeout=0.1)

    async def timed() -> tuple[Reply, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await st.handle(make_query("nodeb.mydomain.tld."), _next)
        return reply, loop.time() - started

    reply, elapsed = asyncio.run(timed())
    assert reply.rcode == NXDOMAIN and elapsed < 0.3


@pytest.mark.parametrize("name", ["www.nodeb.mydomain.tld.", "mydomain.tld.", "bad_na$me.mydomain.tld."])
def test_names_without_a_host_label_pass_on(name: str) -> None:
    method = Scripted(NODEB)
    reply = resolve(stage({"mdns": method}), name)
    assert reply.stage == "next" and method.calls == []


def test_other_types_on_a_known_host_end_in_nodata_through_the_chain() -> None:
    method = Scripted(NODEB)
    st = stage({"mdns": method})
    query = make_query("nodeb.mydomain.tld.", "MX")
    asyncio.run(st.handle(query, _next))
    assert query.name_exists is None and method.calls == []  # other types never start a lookup
    resolve(st, "nodeb.mydomain.tld.")
    query = make_query("nodeb.mydomain.tld.", "MX")
    asyncio.run(st.handle(query, _next))
    assert query.name_exists == "overlay:t"


def test_on_miss_next_passes_unknown_hosts_on() -> None:
    st = stage({"mdns": Scripted({})}, on_miss="next")
    assert resolve(st, "ghost.mydomain.tld.").stage == "next"


def test_parse_peers_formats() -> None:
    tailscale = (
        '{"Self": {"TailscaleIPs": ["100.64.0.1"]},'
        ' "Peer": {"k1": {"TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"]}}}'
    )
    assert parse_peers(tailscale) == ["100.64.0.2", "fd7a:115c:a1e0::2"]
    # An offline peer cannot answer: it would only hold a fan-out slot for the timeout.
    offline = tailscale.replace(
        '"k1": {', '"k0": {"Online": false, "TailscaleIPs": ["100.64.0.9"]}, "k1": {"Online": true, '
    )
    assert parse_peers(offline) == ["100.64.0.2", "fd7a:115c:a1e0::2"]
    assert parse_peers('["100.64.0.3"]') == ["100.64.0.3"]
    assert parse_peers("# peers\n100.64.0.4\n100.64.0.5 laptop\n") == ["100.64.0.4", "100.64.0.5"]
    with pytest.raises(ValueError):
        parse_peers("not an address\n")


@pytest.mark.parametrize("command", ["sleep 30", "echo garbage", "false"])
def test_broken_peer_command_keeps_the_last_good_list(tmp_path: Path, command: str) -> None:
    good = tmp_path / "peers.sh"
    good.write_text("#!/bin/sh\necho 100.64.0.2\n")
    good.chmod(0o755)
    peers = PeerLookup(peers_command=str(good), command_timeout=0.3)

    async def scenario() -> None:
        await peers.reload()
        assert peers.peers == ["100.64.0.2"]
        peers.peers_command = command
        await peers.reload()

    asyncio.run(scenario())
    assert peers.peers == ["100.64.0.2"] and peers.refresh_errors == 1


def test_config_builds_methods_and_checks_them(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """
        zones:
          mydomain.tld:
            stages:
              - overlay: {peers: [100.64.0.2], prefer: [100.64.0.0/10], timeout: 0.2}
        """,
    )
    (st,) = config.zones[0].stages
    assert isinstance(st, OverlayStage) and list(st.methods) == ["mdns", "llmnr", "peers"]
    from horizon_dns.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from(
            tmp_path,
            """
            zones:
              mydomain.tld:
                stages:
                  - overlay: {methods: [mdns, carrier-pigeon, peers], prefer: [nonsense], host: '^x$'}
            """,
        )
    text = str(info.value)
    assert "unknown method 'carrier-pigeon'" in text and "needs peers" in text
    assert "'nonsense' is not a network" in text and "(?P<host>" in text


def test_answer_type_matches_query() -> None:
    reply = resolve(stage({"mdns": Scripted(NODEB)}), "nodeb.mydomain.tld.", "AAAA")
    assert [rr.rtype for rr in reply.answer] == [QTYPE.AAAA]


def test_lookups_in_flight_are_capped() -> None:
    method = Scripted({}, delay=0.05)
    st = stage({"mdns": method}, max_lookups=4)

    async def flood() -> list[Reply]:
        return await asyncio.gather(*(st.handle(make_query(f"h{i}.mydomain.tld."), _next) for i in range(20)))

    replies = asyncio.run(flood())
    # Two hosts (x 2 versions) really asked and not found; beyond the cap nothing is
    # known about the host, so the answer is a final SERVFAIL: a zone fallback must not
    # hand out the public answer because this node was busy (DECISIONS.md 1).
    assert [r.rcode for r in replies[:2]] == [NXDOMAIN, NXDOMAIN]
    limited = replies[2:]
    assert all(r.rcode == SERVFAIL and r.final and not r.cacheable for r in limited)
    assert all(r.ede is not None and "max_lookups" in r.ede[1] for r in limited)
    assert len(method.calls) == 4 and st.shed == 18 and st.replies["local-limit"] == 18


def test_addresses_in_takes_the_asked_owner_and_version_only() -> None:
    """An mDNS reply may carry records of the responder's other names (RFC 6762 §6)."""
    reply = DNSRecord.question("NodeB.local", "A").reply()
    reply.add_answer(RR("nodeb.LOCAL.", QTYPE.A, rdata=A("100.64.0.2")))
    reply.add_answer(RR("nodeb.local.", QTYPE.AAAA, rdata=AAAA("fd7a:115c:a1e0::2")))
    reply.add_ar(RR("printer.local.", QTYPE.A, rdata=A("100.64.0.22")))
    reply.add_ar(RR("nodeb.local.", QTYPE.A, rdata=A("192.168.1.2")))
    wire = reply.pack()
    assert [str(a) for a in addresses_in(wire, 4, "nodeb.local")] == ["100.64.0.2", "192.168.1.2"]
    assert [str(a) for a in addresses_in(wire, 6, "nodeb.local.")] == ["fd7a:115c:a1e0::2"]
    assert [str(a) for a in addresses_in(wire, 4, "printer.local")] == ["100.64.0.22"]
    assert addresses_in(b"garbage", 4, "nodeb.local") == []


class Unasked:
    """A method that could not ask anyone (its interface is down, it has no peers)."""

    async def __call__(self, host: str, version: int, timeout: float) -> None:
        return None


def test_a_miss_nobody_could_be_asked_about_is_kept_a_second_only() -> None:
    """Reported: with the overlay link down, misses were cached for negative_ttl, so the
    overlay answers came back that much later than the link."""
    clock = Clock()
    st = stage({"mdns": Unasked(), "llmnr": Unasked()}, clock=clock, negative_ttl=30)  # type: ignore[dict-item]
    assert resolve(st, "nodeb.mydomain.tld.").rcode == NXDOMAIN
    assert st.known[("nodeb", 4)].expires == clock.now + UNASKED_TTL
    # One method that did ask makes it a real finding, kept negative_ttl (within the switch bound).
    st = stage({"mdns": Unasked(), "llmnr": Scripted({})}, clock=clock, negative_ttl=5)  # type: ignore[dict-item]
    resolve(st, "nodeb.mydomain.tld.")
    assert st.known[("nodeb", 4)].expires == clock.now + 5


def test_no_interface_to_ask_is_nobody_asked() -> None:
    from horizon_dns.net.oneshot import MDNS, QueryPool
    from horizon_dns.net.overlay import mdns_asks

    assert asyncio.run(ask_interfaces(QueryPool(MDNS), "nodeb.local", 4, [], 0.1, mdns_asks)) is None
