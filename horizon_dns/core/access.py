"""Who may ask, and how fast: client prefix lists and per-client token buckets.

Contract: ``Acl.allows(ip)`` says whether a client address is inside the
listener's allowed prefixes (answers are memoised per address, in a bounded
table); ``RateLimiter.allow(ip)`` spends one token of that client's bucket and
says whether it had one. Both are pure and cheap enough for the datagram path.
``EdgePolicy`` groups what the listeners enforce: the in-flight cap, the rate
limit, what a refused UDP client gets, the TCP per-client cap.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from horizon_dns.core.bounded import remember

LOOPBACK = ("127.0.0.0/8", "::1/128")


def is_loopback(ip: str) -> bool:
    """Whether a client address (as the socket reports it) is this machine's loopback."""
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


_MEMO_LIMIT = 65536


class Acl:
    """An allow list of networks."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.update(networks)

    def update(self, networks: Iterable[str]) -> None:
        """Allow exactly ``networks`` from now on (a reload changed the list)."""
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._hot_replies: dict[str, bool] = {}

    def allows(self, ip: str) -> bool:
        verdict = self._hot_replies.get(ip)
        if verdict is None:
            try:
                address = ipaddress.ip_address(ip.split("%")[0])
            except ValueError:
                address = None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            verdict = address is not None and any(
                address.version == n.version and address in n for n in self.networks
            )
            remember(self._hot_replies, ip, verdict, _MEMO_LIMIT)
        return verdict


class RateLimiter:
    """A token bucket per client address: ``qps`` tokens a second, at most ``burst`` saved."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.qps = qps
        self.burst = float(burst)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, last refill)
        self.limited = 0

    def allow(self, ip: str) -> bool:
        if self.qps <= 0:
            return True
        now = self.clock()
        tokens, last = self.buckets.get(ip, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.qps)
        if tokens >= 1.0:
            self._put(ip, tokens - 1.0, now)
            return True
        self._put(ip, tokens, now)
        self.limited += 1
        return False

    def _put(self, ip: str, tokens: float, now: float) -> None:
        if len(self.buckets) >= _MEMO_LIMIT and ip not in self.buckets:
            # Forget full buckets first: a client that paused has nothing to remember.
            self.buckets = {k: v for k, v in self.buckets.items() if v[0] < self.burst - 1}
            if len(self.buckets) >= _MEMO_LIMIT:
                self.buckets.clear()
        self.buckets[ip] = (tokens, now)


class EdgePolicy:
    """What the listeners enforce before a query reaches the handler."""

    def __init__(
        self,
        max_inflight: int = 4096,
        rate_qps: float = 1000.0,
        rate_burst: int = 2000,
        refuse_udp: str = "silence",
        tcp_per_client: int = 32,
    ) -> None:
        self.max_inflight = max_inflight
        self.limiter = RateLimiter(rate_qps, rate_burst)
        self.refuse_udp = refuse_udp
        self.tcp_per_client = tcp_per_client
        self.overloaded = 0  # queries shed because max_inflight were running
        self.refused = 0  # queries from clients outside the allow list
