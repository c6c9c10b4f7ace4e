"""Prometheus metrics, /health and /ready over a small asyncio HTTP listener.

Contract: :class:`Collector` reads the plain counters the core keeps (handler,
stages, responder, reloads) at scrape time and yields Prometheus series; nothing
on the query path touches prometheus_client. No series is labelled by query
name. :class:`MetricsServer` answers ``GET /metrics``, ``/health`` (200 while the
process runs) and ``/ready`` (200 once listeners are bound and the config is
loaded, 503 before).

Series (all prefixed ``horizon_dns_``):

=====================================  =============================================
``responses_total``                    zone, transport, qtype, rcode (full path)
``replies_by_stage_total``             stage, outcome, reason
``hot_path_responses_total``           cache hits answered without a task
``request_duration_seconds``           histogram by zone (full path)
``stage_duration_seconds``             histogram by zone, stage (inclusive of later stages)
``malformed_total``                    kind: dropped, formerr, notimp
``refused_clients_total`` ``rate_limited_total`` ``overload_shed_total``
``udp_replies_dropped_total``          replies the kernel refused (socket buffer full)
``tcp_connections`` / ``tcp_rejected_total``
``cache_hits_total`` ``cache_misses_total`` ``cache_entries`` ``cache_evictions_total``
``cache_stale_total`` ``cache_coalesced_total``  by zone, stage
``upstream_queries_total`` ``upstream_failures_total`` ``upstream_rtt_seconds`` ``upstream_up``
                                       by stage, upstream
``overlay_lookups_total``              stage, method, result (found, missed, rate-limited)
``overlay_replies_total``              zone, stage, result (answer, nodata, not-found, local-limit)
``overlay_multicast_limited_total``    zone, stage: multicast queries refused by the budget
``horizon_switches_total``             zone, stage, to (inside, outside): hosts that changed side
``horizon_moves_total``                cause (link, mdns-goodbye, mdns-announce): overlay views dropped
``stage_shed_total``                   stage: upstream queries or lookups refused at their cap
``llmnr_queries_total``                reason (answered, not-ours, unicast-udp, ...)
``llmnr_conflicts_total``
``reloads_total``                      result (ok, error)
``config_errors_total``
=====================================  =============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as CollectorBase
from prometheus_client.registry import CollectorRegistry

from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.stage import Reporting
from horizon_dns.core.stats import Histogram
from horizon_dns.core.wire import rcode_name

log = logging.getLogger("horizon_dns.metrics")


@dataclass
class Sources:
    """Where the numbers live; the runtime updates these on reload."""

    handler: QueryHandler
    tcp_connections: Callable[[], int] = lambda: 0
    tcp_rejected: Callable[[], int] = lambda: 0
    udp_dropped: Callable[[], int] = lambda: 0
    llmnr: Any = None  # net.llmnr.LlmnrResponder
    policy: Any = None  # core.access.EdgePolicy
    reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    horizon_moves: Callable[[], dict[str, int]] = dict
    config_errors: int = 0
    ready: bool = False


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(family: HistogramMetricFamily, values: list[str], histogram: Histogram) -> None:
    family.add_metric(values, histogram.cumulative(), histogram.total)


class Collector(CollectorBase):
    """Turns the core's plain counters into Prometheus series at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        handler = src.handler
        p = "horizon_dns_"

        responses = CounterMetricFamily(
            p + "responses", "Replies of the full path.", labels=["zone", "transport", "qtype", "rcode"]
        )
        for (zone_name, transport, qtype, rcode), n in list(handler.responses.items()):
            responses.add_metric([zone_name, transport, qtype, rcode_name(rcode)], n)
        yield responses

        by_stage = CounterMetricFamily(
            p + "replies_by_stage", "Replies by answering stage.", labels=["stage", "outcome", "reason"]
        )
        for (stage_name, outcome, reason), n in list(handler.replies.items()):
            by_stage.add_metric([stage_name, outcome, reason], n)
        yield by_stage

        yield CounterMetricFamily(
            p + "hot_path_responses", "Cache hits answered without a task.", handler.hot_hits
        )

        durations = _histogram(p + "request_duration_seconds", "Time to answer (full path).", ["zone"])
        for zone_name, histogram in list(handler.durations.items()):
            _add_histogram(durations, [zone_name], histogram)
        yield durations

        malformed = CounterMetricFamily(
            p + "malformed", "Messages that were not a valid query.", labels=["kind"]
        )
        for kind, n in list(handler.malformed.items()):
            malformed.add_metric([kind], n)
        yield malformed

        if src.policy is not None:
            policy = src.policy
            yield CounterMetricFamily(
                p + "refused_clients", "Queries from outside the allow list.", policy.refused
            )
            yield CounterMetricFamily(
                p + "rate_limited", "UDP queries answered TC=1 by the rate limit.", policy.limiter.limited
            )
            yield CounterMetricFamily(
                p + "overload_shed", "Queries answered SERVFAIL at the in-flight cap.", policy.overloaded
            )
        yield CounterMetricFamily(
            p + "udp_replies_dropped", "UDP replies the kernel would not take.", src.udp_dropped()
        )
        yield GaugeMetricFamily(p + "tcp_connections", "Open TCP connections.", src.tcp_connections())
        yield CounterMetricFamily(
            p + "tcp_rejected", "TCP connections closed at the cap.", src.tcp_rejected()
        )

        stage_time = _histogram(
            p + "stage_duration_seconds", "Time in a stage and those after it.", ["zone", "stage"]
        )
        # Stages own their numbers (core.stats.Sample); this module knows no stage type.
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for zone in list(handler.pipeline.zones.values()):
            for stage_name, histogram in zone.timings.items():
                _add_histogram(stage_time, [zone.name, stage_name], histogram)
            for stage in zone.stages:
                if not isinstance(stage, Reporting):
                    continue
                for sample in stage.stats(zone.name):
                    family = families.get(sample.metric)
                    if family is None:
                        make = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                        names = [name for name, _value in sample.labels]
                        family = families[sample.metric] = make(p + sample.metric, sample.help, labels=names)
                    family.add_metric([value for _name, value in sample.labels], sample.value)
        yield stage_time
        yield from families.values()
        moves = CounterMetricFamily(p + "horizon_moves", "Overlay views dropped, by cause.", labels=["cause"])
        for cause, n in src.horizon_moves().items():
            moves.add_metric([cause], n)
        yield moves

        llmnr = CounterMetricFamily(p + "llmnr_queries", "LLMNR messages by decision.", labels=["reason"])
        conflicts = 0
        if src.llmnr is not None:
            for reason, n in list(src.llmnr.counts.items()):
                llmnr.add_metric([reason], n)
            conflicts = src.llmnr.conflicts_seen
        yield llmnr
        yield CounterMetricFamily(p + "llmnr_conflicts", "Names another host also answers for.", conflicts)

        reloads = CounterMetricFamily(p + "reloads", "Configuration reloads.", labels=["result"])
        for result, n in src.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield CounterMetricFamily(
            p + "config_errors", "Problems found in rejected configurations.", src.config_errors
        )
        yield GaugeMetricFamily(p + "ready", "1 once listening with a loaded configuration.", int(src.ready))


class MetricsServer:
    """GET /metrics, /health, /ready on a TCP address; nothing else."""

    def __init__(self, sources: Sources, host: str, port: int) -> None:
        self.sources = sources
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(sources))
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = request.split(b" ", 2)
            path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 1 else "/"
            status, body, ctype = self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[str, bytes, str]:
        if path == "/metrics":
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path == "/health":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/ready":
            if self.sources.ready:
                return "200 OK", b"ready\n", "text/plain"
            return "503 Service Unavailable", b"not ready\n", "text/plain"
        return "404 Not Found", b"not found\n", "text/plain"
