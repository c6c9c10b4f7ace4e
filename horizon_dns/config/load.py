"""Load the configuration: one server file plus every ``*.yaml`` of its rules folder.

Contract: ``load_config(path)`` reads, validates and builds everything -- zones,
stages, compiled regexes and templates -- without opening a socket, and returns a
:class:`~horizon_dns.config.schema.Config`; or raises
:class:`~horizon_dns.errors.ConfigError` listing every problem found (file, line,
key, what is wrong, a hint). ``path=None`` loads the embedded default
(``horizon_dns/default.yaml``), whose rules folder is ``rules/`` under the current
directory and may be absent. ``describe(config)`` is one line a zone.

Merging: the server file's own ``aliases``/``zones`` come first, then each rules
file in lexical order (:mod:`horizon_dns.config.rules`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from horizon_dns.config.rules import FALLBACK_RCODES, RulesLoader
from horizon_dns.config.schema import EMBEDDED, Config
from horizon_dns.config.server import read_server
from horizon_dns.errors import ConfigError


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and build a configuration; raise ConfigError listing every problem."""
    loader = RulesLoader()
    if path is None:
        text = resources.files("horizon_dns").joinpath("default.yaml").read_text(encoding="utf-8")
        section = loader.read_file(Path(EMBEDDED), text)
        base, optional = Path.cwd(), True
    else:
        section = loader.read_file(Path(path))
        base, optional = Path(path).resolve().parent, False
    config = read_server(loader, section, base, optional) if section is not None else Config([])
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
            rcodes = ",".join(sorted(k for k, v in FALLBACK_RCODES.items() if v in zone.fallback_rcodes))
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
