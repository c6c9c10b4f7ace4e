"""Load the configuration: one server file plus every ``*.yaml`` of its rules folder.

Contract: ``load_config(path)`` reads, validates and builds everything -- zones,
stages, compiled regexes and templates -- without opening a socket, and returns a
:class:`Config`; or raises :class:`~horizon_dns.errors.ConfigError` listing every
problem found (file, line, key, what is wrong, a hint). ``path=None`` loads the
embedded default (``horizon_dns/default.yaml``), whose rules folder is ``rules/``
under the current directory and may be absent.

Merging: the server file's own ``aliases``/``zones`` come first, then each rules
file in lexical order. A zone named in several files gets their stages
concatenated in that order; an alias or a zone's ``soa`` defined twice is an error.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from dnslib import RR
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from horizon_dns.config.source import (
    Section,
    Where,
    as_bool,
    as_str,
    did_you_mean,
    int_range,
    line_of,
    number_range,
    parse_yaml,
    scalar_value,
)
from horizon_dns.core.access import LOOPBACK
from horizon_dns.core.address import split_host_port
from horizon_dns.core.encode import DEFAULT_UDP_PAYLOAD
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.names import MAX_LABEL, MAX_NAME_WIRE, text_to_name
from horizon_dns.core.pipeline import Pipeline, Zone
from horizon_dns.core.stage import Stage
from horizon_dns.core.wire import RCODE_NAMES
from horizon_dns.errors import ConfigError, ConfigIssue, Error
from horizon_dns.stages import REGISTRY, BuildContext

DEFAULT_LISTEN = ("127.0.0.1:5300", "[::1]:5300")
EMBEDDED = "<embedded default>"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    #: Client networks allowed to ask here (RFC 5358: never an open resolver).
    allow: tuple[str, ...] = LOOPBACK

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class LlmnrSettings:
    """The LLMNR responder's settings (server file key ``llmnr``)."""

    interfaces: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    devices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hostname: str = ""
    ttl: int = 30
    tcp: bool = True
    conflict_check: bool = True
    mdns_announce: bool = False


@dataclass(slots=True)
class Config:
    """A loaded, validated configuration with its stages built but not started."""

    listen: list[ListenAddress]
    udp_payload: int = DEFAULT_UDP_PAYLOAD
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 256
    tcp_max_inflight: int = 64
    tcp_per_client: int = 32
    max_inflight: int = 4096
    rate_qps: float = 1000.0
    rate_burst: int = 2000
    refuse_udp: str = "silence"
    workers: int = 1
    shutdown_timeout: float = 5.0
    aliases: dict[str, str] = field(default_factory=dict)
    zones: list[Zone] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)
    guard: LoopGuard = field(default_factory=LoopGuard)
    llmnr: LlmnrSettings | None = None
    metrics: ListenAddress | None = None  # None: no metrics listener
    query_log_sample: float | None = None  # None: no query log
    nsid: str = ""  # RFC 5001 identifier; "" answers no NSID
    watch: bool = True  # reload when a config or rules file changes
    path: Path | None = None  # the server file; None for the embedded default
    rules_dir: Path | None = None

    def pipeline(self) -> Pipeline:
        return Pipeline(self.zones, guard=self.guard)


def parse_listen(text: str) -> ListenAddress:
    """``127.0.0.1:5300``, ``[::1]:5300``; a bare address means port 53."""
    try:
        host, port = split_host_port(text, 53)
    except ValueError as exc:
        raise ValueError(f"{exc}; listen takes addresses such as 127.0.0.1:5300 or [::1]:5300") from None
    return ListenAddress(host, port)


class BadName(Error, ValueError):
    """A zone name that is not a domain name; ``hint`` says how to write it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


ZONE_NAME_HINT = "a zone name is labels of letters, digits, '-' and '_' joined by dots, e.g. mydomain.tld"
# Host name characters (RFC 952/1123) plus '_' (service labels such as _tcp) and
# '/' (RFC 2317 classless reverse zones such as 0/25.2.0.192.in-addr.arpa).
_ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_/.")


def zone_key(text: str) -> str:
    """Normalise a zone name; raise :class:`BadName` when it is not a domain name."""
    name = text.strip().lower()
    if name in ("", "."):
        return "."
    if not name.isascii():
        # DNS itself is 8-bit clean, but every resolver asks for the IDNA form
        # (RFC 5890), so a zone written in Unicode would never match a query.
        try:
            hint = f"zone names must be ASCII: write the IDNA form {name.encode('idna').decode('ascii')}"
        except UnicodeError:
            hint = "zone names must be ASCII: write the IDNA form (xn--...)"
        raise BadName("it is not ASCII", hint)
    bad = sorted(set(name) - _ZONE_CHARS)
    if bad:
        raise BadName(f"it contains {', '.join(repr(ch) for ch in bad)}", ZONE_NAME_HINT)
    if not name.endswith("."):
        name += "."
    labels = name[:-1].split(".")
    if "" in labels:
        raise BadName("it has an empty label", "remove the doubled, leading or trailing dot")
    for label in labels:
        if len(label) > MAX_LABEL:
            raise BadName(
                f"label {label[:20] + '...'!r} is {len(label)} octets long",
                f"a label holds at most {MAX_LABEL} octets (RFC 1035 §2.3.4)",
            )
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_WIRE:
        raise BadName("it is longer than 255 octets", "a name holds at most 255 octets (RFC 1035 §3.1)")
    return name


@dataclass(slots=True)
class _ZoneDraft:
    stages: list[tuple[Node, Where]] = field(default_factory=list)
    soa: RR | None = None
    soa_disabled: bool = False
    soa_where: str = ""
    fallback: tuple[str, frozenset[int], Where, Node | None] | None = None


DEFAULT_FALLBACK_RCODES = ("NXDOMAIN", "SERVFAIL", "REFUSED")
_FALLBACK_RCODES = {name: code for code, name in RCODE_NAMES.items() if name in DEFAULT_FALLBACK_RCODES}


class _Loader:
    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.aliases: dict[str, str] = {}
        self.alias_where: dict[str, str] = {}
        self.zones: dict[str, _ZoneDraft] = {}
        self.files: list[str] = []
        self.guard = LoopGuard()

    def read_file(self, path: Path, text: str | None = None) -> Section | None:
        file = _display(path)
        self.files.append(file)
        if text is None:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.issues.append(ConfigIssue(file, 0, "", f"cannot read: {exc}"))
                return None
        node = parse_yaml(text, file, self.issues)
        return Section(node, Where(file, self.issues))

    def read_rules_content(self, section: Section) -> None:
        """The ``aliases`` and ``zones`` keys shared by the server file and rules files."""
        aliases = section.section("aliases")
        for key in aliases.names():
            value = aliases.get(key, as_str, hint="an alias maps a name to a host name: hub: nodec")
            here = f"{aliases.where.file}:{aliases.line(key)}"
            if key.lower() in self.aliases:
                aliases.where.child(key).error(
                    aliases.items[key][0],
                    f"alias {key!r} is already defined at {self.alias_where[key.lower()]}",
                    "define each alias once",
                )
                continue
            if value is not None:
                self.aliases[key.lower()] = value
                self.alias_where[key.lower()] = here
        aliases.finish()
        zones = section.section("zones")
        for key in zones.names():
            where = zones.where.child(key)
            try:
                name = zone_key(key)
            except BadName as exc:
                where.error(zones.items[key][0], f"zone {key!r} is not a domain name: {exc}", exc.hint)
                zones.raw(key)
                continue
            self.read_zone(name, zones.section(key))
        zones.finish()

    def read_zone(self, name: str, zone: Section) -> None:
        draft = self.zones.setdefault(name, _ZoneDraft())
        if zone.has("soa"):
            here = f"{zone.where.file}:{zone.line('soa')}"
            if draft.soa is not None or draft.soa_disabled:
                zone.where.child("soa").error(
                    zone.node_of("soa"), f"soa of zone {name} is already set at {draft.soa_where}"
                )
                zone.raw("soa")
            else:
                draft.soa_where = here
                soa_node = zone.raw("soa")
                if isinstance(soa_node, ScalarNode) and scalar_value(soa_node) is False:
                    draft.soa_disabled = True
                else:
                    draft.soa = _read_soa(name, Section(soa_node, zone.where.child("soa")))
        if zone.has("fallback"):
            self.read_fallback(name, draft, zone)
        stages = zone.sequence("stages")
        if not zone.has("stages"):
            zone.where.error(zone.node, f"zone {name} has no stages", "add stages: [ - template: {...} ]")
        draft.stages.extend(stages)
        zone.finish()

    def read_fallback(self, name: str, draft: _ZoneDraft, zone: Section) -> None:
        section = zone.section("fallback", hint="write fallback: {zone: '.'} (rcodes optional)")
        if draft.fallback is not None:
            section.where.error(section.node, f"fallback of zone {name} is already set")
            return
        target = section.get("zone", as_str, hint="the zone whose stages answer instead, e.g. zone: '.'")
        rcodes: set[int] = set()
        for i, text in enumerate(section.string_list("rcodes", default=list(DEFAULT_FALLBACK_RCODES))):
            code = _FALLBACK_RCODES.get(text.upper())
            if code is None:
                section.where.child("rcodes").child(i).error(
                    section.node_of("rcodes"),
                    f"cannot fall back on {text!r}",
                    "use NXDOMAIN, SERVFAIL, REFUSED",
                )
            else:
                rcodes.add(code)
        section.finish()
        if target is not None:
            draft.fallback = (target, frozenset(rcodes), section.where, section.node)

    def link_fallbacks(self, zones: dict[str, Zone]) -> None:
        """Point each zone's fallback at its target; refuse one that can never fire."""
        for name, draft in self.zones.items():
            if draft.fallback is None:
                continue
            target_text, rcodes, where, node = draft.fallback
            try:
                target = zone_key(target_text)
            except BadName as exc:
                where.child("zone").error(node, f"{target_text!r} is not a zone name: {exc}", exc.hint)
                continue
            zone = zones[name]
            if target == name:
                where.child("zone").error(node, f"zone {name} cannot fall back to itself")
            elif target not in zones:
                where.child("zone").error(
                    node, f"fallback zone {target} is not defined", f"zones: {', '.join(zones)}"
                )
            elif not zones[target].stages:
                where.child("zone").error(node, f"fallback zone {target} has no stages: it can only SERVFAIL")
            elif not zone.stages:
                where.error(node, f"zone {name} has no stages of its own: use zone {target} directly")
            elif not rcodes:
                where.child("rcodes").error(node, "no rcode to fall back on: the fallback can never fire")
            elif zones[target].fallback_zone is not None and zones[target].fallback_zone is zone:
                where.child("zone").error(node, f"zones {name} and {target} fall back to each other")
            else:
                zone.fallback_zone = zones[target]
                zone.fallback_rcodes = rcodes

    def build_zones(self) -> list[Zone]:
        zones: list[Zone] = []
        for name, draft in self.zones.items():
            soa = draft.soa
            if soa is None and not draft.soa_disabled and name != ".":
                soa = default_soa(name)
            stages: list[Stage] = []
            first: dict[str, tuple[Node, Where]] = {}  # stage name -> where it is defined
            for index, (node, where) in enumerate(draft.stages):
                context = BuildContext(name, index, self.aliases, soa, self.guard)
                stage = self.build_stage(node, where, context)
                if stage is None:
                    continue
                if stage.name in first:
                    # A zone's stages may come from several files: point at the
                    # second definition and say where the first one is.
                    first_node, first_where = first[stage.name]
                    where.error(
                        node,
                        f"two stages are named {stage.name!r}: this one and the one at"
                        f" {first_where.file}:{line_of(first_node)} ({first_where.path})",
                        "give each stage a distinct 'name:'",
                    )
                    continue
                first[stage.name] = (node, where)
                stages.append(stage)
            fingerprint = "\n".join(yaml.serialize(node) for node, _where in draft.stages)
            if draft.fallback is not None:
                fingerprint += f"\nfallback {draft.fallback[0]} {sorted(draft.fallback[1])}"
            zones.append(Zone(name, stages, soa, fingerprint=fingerprint + f"\nsoa {soa}"))
        self.link_fallbacks({zone.name: zone for zone in zones})
        return zones

    def build_stage(self, node: Node, where: Where, ctx: BuildContext) -> Stage | None:
        if not isinstance(node, MappingNode) or len(node.value) != 1:
            where.error(
                node,
                "a stage is a mapping with exactly one key, the stage kind",
                f"for example '- template: {{...}}'; kinds: {', '.join(REGISTRY)}",
            )
            return None
        key_node, value = node.value[0]
        kind = scalar_value(key_node) if isinstance(key_node, ScalarNode) else None
        builder = REGISTRY.get(str(kind))
        if builder is None:
            where.error(key_node, f"unknown stage kind {kind!r}", did_you_mean(str(kind), REGISTRY, "kinds"))
            return None
        return builder(Section(value, where.child(str(kind))), ctx)


def _display(path: Path) -> str:
    """The path as a user would type it: relative to the current folder when inside it."""
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def default_soa(zone: str) -> RR:
    """The SOA used for NODATA/NXDOMAIN when the rules give none: 30 s negative TTL."""
    return RR.fromZone(f"{zone} 30 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 30")[0]


def _read_soa(zone: str, section: Section) -> RR | None:
    u32 = int_range(0, 2**32 - 1)
    ttl = section.get("ttl", int_range(0, 2**31 - 1), default=30)
    mname = section.get("mname", as_str, default=f"ns.{zone}")
    rname = section.get("rname", as_str, default=f"hostmaster.{zone}")
    serial = section.get("serial", u32, default=1)
    refresh = section.get("refresh", u32, default=3600)
    retry = section.get("retry", u32, default=600)
    expire = section.get("expire", u32, default=86400)
    minimum = section.get("minimum", u32, default=30)
    section.finish()
    if ttl is not None and minimum is not None:
        # The SOA goes out in negative answers, with the negative TTL as its own TTL:
        # min(SOA TTL, MINIMUM) (RFC 2308 §3) -- caches keep the answer that long.
        ttl = min(ttl, minimum)
    try:
        text = f"{zone} {ttl} IN SOA {mname} {rname} {serial} {refresh} {retry} {expire} {minimum}"
        return RR.fromZone(text)[0]
    except Exception as exc:
        section.where.error(section.node, f"invalid SOA: {exc}")
        return None


def _label(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    if not name or ".." in name:
        raise ValueError(f"{text!r} is not a name")
    text_to_name(name)
    return name


DEFAULT_METRICS = "127.0.0.1:9153"  # CoreDNS's port


def _read_metrics(section: Section) -> ListenAddress | None:
    node = section.raw("metrics")
    if isinstance(node, ScalarNode) and scalar_value(node) is False:
        return None
    metrics = Section(
        node,
        section.where.child("metrics"),
        hint=f"write metrics: false to turn it off, or a mapping: metrics: {{listen: {DEFAULT_METRICS}}}",
    )
    text = metrics.get("listen", as_str, default=DEFAULT_METRICS)
    metrics.finish()
    try:
        return parse_listen(text)
    except ValueError as exc:
        metrics.where.child("listen").error(metrics.node_of("listen"), str(exc))
        return None


def _read_query_log(section: Section) -> float | None:
    node = section.raw("query_log")
    if node is None or (isinstance(node, ScalarNode) and scalar_value(node) is False):
        return None
    query_log = Section(node, section.where.child("query_log"))
    sample = query_log.get("sample", number_range(0.0, 1.0), default=1.0)
    query_log.finish()
    return sample


def _read_llmnr(section: Section) -> LlmnrSettings:
    interfaces = tuple(section.string_list("interfaces", default=[]))
    aliases: list[str] = []
    for i, text in enumerate(section.string_list("aliases", default=[])):
        try:
            aliases.append(_label(text))
        except ValueError as exc:
            section.where.child("aliases").child(i).error(section.node_of("aliases"), str(exc))
    devices: list[tuple[str, tuple[str, ...]]] = []
    device_section = section.section("devices")
    for name in device_section.names():
        addresses = device_section.string_list(name, hint="printer: [100.64.0.22, fd7a:115c:a1e0::22]")
        for text in addresses:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                device_section.where.child(name).error(
                    device_section.node_of(name), f"{text!r} is not an IP address"
                )
        try:
            devices.append((_label(name), tuple(addresses)))
        except ValueError as exc:
            device_section.where.child(name).error(device_section.node_of(name), str(exc))
    device_section.finish()
    settings = LlmnrSettings(
        interfaces=interfaces,
        aliases=tuple(aliases),
        devices=tuple(devices),
        hostname=section.get("hostname", as_str, default=""),
        ttl=section.get("ttl", int_range(0, 86400), default=30),
        tcp=section.get("tcp", as_bool, default=True),
        conflict_check=section.get("conflict_check", as_bool, default=True),
        mdns_announce=section.get("mdns_announce", as_bool, default=False),
    )
    section.finish()
    return settings


OVERLAY_PREFIXES = "100.64.0.0/10 and fd7a:115c:a1e0::/48 (tailscale), or your zerotier network's prefix"


def _port_slip(text: str) -> str:
    """``::1:5491`` is a valid IPv6 address, but most likely meant ``[::1]:5491``."""
    head, _, tail = text.strip().rpartition(":")
    if tail.isdigit() and head.count(":") >= 1:
        try:
            ipaddress.IPv6Address(head)
        except ValueError:
            return ""
        return f"if you meant port {tail} on {head}, write [{head}]:{tail}; otherwise "
    return ""


def _read_listen(section: Section) -> list[ListenAddress]:
    """``listen``: addresses as text, or ``{address: ..., allow: [networks]}``.

    ``allow`` may be left out exactly where the text form needs none: on a
    loopback address, which then allows loopback clients.
    """
    node = section.raw("listen")  # marked as used even when absent: a rules file may not set it
    if node is None:
        return [parse_listen(text) for text in DEFAULT_LISTEN]
    listen: list[ListenAddress] = []
    where = section.where.child("listen")
    empty = isinstance(node, ScalarNode) and scalar_value(node) is None
    items = [] if empty else node.value if isinstance(node, SequenceNode) else [node]
    if not items:
        where.error(
            node,
            "no listen address: the server would answer nobody",
            f"list one, or delete 'listen:' for the default ({' and '.join(DEFAULT_LISTEN)})",
        )
        return listen
    seen: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], tuple[int, Node]] = {}
    for i, item in enumerate(items):
        here = where.child(i)
        allow: tuple[str, ...] | None = None
        if isinstance(item, MappingNode):
            entry = Section(item, here)
            text = entry.get("address", as_str, hint="address: 100.64.0.1:53")
            if entry.has("allow"):
                allow = tuple(
                    entry.string_list("allow", hint=f"the overlay's prefixes, e.g. {OVERLAY_PREFIXES}")
                )
            entry.finish()
            if text is None:
                continue
        elif isinstance(item, ScalarNode):
            text = str(scalar_value(item))
        else:
            here.error(item, "expected an address or {address: ..., allow: [...]}")
            continue
        try:
            address = parse_listen(text)
        except ValueError as exc:
            here.error(item, str(exc))
            continue
        for network in allow or ():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                here.child("allow").error(item, f"{network!r} is not a network such as 100.64.0.0/10")
        ip = ipaddress.ip_address(address.host)
        if allow is None:
            if not ip.is_loopback:
                form = (
                    "add allow: [...]"
                    if isinstance(item, MappingNode)
                    else f"write {{address: '{address}', allow: [...]}}"
                )
                here.error(
                    item,
                    f"{address} is not a loopback address: say who may ask there",
                    f"{_port_slip(text)}{form} with {OVERLAY_PREFIXES}",
                )
                continue
            allow = LOOPBACK
        # Port 0 picks a free port on each bind, so only fixed ports can collide.
        if address.port != 0:
            first = seen.get((ip, address.port))
            if first is not None:
                twice = f"listen[{first[0]}] (line {line_of(first[1])}) and listen[{i}]"
                here.error(
                    item,
                    f"{address} is listed twice: {twice}",
                    "the second bind would fail with 'Address already in use': delete one of them",
                )
                continue
            seen[(ip, address.port)] = (i, item)
        listen.append(ListenAddress(address.host, address.port, allow))
    return listen


def _read_server(loader: _Loader, section: Section, base: Path, rules_optional: bool) -> Config:
    listen = _read_listen(section)
    config = Config(listen=listen)
    config.udp_payload = section.get(
        "udp_payload",
        int_range(512, 4096),
        default=DEFAULT_UDP_PAYLOAD,
        hint="1232 avoids IP fragmentation (DNS Flag Day 2020)",
    )
    config.shutdown_timeout = section.get("shutdown_timeout", number_range(0, 600), default=5.0)
    tcp = section.section("tcp")
    config.tcp_idle_timeout = tcp.get("idle_timeout", number_range(0.1, 3600), default=10.0)
    config.tcp_max_connections = tcp.get("max_connections", int_range(1, 65535), default=256)
    config.tcp_max_inflight = tcp.get("max_inflight", int_range(1, 65535), default=64)
    config.tcp_per_client = tcp.get("per_client", int_range(1, 65535), default=32)
    tcp.finish()
    limits = section.section("limits")
    config.max_inflight = limits.get("max_inflight", int_range(1, 1_000_000), default=4096)
    config.rate_qps = limits.get("rate_qps", number_range(0, 1e7), default=1000.0)
    config.rate_burst = limits.get("rate_burst", int_range(1, 10_000_000), default=2000)
    limits.finish()
    config.workers = section.get("workers", int_range(1, 64), default=1)
    if config.workers > 1 and any(a.port == 0 for a in listen):
        section.where.child("workers").error(
            section.node_of("workers"), "workers share their listen addresses: port 0 cannot be shared",
            "give every listen address a fixed port",
        )  # fmt: skip
    config.refuse_udp = section.get("refuse_udp", as_str, default="silence")
    if config.refuse_udp not in ("silence", "refused"):
        section.where.child("refuse_udp").error(
            section.node_of("refuse_udp"), f"unknown value {config.refuse_udp!r}", "use silence or refused"
        )
    llmnr = section.section("llmnr")  # marked as used even when absent, as listen above
    if llmnr.node is not None:
        config.llmnr = _read_llmnr(llmnr)
    config.metrics = _read_metrics(section)
    config.query_log_sample = _read_query_log(section)
    config.nsid = section.get(
        "nsid",
        _nsid,
        default=socket.gethostname().split(".")[0],
        hint=f'a short name for this server, at most {MAX_NSID} octets; "" for none',
    )
    config.watch = section.get("watch", as_bool, default=True)
    rules = section.get("rules", as_str, default="rules")
    loader.read_rules_content(section)
    section.finish()
    rules_dir = (base / rules) if not os.path.isabs(rules) else Path(rules)
    config.rules_dir = rules_dir
    rules_node = section.node_of("rules") or section.node
    try:
        paths = rules_files(rules_dir)
    except (FileNotFoundError, NotADirectoryError):
        if not rules_optional:
            section.where.child("rules").error(
                rules_node,
                f"rules folder {rules_dir} does not exist",
                "create it, or point 'rules:' at the folder holding your *.yaml rules",
            )
        return config
    except OSError as exc:
        # Loading no rules would serve a different configuration (and a reload
        # would replace the running one with it): an unreadable folder is an error.
        section.where.child("rules").error(
            rules_node,
            f"cannot read rules folder {rules_dir}: {exc.strerror or exc}",
            "let the server's user read and enter it (chmod u+rx), or point 'rules:' elsewhere",
        )
        return config
    if paths is None:
        if not rules_optional:
            section.where.child("rules").error(
                rules_node,
                f"rules folder {rules_dir} is a file, not a folder",
                "point 'rules:' at the folder holding your *.yaml rules files",
            )
        return config
    for stray in sorted(rules_dir.glob("*.yml")):  # a common slip: say so rather than skip it silently
        section.where.child("rules").warn(
            rules_node, f"{stray} is not read: rules files end in .yaml", f"rename it to {stray.stem}.yaml"
        )
    server_keys = section.used - {"aliases", "zones"}
    for path in paths:
        rules_section = loader.read_file(path)
        if rules_section is not None:
            loader.read_rules_content(rules_section)
            _refuse_server_keys(rules_section, server_keys, section.where.file)
            rules_section.finish()
    return config


MAX_NSID = 128  # octets; RFC 5001 sets no limit, but every NSID reply carries it


def _nsid(value: object) -> str:
    """The ``nsid`` setting: a string of at most MAX_NSID octets in UTF-8, as it is sent."""
    text = as_str(value)
    size = len(text.encode("utf-8"))
    if size > MAX_NSID:
        # An NSID of kilobytes would push UDP replies past the client's payload size.
        raise ValueError(f"nsid is {size} octets long; the limit is {MAX_NSID}")
    return text


def rules_files(rules_dir: Path) -> list[Path] | None:
    """The ``*.yaml`` files of ``rules_dir`` in lexical order; None when it is not a folder.

    Raises OSError when the folder cannot be read: ``Path.glob`` would swallow that
    and return no files, and no rules is not what the folder holds.
    """
    if not stat.S_ISDIR(rules_dir.stat().st_mode):
        return None
    with os.scandir(rules_dir) as entries:
        return sorted(Path(entry.path) for entry in entries if entry.name.endswith(".yaml"))


def _refuse_server_keys(section: Section, server_keys: set[str], server_file: str) -> None:
    """A server setting in a rules file: say where it belongs, rather than "did you mean"."""
    for key in section.names():
        if key in server_keys and key not in section.used:
            key_node, _value = section.items.pop(key)  # reported here, not again by finish()
            if server_file == EMBEDDED:
                hint = "rules files hold only 'aliases' and 'zones'; write a server file and pass --config"
            else:
                hint = f"rules files hold only 'aliases' and 'zones'; move it to {server_file}"
            section.where.child(key).error(
                key_node,
                f"{key!r} is a server setting: it belongs in the server file, not in a rules file",
                hint,
            )


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and build a configuration; raise ConfigError listing every problem."""
    loader = _Loader()
    if path is None:
        text = resources.files("horizon_dns").joinpath("default.yaml").read_text(encoding="utf-8")
        section = loader.read_file(Path(EMBEDDED), text)
        base, optional = Path.cwd(), True
    else:
        section = loader.read_file(Path(path))
        base, optional = Path(path).resolve().parent, False
    config = _read_server(loader, section, base, optional) if section is not None else Config([])
    config.aliases = loader.aliases
    config.zones = loader.build_zones()
    config.guard = loader.guard
    config.path = Path(path) if path is not None else None
    config.files = loader.files
    order = {file: n for n, file in enumerate(loader.files)}
    issues = sorted(loader.issues, key=lambda i: (order.get(i.file, len(order)), i.line))
    if any(i.severity == "error" for i in issues):
        raise ConfigError(issues)
    config.warnings = issues
    return config


def describe(config: Config) -> str:
    """One line a zone, for ``check`` and the start-up log."""
    lines = [f"listen: {', '.join(str(a) for a in config.listen)}"]
    for zone in config.zones:
        stages = ", ".join(stage.name for stage in zone.stages) or "(none)"
        if zone.fallback_zone is not None:
            rcodes = ",".join(sorted(k for k, v in _FALLBACK_RCODES.items() if v in zone.fallback_rcodes))
            stages += f"; on {rcodes} fall back to zone {zone.fallback_zone.name}"
        lines.append(f"zone {zone.name}: {stages}")
    if config.llmnr is not None:
        names = [
            config.llmnr.hostname or "(hostname)",
            *config.llmnr.aliases,
            *(d for d, _ in config.llmnr.devices),
        ]
        lines.append(
            f"llmnr responder: {', '.join(names)} on {', '.join(config.llmnr.interfaces) or 'all interfaces'}"
        )
    return "\n".join(lines)


__all__ = ["Config", "ListenAddress", "describe", "line_of", "load_config", "rules_files"]
