"""The configuration's shape: what a loaded configuration holds, nothing about YAML.

Contract: :class:`Config` is a loaded, validated configuration with its zones and
stages built but not started; :class:`ListenAddress` and :class:`LlmnrSettings` are
its parts. Reading files is :mod:`horizon_dns.config.load`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from horizon_dns.core.access import LOOPBACK
from horizon_dns.core.address import split_host_port
from horizon_dns.core.encode import DEFAULT_UDP_PAYLOAD
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.pipeline import Pipeline, Zone
from horizon_dns.errors import ConfigIssue

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
    tcp_message_timeout: float = 5.0
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
