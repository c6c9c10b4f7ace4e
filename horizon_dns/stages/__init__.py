"""The stage registry: YAML kind -> builder.

A builder reads its own :class:`~horizon_dns.config.source.Section`, records every
problem it finds there, and returns a ready (not started) stage, or None when its
section had errors. Building does no I/O, so ``check`` can build everything.
"""

from __future__ import annotations

from collections.abc import Callable

from horizon_dns.config.source import Section
from horizon_dns.core.stage import Stage
from horizon_dns.stages import cache, forward, overlay, template
from horizon_dns.stages.context import BuildContext

StageBuilder = Callable[[Section, BuildContext], Stage | None]

#: Every stage kind a rules file may name, in the order the docs list them.
REGISTRY: dict[str, StageBuilder] = {
    "cache": cache.build,
    "template": template.build,
    "overlay": overlay.build,
    "forward": forward.build,
}

__all__ = ["REGISTRY", "BuildContext", "StageBuilder"]
