"""The rules: ``aliases`` and ``zones`` from the server file and every rules file.

Contract: :class:`RulesLoader` reads files into :class:`~horizon_dns.config.source.Section`
trees, collects aliases and zone drafts (a zone named in several files gets their
stages concatenated in file order; an alias or a zone's ``soa`` defined twice is an
error), then ``build_zones()`` builds every stage and links fallbacks. Problems go
to ``issues`` with file, line and a hint; nothing raises.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dnslib import RR
from yaml.nodes import MappingNode, Node, ScalarNode

from horizon_dns.config.source import (
    Section,
    Where,
    as_str,
    did_you_mean,
    int_range,
    line_of,
    parse_yaml,
    scalar_value,
)
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.names import MAX_LABEL, MAX_NAME_WIRE
from horizon_dns.core.pipeline import Zone
from horizon_dns.core.stage import Stage
from horizon_dns.core.wire import RCODE_NAMES
from horizon_dns.errors import ConfigIssue, Error
from horizon_dns.stages import REGISTRY, BuildContext


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


DEFAULTFALLBACK_RCODES = ("NXDOMAIN", "SERVFAIL", "REFUSED")
FALLBACK_RCODES = {name: code for code, name in RCODE_NAMES.items() if name in DEFAULTFALLBACK_RCODES}


class RulesLoader:
    """Collects aliases and zone drafts from each file read, then builds the zones."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.aliases: dict[str, str] = {}
        self.alias_where: dict[str, str] = {}
        self.zones: dict[str, _ZoneDraft] = {}
        self.files: list[str] = []
        self.guard = LoopGuard()

    def read_file(self, path: Path, text: str | None = None) -> Section | None:
        file = display_path(path)
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
        for i, text in enumerate(section.string_list("rcodes", default=list(DEFAULTFALLBACK_RCODES))):
            code = FALLBACK_RCODES.get(text.upper())
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


def display_path(path: Path) -> str:
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


def rules_files(rules_dir: Path) -> list[Path] | None:
    """The ``*.yaml`` files of ``rules_dir`` in lexical order; None when it is not a folder.

    Raises OSError when the folder cannot be read: ``Path.glob`` would swallow that
    and return no files, and no rules is not what the folder holds.
    """
    if not stat.S_ISDIR(rules_dir.stat().st_mode):
        return None
    with os.scandir(rules_dir) as entries:
        return sorted(Path(entry.path) for entry in entries if entry.name.endswith(".yaml"))
