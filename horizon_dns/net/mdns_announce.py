"""Publish the LLMNR aliases over mDNS too, as ``alias.local``, through python-zeroconf.

Contract: ``MdnsAnnouncer.start()`` registers, for each alias of this node, a
service record whose *server* name is ``alias.local.`` with the node's addresses
on the served interfaces -- zeroconf then answers A/AAAA queries for
``alias.local`` (RFC 6762 §6) -- and, for each device name, the same with the
device's addresses. ``stop()`` unregisters (goodbye packets, RFC 6762 §10.1).

Coexisting with avahi: both bind UDP 5353 (SO_REUSEPORT) and each answers for its
own names. Leave the hostname to avahi (it is not published here); an alias that
avahi also publishes is a name conflict, resolved by mDNS probing (the later
one fails to register and is logged).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from horizon_dns.llmnr.responder import Interface, Names
from horizon_dns.net import mdns

log = logging.getLogger("horizon_dns.net.mdns_announce")

SERVICE_TYPE = "_horizon-alias._tcp.local."


class MdnsAnnouncer:
    """Registers one zeroconf service per alias so that ``alias.local`` resolves."""

    def __init__(self, names: Names, interfaces: Callable[[], list[Interface]]) -> None:
        self.names = names
        self.interfaces = interfaces
        self.zeroconf: Any = None
        self.registered: list[Any] = []
        self.failed: list[str] = []

    def _records(self) -> dict[str, list[str]]:
        own = [
            str(a.ip)
            for interface in self.interfaces()
            for a in interface.addresses
            if not a.ip.is_link_local
        ]
        wanted = {alias.lower(): own for alias in self.names.aliases}
        for device, addresses in self.names.devices.items():
            wanted[device.lower()] = [str(a) for a in addresses]
        return wanted

    async def start(self) -> None:
        from zeroconf import ServiceInfo

        self.zeroconf = await mdns.acquire(self.interfaces())
        for name, addresses in self._records().items():
            if not addresses:
                continue
            info = ServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                port=9,  # discard: the service is only a carrier for the host record
                server=f"{name}.local.",
                addresses=[ipaddress.ip_address(a).packed for a in addresses],
            )
            try:
                await (await self.zeroconf.async_register_service(info))
            except Exception as exc:  # a conflict or a socket problem must not stop DNS
                self.failed.append(name)
                log.warning("mDNS: could not publish %s.local: %s", name, exc)
                continue
            self.registered.append(info)
            log.info("mDNS: publishing %s.local -> %s", name, ", ".join(addresses))

    async def stop(self) -> None:
        if self.zeroconf is None:
            return
        for info in self.registered:
            try:
                await (await self.zeroconf.async_unregister_service(info))
            except Exception as exc:
                log.debug("mDNS: unregistering %s failed: %s", info.server, exc)
        self.registered.clear()
        self.zeroconf = None
        await mdns.release()
