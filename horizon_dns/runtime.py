"""The running daemon: start-up, hot reload, and graceful shutdown.

Contract of :func:`serve`: start the stages, the DNS listeners, the LLMNR
responder and the metrics listener; tell systemd READY=1; then run until
SIGTERM/SIGINT, when it stops accepting, lets in-flight queries finish within
``shutdown_timeout``, and returns 0.

Reload (SIGHUP, or a changed config/rules file when ``watch`` is on): the new
configuration is loaded and every stage built before anything changes. On any
error the old configuration keeps serving and every problem is logged with
file:line. On success the new pipeline is started and swapped in; queries in
flight finish on the pipeline they started on, whose stages are stopped after
them; listeners are rebound only for addresses that changed; the
LLMNR responder and metrics listener restart only if their settings changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from horizon_dns.config.load import describe, load_config
from horizon_dns.config.rules import rules_files
from horizon_dns.config.schema import Config
from horizon_dns.core.access import EdgePolicy
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.pipeline import Pipeline
from horizon_dns.errors import ConfigError
from horizon_dns.horizon import HorizonWatch, overlay_interfaces
from horizon_dns.llmnr.responder import Names
from horizon_dns.metrics import MetricsServer, Sources
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.llmnr import LlmnrResponder
from horizon_dns.net.mdns_announce import MdnsAnnouncer
from horizon_dns.net.server import DnsServer
from horizon_dns.net.systemd import notify, reloading
from horizon_dns.net.tcp import TcpLimits
from horizon_dns.querylog import QueryLog

log = logging.getLogger("horizon_dns.runtime")

WATCH_INTERVAL = 1.0  # seconds between looks at the config files' mtimes
WATCH_SETTLE = 0.3  # a change must hold still this long (editors write in steps)


def make_llmnr_responder(config: Config) -> LlmnrResponder | None:
    """The LLMNR responder the config asks for, not yet started."""
    settings = config.llmnr
    if settings is None:
        return None
    names = Names(
        hostname=settings.hostname or socket.gethostname().split(".")[0],
        aliases=frozenset(settings.aliases),
        devices={name: tuple(ipaddress.ip_address(a) for a in addrs) for name, addrs in settings.devices},
        ttl=settings.ttl,
    )
    wanted = settings.interfaces
    return LlmnrResponder(
        names, lambda: list_interfaces(wanted), tcp=settings.tcp, follow_hostname=not settings.hostname
    )


def carry_caches(old: Pipeline, new: Pipeline) -> int:
    """Give each new cache the old one's entries when its zone's configuration is unchanged.

    A cache holds what the stages behind it answered: if any of them changed (a
    template edited), its entries would be stale answers, so they are dropped.
    """
    from horizon_dns.stages.cache import CacheStage

    carried = 0
    for name, zone in new.zones.items():
        before = old.zones.get(name)
        if before is None or before.fingerprint != zone.fingerprint:
            continue
        for index, stage in enumerate(zone.stages):
            if index >= len(before.stages) or not isinstance(stage, CacheStage):
                continue
            previous = before.stages[index]
            if isinstance(previous, CacheStage) and previous.settings() == stage.settings():
                carried += stage.adopt(previous)
    return carried


def _snapshot(config: Config) -> dict[str, tuple[int, int]]:
    """(mtime, size) of the server file and every rules file, to notice edits."""
    paths: list[Path] = []
    if config.path is not None:
        paths.append(config.path)
    if config.rules_dir is not None:
        with contextlib.suppress(OSError):  # unreadable now: the reload it triggers will say so
            paths.extend(rules_files(config.rules_dir) or [])
    out: dict[str, tuple[int, int]] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            stat = path.stat()
            out[str(path)] = (stat.st_mtime_ns, stat.st_size)
    return out


class Runtime:
    """Everything a running server holds, and how it changes on reload."""

    def __init__(self, config: Config, worker: int = 0) -> None:
        self.config = config
        #: Worker 0 also runs what exists once per node: LLMNR, mDNS, metrics.
        self.worker = worker
        self.pipeline = config.pipeline()
        self.handler = QueryHandler(self.pipeline, config.udp_payload, config.nsid)
        limits = _tcp_limits(config)
        self.server = DnsServer(
            self.handler, config.listen, limits, self.policy_for(config), reuse_port=config.workers > 1
        )
        self.responder = make_llmnr_responder(config) if worker == 0 else None
        # Every worker holds its own caches, so every worker follows the horizon.
        self.horizon = HorizonWatch(self.handler, overlay_interfaces(self.handler))
        self.sources = Sources(
            self.handler,
            tcp_connections=lambda: len(self.server.connections.open),
            tcp_rejected=lambda: self.server.connections.rejected,
            udp_dropped=self.server.udp_replies_dropped,
            llmnr=self.responder,
            policy=self.server.policy,
            horizon_moves=lambda: dict(self.horizon.moves),
        )
        self.metrics: MetricsServer | None = None
        self.announcer: MdnsAnnouncer | None = None
        self.query_log: QueryLog | None = None
        self.stop_event = asyncio.Event()
        self.reload_lock = asyncio.Lock()
        #: The config files' (mtime, size) as last read, for the file watch.
        self.seen: dict[str, tuple[int, int]] = {}
        self.background: set[asyncio.Task[object]] = set()
        self._apply_query_log(config)

    @staticmethod
    def policy_for(config: Config) -> EdgePolicy:
        return EdgePolicy(
            config.max_inflight, config.rate_qps, config.rate_burst, config.refuse_udp, config.tcp_per_client
        )

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _apply_query_log(self, config: Config) -> None:
        if self.query_log is not None:
            self.handler.observers.remove(self.query_log)
            self.query_log = None
        if config.query_log_sample is not None:
            self.query_log = QueryLog(config.query_log_sample)
            self.handler.observers.append(self.query_log)
        self.handler.hot_enabled = self.query_log is None

    async def _start_metrics(self, config: Config) -> None:
        if config.metrics is None or self.worker != 0:
            return
        metrics = MetricsServer(self.sources, config.metrics.host, config.metrics.port)
        try:
            await metrics.start()
        except OSError as exc:
            log.error("metrics: cannot listen on %s: %s (DNS keeps working)", config.metrics, exc.strerror)
            return
        self.metrics = metrics
        log.info("metrics on http://%s/metrics", f"{config.metrics.host}:{metrics.port}")

    async def _start_responder(self, config: Config) -> None:
        if self.responder is None or self.worker != 0:
            return
        await self.responder.start()
        if config.llmnr is not None and config.llmnr.mdns_announce:
            self.announcer = MdnsAnnouncer(self.responder.names, self.responder.list_interfaces)
            await self.announcer.start()
        log.info(
            "LLMNR responder for %s on %s",
            ", ".join(sorted(self.responder.names.all())),
            ", ".join(i.name for i in self.responder.interfaces.values()) or "no interface yet",
        )
        if config.llmnr is not None and config.llmnr.conflict_check:
            self._spawn(self.responder.check_conflicts())

    async def _stop_responder(self) -> None:
        if self.announcer is not None:
            await self.announcer.stop()
            self.announcer = None
        if self.responder is not None:
            await self.responder.stop()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP")))
        config = self.config
        try:
            await self._start_metrics(config)
            await self.pipeline.start()
            await self.server.start()
            await self._start_responder(config)
            await self.horizon.start()
            for issue in config.warnings:
                log.warning("%s", issue)
            log.info("%s", describe(config).replace("\n", "; "))
            log.info("listening on %s", ", ".join(str(a) for a in self.server.bound))
            self.sources.ready = True
            if config.workers > 1:
                log.info("worker %d of %d ready", self.worker, config.workers)
            notify("READY=1", f"STATUS=answering on {', '.join(str(a) for a in self.server.bound)}")
            if config.watch and (config.path is not None or config.rules_dir is not None):
                self._spawn(self.watch())
            await self.stop_event.wait()
            notify("STOPPING=1")
            self.sources.ready = False
            log.info("stopping: finishing in-flight queries (up to %.1f s)", self.config.shutdown_timeout)
            left = await self.server.stop(self.config.shutdown_timeout)
            if left:
                log.warning("%d queries were still running at shutdown", left)
            return 0
        finally:
            for task in list(self.background):
                task.cancel()
            await asyncio.gather(*self.background, return_exceptions=True)
            await self.horizon.stop()
            await self._stop_responder()
            await self.server.stop(0)
            await self.handler.pipeline.stop()
            if self.metrics is not None:
                await self.metrics.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def watch(self) -> None:
        """Reload when the server file or a rules file changes (polled, debounced)."""
        self.seen = _snapshot(self.config)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = _snapshot(self.config)
            if now == self.seen:
                continue
            await asyncio.sleep(WATCH_SETTLE)
            settled = _snapshot(self.config)
            if settled != now:
                continue  # still being written; look again next round
            await self.reload("file change")

    async def reload(self, why: str) -> bool:
        """Build the new configuration fully; swap it in, or keep the old one on any error."""
        async with self.reload_lock:
            reloading()
            log.info("reloading (%s)", why)
            # The files as this reload reads them: after a SIGHUP the watcher must not
            # reload the same edit a second time.
            self.seen = _snapshot(self.config)
            try:
                try:
                    config = load_config(self.config.path)
                except ConfigError as exc:
                    self.sources.reloads["error"] += 1
                    self.sources.config_errors += len(exc.issues)
                    log.error("reload rejected, the old configuration keeps serving:")
                    for issue in exc.issues:
                        log.error("  %s", issue)
                    return False
                await self._swap(config)
                self.sources.reloads["ok"] += 1
                log.info("reloaded: %s", describe(config).replace("\n", "; "))
                return True
            except Exception:
                self.sources.reloads["error"] += 1
                log.exception("reload failed; the old configuration keeps serving")
                return False
            finally:
                notify("READY=1")

    async def _swap(self, config: Config) -> None:
        old_config, old_pipeline = self.config, self.handler.pipeline
        new_pipeline = config.pipeline()
        carried = carry_caches(old_pipeline, new_pipeline)
        await new_pipeline.start()
        if config.listen != old_config.listen:
            try:
                await self.server.rebind(config.listen)
            except Exception:
                await new_pipeline.stop()
                raise
        started_before = set(self.server.inflight.tasks)
        self.handler.pipeline = new_pipeline
        if not self.horizon.running:
            await self.horizon.start()  # the new configuration may be the first with an overlay
        self.handler.udp_payload = config.udp_payload
        self.handler.nsid = config.nsid.encode("utf-8")
        self.server.connections.limits = _tcp_limits(config)
        policy = self.server.policy
        policy.max_inflight, policy.refuse_udp = config.max_inflight, config.refuse_udp
        policy.tcp_per_client = config.tcp_per_client
        policy.limiter.qps, policy.limiter.burst = config.rate_qps, float(config.rate_burst)
        self._apply_query_log(config)
        if config.llmnr != old_config.llmnr:
            await self._stop_responder()
            self.responder = make_llmnr_responder(config) if self.worker == 0 else None
            self.sources.llmnr = self.responder
            await self._start_responder(config)
        if config.metrics != old_config.metrics:
            if self.metrics is not None:
                await self.metrics.stop()
                self.metrics = None
            await self._start_metrics(config)
        if config.workers != old_config.workers and self.worker == 0:
            # Processes are forked at start; a reload does not fork or end them.
            log.warning(
                "workers: %d -> %d takes effect at the next restart, not on reload",
                old_config.workers,
                config.workers,
            )
        self.config = config
        if carried:
            log.info("reload kept %d cached entries", carried)
        self._spawn(self._retire(old_pipeline, started_before, config.shutdown_timeout))

    async def _retire(self, pipeline: Pipeline, inflight: set[asyncio.Task[None]], timeout: float) -> None:
        """Stop the old pipeline's stages once the queries that started on it are done."""
        pending = {task for task in inflight if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await pipeline.stop()


async def serve(config: Config, worker: int = 0) -> int:
    """Run a server for ``config`` until SIGTERM/SIGINT; return the exit code."""
    return await Runtime(config, worker).run()


def _tcp_limits(config: Config) -> TcpLimits:
    """The TCP connection rules a configuration asks for."""
    return TcpLimits(
        idle_timeout=config.tcp_idle_timeout,
        max_connections=config.tcp_max_connections,
        max_inflight=config.tcp_max_inflight,
        message_timeout=config.tcp_message_timeout,
    )
