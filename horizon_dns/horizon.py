"""When the horizon moves, forget the old view at once: link, address and mDNS events.

Contract: :class:`HorizonWatch` follows two event sources and, when one says the
overlay may now look different from here, drops every overlay-derived answer the
daemon holds -- every stage's that holds any (``forget_overlay``: the overlay
stages' findings, the caches' overlay-marked entries) and the replies the hot path keeps
-- so the next query asks the overlay again. Public data stays cached.

* **This node's overlay link or address** changed (rtnetlink, :mod:`horizon_dns.net.linkwatch`):
  always a move. Costs no CPU while nothing changes.
* **An mDNS responder** said goodbye (its records with TTL 0, RFC 6762 §10.1) for a
  host we see inside, or announced (§8.3) a host we see outside
  (:mod:`horizon_dns.net.mdns_watch`). Records for hosts nobody asked about change
  nothing, so a chatty LAN costs a parse per datagram and no lookups.

Nothing here runs without an overlay stage in the configuration. ``moves`` counts
the forgetting by cause (``link``, ``mdns-goodbye``, ``mdns-announce``), ``last``
says when (on :mod:`horizon_dns.core.clock`) and why the last one happened.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from horizon_dns.core import clock
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.stage import OverlayDerived
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.linkwatch import LinkWatcher
from horizon_dns.net.mdns_watch import MdnsWatcher
from horizon_dns.stages.overlay import OverlayStage

log = logging.getLogger("horizon_dns.horizon")


class HorizonWatch:
    """Drops overlay-derived answers when the network says the horizon moved."""

    def __init__(self, handler: QueryHandler, interfaces: Callable[[], list[str]] | None = None) -> None:
        self.handler = handler
        #: Interface names the overlay stages use; empty: every up multicast interface.
        self.interfaces = interfaces or (lambda: [])
        self.links = LinkWatcher(self._link_changed, self.interfaces)
        self.mdns = MdnsWatcher(self._mdns_record, lambda: list_interfaces(self.interfaces()))
        self.moves: collections.Counter[str] = collections.Counter()
        self.last: tuple[float, str] | None = None
        self.running = False

    def overlay_stages(self) -> list[OverlayStage]:
        return [s for s in self.handler.pipeline.stages if isinstance(s, OverlayStage)]

    async def start(self) -> None:
        """Start both sources when some zone asks the overlay; a source that cannot open
        is logged and the bound then rests on the answers' hold alone."""
        if not self.overlay_stages():
            return
        self.running = True
        if not self.links.start():
            log.warning("horizon: no rtnetlink; link and address changes are noticed only as lookups fail")
        if not await self.mdns.start():
            log.info("horizon: no mDNS listener yet; goodbyes are noticed once an interface is joined")

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.links.stop()
        await self.mdns.stop()

    def _link_changed(self, reason: str) -> None:
        self.mdns.rejoin()
        self.move("link", reason)

    def _mdns_record(self, host: str, goodbye: bool) -> None:
        if any(stage.heard(host, goodbye) for stage in self.overlay_stages()):
            if goodbye:
                self.move("mdns-goodbye", f"{host}.local said goodbye (RFC 6762 §10.1)")
            else:
                self.move("mdns-announce", f"{host}.local announced itself (RFC 6762 §8.3)")

    def move(self, cause: str, why: str) -> None:
        """Forget every overlay-derived answer: the horizon moved (``why``)."""
        self.moves[cause] += 1
        self.last = (clock.now(), why)
        dropped = sum(
            stage.forget_overlay(why)
            for stage in self.handler.pipeline.stages
            if isinstance(stage, OverlayDerived)
        )
        self.handler.forget_hot_replies()
        log.info("horizon moved: %s; forgot %d overlay-derived answers", why, dropped)


def overlay_interfaces(handler: QueryHandler) -> Callable[[], list[str]]:
    """The interface names the overlay stages are configured with (empty: all)."""

    def names() -> list[str]:
        found: list[str] = []
        for stage in handler.pipeline.stages:
            if isinstance(stage, OverlayStage):
                if not stage.interface_names:
                    return []  # this stage asks on every interface
                for name in stage.interface_names:
                    if name not in found:
                        found.append(name)
        return found

    return names
