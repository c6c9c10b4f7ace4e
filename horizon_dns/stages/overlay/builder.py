"""Building an overlay stage from its YAML section.

Contract: ``build(section, ctx)`` reads and checks one ``overlay`` section and returns
the stage, not started, or None after recording every problem with file and line.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from horizon_dns.config.source import Section, as_str, int_range, item_node, number_range
from horizon_dns.core.pattern import (
    RUNAWAY_HINT,
    PatternError,
    compile_pattern,
    runaway_on,
)
from horizon_dns.net.oneshot import MulticastBudget
from horizon_dns.net.overlay import LlmnrLookup, Lookup, MdnsLookup, PeerLookup
from horizon_dns.stages.context import BuildContext
from horizon_dns.stages.overlay.stage import Network, OverlayStage, on_the_overlay

METHODS = ("mdns", "llmnr", "peers")


def build(section: Section, ctx: BuildContext) -> OverlayStage | None:
    from horizon_dns.net.interfaces import list_interfaces

    errors_before = section.where.error_count()
    name = "overlay:" + section.get("name", as_str, default=ctx.zone.rstrip(".") or "root")
    host_text = section.get("host", as_str, default="")
    host_pattern = None
    if host_text:
        try:
            host_pattern = compile_pattern(host_text)
            if "host" not in host_pattern.groupindex:
                section.where.child("host").error(
                    section.node_of("host"), "the regex needs a named group (?P<host>...)"
                )
            elif (runaway := runaway_on(host_pattern)) is not None:
                section.where.child("host").error(
                    section.node_of("host"), f"the regex {runaway}", RUNAWAY_HINT
                )
        except PatternError as exc:
            section.where.child("host").error(section.node_of("host"), f"invalid regex: {exc}")
    interfaces = tuple(section.string_list("interfaces", default=[]))
    peers = section.string_list("peers", default=[])
    for i, peer in enumerate(peers):
        try:
            ipaddress.ip_address(peer)
        except ValueError:
            section.where.child("peers").child(i).error(
                item_node(section.node_of("peers"), i), f"{peer!r} is not an IP address"
            )
    peers_file = section.get("peers_file", as_str, default="")
    peers_command = section.get("peers_command", as_str, default="")
    refresh = section.get("peers_refresh", number_range(1, 86400), default=60.0)
    has_peers = bool(peers or peers_file or peers_command)
    default_methods = ["mdns", "llmnr"] + (["peers"] if has_peers else [])
    methods = section.string_list("methods", default=default_methods)
    for i, method in enumerate(methods):
        if method not in METHODS:
            section.where.child("methods").child(i).error(
                item_node(section.node_of("methods"), i),
                f"unknown method {method!r}",
                "use mdns, llmnr, peers",
            )
    if "peers" in methods and not has_peers:
        section.where.child("methods").error(
            section.node_of("methods"), "method 'peers' needs peers, peers_file or peers_command"
        )
    prefer: list[Network] = []
    for i, text in enumerate(section.string_list("prefer", default=[])):
        try:
            prefer.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            section.where.child("prefer").child(i).error(
                item_node(section.node_of("prefer"), i), f"{text!r} is not a network such as 100.64.0.0/10"
            )
    timeout = section.get("timeout", number_range(0.01, 10), default=0.3)
    ttl = section.get("ttl", int_range(0, 86400), default=30)
    negative_ttl = section.get("negative_ttl", int_range(0, 86400), default=30)
    on_miss = section.get("on_miss", as_str, default="nxdomain")
    max_lookups = section.get("max_lookups", int_range(1, 100_000), default=256)
    switch_within = section.get("switch_within", number_range(3, 86400), default=10.0)
    multicast_rate = section.get("multicast_rate", number_range(1, 10_000), default=50.0)
    multicast_burst = section.get("multicast_burst", int_range(1, 100_000), default=100)
    if on_miss not in ("nxdomain", "next"):
        section.where.child("on_miss").error(
            section.node_of("on_miss"), f"unknown {on_miss!r}", "use nxdomain or next"
        )
    section.finish()
    if section.where.error_count() != errors_before:
        return None

    def listed() -> list[Any]:
        return on_the_overlay(list_interfaces(interfaces))

    if int(switch_within) - math.ceil(timeout) - 1 < 1:
        section.where.child("switch_within").error(
            section.node_of("switch_within"),
            f"switch_within {switch_within:g} s leaves no time to hold an answer with timeout {timeout:g} s",
            f"use at least {math.ceil(timeout) + 2} seconds",
        )
        return None

    lookups: dict[str, Lookup] = {}
    services: list[Any] = []
    # One budget for both multicast methods of this stage: a flood of unknown names
    # costs at most multicast_rate queries a second on the overlay.
    budget = MulticastBudget(multicast_rate, multicast_burst)
    for method in methods:
        if method == "mdns":
            lookups["mdns"] = MdnsLookup(listed, budget)
        elif method == "llmnr":
            lookups["llmnr"] = LlmnrLookup(listed, budget)
        elif method == "peers":
            peer_lookup = PeerLookup(peers, peers_file, peers_command, refresh)
            lookups["peers"], services = peer_lookup, [*services, peer_lookup]
    return OverlayStage(
        name, ctx.zone, lookups, host_pattern, prefer, timeout, ttl, negative_ttl, ctx.soa,
        services=services, on_miss=on_miss, max_lookups=max_lookups, switch_within=switch_within,
        budget=budget, interface_names=interfaces,
    )  # fmt: skip
