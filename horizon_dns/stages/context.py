"""What a stage builder gets besides its own YAML section."""

from __future__ import annotations

from dataclasses import dataclass

from dnslib import RR

from horizon_dns.core.loop import LoopGuard


@dataclass(frozen=True, slots=True)
class BuildContext:
    """The zone a stage is built for and the rules-wide data it may use."""

    zone: str  # lowercase apex with trailing dot, "." for the default zone
    index: int  # position in the zone's stage list, for default names
    aliases: dict[str, str]
    soa: RR | None
    guard: LoopGuard | None = None
