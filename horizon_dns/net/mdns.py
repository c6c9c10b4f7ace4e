"""One python-zeroconf instance for the whole process, for publishing names over mDNS.

Why one: every instance binds UDP 5353 with SO_REUSEPORT and would probe, announce
and answer on its own; and the kernel hands each *unicast* datagram to 5353 to just
one socket of the group. (Lookups do not use zeroconf for that reason: they send
one-shot queries from a port of their own, :mod:`horizon_dns.net.oneshot`.)

Contract: ``await acquire(interfaces)`` returns the shared AsyncZeroconf (made on
first use, bound to the given interfaces' addresses); ``await release()`` closes it
when its last user lets go.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from horizon_dns.llmnr.responder import Interface

log = logging.getLogger("horizon_dns.net.mdns")

_shared: Any = None
_users = 0
_bound: tuple[str | int, ...] = ()


def _choice(interfaces: Sequence[Interface]) -> tuple[str | int, ...]:
    # zeroconf takes IPv4 interface *addresses*, and IPv6 interfaces by index (scope).
    v4 = [str(a.ip) for i in interfaces for a in i.addresses if a.ip.version == 4]
    return (*v4, *(i.index for i in interfaces))


async def acquire(interfaces: Sequence[Interface]) -> Any:
    """The process's AsyncZeroconf; the first caller's interfaces decide where it listens."""
    global _shared, _users, _bound
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncZeroconf

    choice = _choice(interfaces)
    if _shared is None:
        _shared = AsyncZeroconf(interfaces=list(choice) or None, ip_version=IPVersion.All)  # type: ignore[arg-type]
        _bound = choice
    elif choice and set(choice) != set(_bound):
        log.warning("mDNS already runs on %s; %s shares it", _bound, choice)
    _users += 1
    return _shared


async def release() -> None:
    """Let go of the shared instance; the last user closes it."""
    global _shared, _users
    _users = max(0, _users - 1)
    if _users == 0 and _shared is not None:
        shared, _shared = _shared, None
        await shared.async_close()
