"""Which network interfaces exist, with their addresses and flags.

Contract: ``list_interfaces(wanted)`` returns the interfaces that are up,
multicast-capable and not loopback -- or exactly those named in ``wanted``
that exist -- with every address and its prefix. It reads ifaddr (already a
dependency of zeroconf) and /sys/class/net flags; it sends nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

import ifaddr

from horizon_dns.llmnr.responder import Interface, IPInterface

# Interface flags, <linux/if.h>.
IFF_UP, IFF_LOOPBACK, IFF_RUNNING, IFF_MULTICAST = 0x1, 0x8, 0x40, 0x1000


def _flags(name: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return 0


def list_interfaces(wanted: Sequence[str] = ()) -> list[Interface]:
    """Interfaces to serve: the ``wanted`` ones, else every up multicast non-loopback one."""
    found: list[Interface] = []
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name
        flags = _flags(name)
        if wanted:
            if name not in wanted:
                continue
        elif not flags & IFF_UP or flags & IFF_LOOPBACK or not flags & IFF_MULTICAST:
            continue
        addresses: list[IPInterface] = []
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                addresses.append(ipaddress.ip_interface(f"{text.split('%')[0]}/{ip.network_prefix}"))
            except ValueError:
                continue
        found.append(Interface(name, int(adapter.index or 0), tuple(addresses)))
    return found
