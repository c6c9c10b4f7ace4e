"""Forwarding-loop detection shared by the forward stages and the server edge.

A forward stage sends each upstream a query for a random name at start; while
such probes are out, the edge reports every arriving query name here. A probe
that arrives came back through an upstream that forwards to us: a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LoopGuard:
    """Names of loop probes in flight, and the upstreams caught looping."""

    probes: dict[str, str] = field(default_factory=dict)  # probe name -> upstream text
    looped: set[str] = field(default_factory=set)

    def arrived(self, name: str) -> bool:
        """True when ``name`` (lowercase, trailing dot) is one of our probes."""
        upstream = self.probes.get(name)
        if upstream is None:
            return False
        self.looped.add(upstream)
        return True
