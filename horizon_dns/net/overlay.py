"""How the overlay stage asks the network for a host: mDNS, LLMNR, and known peers.

Contract: each lookup is ``await method(host, version, timeout) -> list[IPAddress]``
for one host label (``nodeb``) and one IP version (4 or 6); an empty list means
"not found by this method within timeout", None "nobody could be asked" (no
interface up, the network unreachable, no peers). Lookups never raise for network
trouble. The multicast ones raise :class:`horizon_dns.errors.LocalLimit`, having
sent nothing, when their shared :class:`~horizon_dns.net.oneshot.MulticastBudget`
refuses. They send only on the configured interfaces and to the configured peers.

* :class:`MdnsLookup` asks ``host.local`` on 224.0.0.251 / ff02::fb with one-shot
  queries from an ephemeral port (RFC 6762 §5.1), answered by unicast (§6.7);
* :class:`LlmnrLookup` asks ``host`` on 224.0.0.252 / ff02::1:3 (RFC 4795 §2);
  both send on the configured interfaces, first answer wins;
* :class:`PeerLookup` asks each known peer directly, for overlays without
  multicast (tailscale): LLMNR over TCP 5355 (RFC 4795 §2.4; systemd-resolved
  answers it) and a legacy unicast mDNS query to UDP 5353 (RFC 6762 §6.7; avahi
  answers it over IPv4), with bounded fan-out. The peer list comes from config,
  a file, or a command's output (``tailscale status --json``), refreshed
  periodically; a command that hangs or prints garbage keeps the last good list.
  Unicast: no multicast budget.

Packets per host (the stage asks IPv4 and IPv6 of a host concurrently), per
interface with an IPv4 and an IPv6 address: 4, where asking every question on both
groups took 8 (3 on an interface of one family). Which group answers what was measured in the lab (avahi 0.8,
systemd-resolved 252):

=================================  ==========================  ==========================
asked                              IPv4 group                  IPv6 group
=================================  ==========================  ==========================
avahi, mDNS, A / AAAA              A and AAAA                  AAAA only
resolved, mDNS, A / AAAA           A only                      AAAA only
resolved, LLMNR, A / AAAA          A only (AAAA: empty reply)  AAAA only (A: empty reply)
=================================  ==========================  ==========================

avahi answers AAAA over IPv4 (its default ``publish-aaaa-on-ipv4=yes``) but not A
over IPv6 (``publish-a-on-ipv6=no``); systemd-resolved keeps each family's records
in that family's scope. Hence (:func:`mdns_asks`, :func:`llmnr_asks`):

* mDNS: one query with both questions, A and AAAA (RFC 6762 §5.3 and §6 allow
  several questions in a query), on the IPv4 group -- the IPv6 group when the
  interface has no IPv4 address -- shared by the two per-version lookups of a host
  (:class:`~horizon_dns.net.oneshot.QueryPool`); plus AAAA alone on the IPv6 group
  when the interface has both families, for responders that answer AAAA only
  there (systemd-resolved). 2 packets.
* LLMNR: one question a message (RFC 4795 §2.1.1: QDCOUNT 1), so A and AAAA go
  apart, each on the group of its own family (the other one when the interface
  lacks it), since systemd-resolved answers nowhere else. 2 packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import shlex
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from dnslib import QTYPE, DNSRecord

from horizon_dns.llmnr.responder import Interface, build_query, usable_response
from horizon_dns.net.llmnr import query_tcp
from horizon_dns.net.oneshot import LLMNR, MDNS, MulticastBudget, QueryPool, SharedQuery
from horizon_dns.net.upstream import Upstream, exchange_udp

log = logging.getLogger("horizon_dns.net.overlay")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int, float], Awaitable[list[IPAddress] | None]]


async def first_found(asks: Sequence[Awaitable[list[IPAddress]]]) -> list[IPAddress]:
    """The first non-empty result of concurrent lookups; the others are cancelled."""
    tasks = [asyncio.ensure_future(ask) for ask in asks]
    try:
        for done in asyncio.as_completed(tasks):
            found = await done
            if found:
                return found
        return []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def addresses_in(reply: bytes, version: int, name: str) -> list[IPAddress]:
    """A/AAAA addresses of the wanted version owned by ``name`` in a DNS/LLMNR/mDNS reply.

    Records of other owners are left out: an mDNS responder may add records for
    other names of its own (RFC 6762 §6).
    """
    try:
        record = DNSRecord.parse(reply)
    except Exception:  # a peer's garbage is a miss, not an error
        return []
    wanted = QTYPE.A if version == 4 else QTYPE.AAAA
    owner = name.rstrip(".").lower()
    out: list[IPAddress] = []
    for rr in record.rr + record.ar:
        if rr.rtype == wanted and str(rr.rname).rstrip(".").lower() == owner:
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(str(rr.rdata)))
    return out


#: The shared queries one lookup needs on an interface: (group's family, question types).
Asks = list[tuple[int, tuple[int, ...]]]
Plan = Callable[[Interface, int], Asks]
Interfaces = Callable[[], list[Interface]]


def _families(interface: Interface) -> tuple[bool, bool]:
    """Whether the interface has an IPv4 and an IPv6 address (link-local counts:
    it is what IPv6 multicast leaves from)."""
    versions = {address.version for address in interface.addresses}
    return 4 in versions, 6 in versions


def mdns_asks(interface: Interface, version: int) -> Asks:
    """A and AAAA in one query on the IPv4 group (else IPv6); AAAA also on the IPv6
    group for IPv6 when the interface has both (see module for why)."""
    v4, v6 = _families(interface)
    if not (v4 or v6):
        return []
    asks: Asks = [(socket.AF_INET if v4 else socket.AF_INET6, (QTYPE.A, QTYPE.AAAA))]
    if version == 6 and v4 and v6:
        asks.append((socket.AF_INET6, (QTYPE.AAAA,)))
    return asks


def llmnr_asks(interface: Interface, version: int) -> Asks:
    """The question of ``version`` on the group of its own family, else the other one."""
    v4, v6 = _families(interface)
    qtype = QTYPE.A if version == 4 else QTYPE.AAAA
    if version == 4:
        family = socket.AF_INET if v4 else socket.AF_INET6 if v6 else None
    else:
        family = socket.AF_INET6 if v6 else socket.AF_INET if v4 else None
    return [] if family is None else [(family, (qtype,))]


async def ask_interfaces(
    pool: QueryPool,
    name: str,
    version: int,
    interfaces: list[Interface],
    timeout: float,
    plan: Plan,
) -> list[IPAddress] | None:
    """Ask ``pool``'s group for ``name`` on every interface as ``plan`` says; the first
    reply with addresses of ``version`` wins (an LLMNR reply without them ends that
    query: only the name's owner answers). None when no query could be sent;
    LocalLimit (nothing sent) when the pool's budget refuses."""
    asks = [(i, family, qtypes) for i in interfaces for family, qtypes in plan(i, version)]
    queries = pool.claim(name, asks, timeout)
    sent: list[bool] = []

    def pick(reply: bytes) -> list[IPAddress]:
        return addresses_in(reply, version, name)

    async def read(query: SharedQuery) -> list[IPAddress]:
        found = await query.first(pick, timeout)
        sent.append(found is not None)
        return found or []

    found = await first_found([read(query) for query in queries])
    return found if found or any(sent) else None


class MdnsLookup:
    """``host.local`` by one-shot mDNS queries (RFC 6762 §5.1) on the configured interfaces.

    Not through python-zeroconf's resolver: that one listens on the shared port
    5353, where unicast replies can land in another program's socket (see
    :mod:`horizon_dns.net.oneshot`). The lookups of both versions of a host share
    one query (see module); ``budget`` (None: unlimited) pays for the packets.
    """

    name = "mdns"

    def __init__(self, interfaces: Interfaces, budget: MulticastBudget | None = None) -> None:
        self.interfaces = interfaces
        self.budget = budget
        self.pool = QueryPool(MDNS, budget)

    async def __call__(self, host: str, version: int, timeout: float) -> list[IPAddress] | None:
        return await ask_interfaces(
            self.pool, f"{host}.local", version, self.interfaces(), timeout, mdns_asks
        )


class LlmnrLookup:
    """``host`` by LLMNR multicast on the configured interfaces; first answer wins.
    ``budget`` (None: unlimited) pays for the packets."""

    name = "llmnr"

    def __init__(self, interfaces: Interfaces, budget: MulticastBudget | None = None) -> None:
        self.interfaces = interfaces
        self.budget = budget
        self.pool = QueryPool(LLMNR, budget, usable_response)

    async def __call__(self, host: str, version: int, timeout: float) -> list[IPAddress] | None:
        return await ask_interfaces(self.pool, host, version, self.interfaces(), timeout, llmnr_asks)


def parse_peers(text: str) -> list[str]:
    """Peer addresses from a command's or file's output.

    Accepts ``tailscale status --json`` (``Peer.*.TailscaleIPs``, peers that are not
    ``Online`` left out), a JSON list of
    addresses, or text with one address per line (``#`` comments allowed).
    """
    text = text.strip()
    found: list[str] = []
    if text.startswith(("{", "[")):
        data = json.loads(text)
        if isinstance(data, dict):
            peers = data.get("Peer") or {}
            if not isinstance(peers, dict):
                raise ValueError("'Peer' is not an object")
            for peer in peers.values():
                # An offline peer cannot answer: asking it only holds a fan-out slot
                # for the whole lookup timeout while live peers wait.
                if isinstance(peer, dict) and peer.get("Online") is not False:
                    found.extend(str(ip) for ip in peer.get("TailscaleIPs") or [])
        elif isinstance(data, list):
            found.extend(str(ip) for ip in data)
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line.split()[0])
    out = []
    for item in found:
        ipaddress.ip_address(item)  # raises on garbage: the caller keeps the old list
        if item not in out:
            out.append(item)
    return out


class PeerLookup:
    """Ask known peers directly: LLMNR over TCP and legacy unicast mDNS, bounded fan-out."""

    name = "peers"

    def __init__(
        self,
        peers: Sequence[str] = (),
        peers_file: str = "",
        peers_command: str = "",
        refresh: float = 60.0,
        fanout: int = 16,
        command_timeout: float = 5.0,
    ) -> None:
        self.static = list(peers)
        self.peers_file = peers_file
        self.peers_command = peers_command
        self.refresh = refresh
        self.fanout = asyncio.Semaphore(fanout) if fanout else None
        self.fanout_size = fanout
        self.command_timeout = command_timeout
        self.dynamic: list[str] = []
        self.refresh_errors = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def peers(self) -> list[str]:
        return self.static + [p for p in self.dynamic if p not in self.static]

    async def start(self) -> None:
        self.fanout = asyncio.Semaphore(self.fanout_size)
        if self.peers_file or self.peers_command:
            await self.reload()
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            await self.reload()

    async def reload(self) -> None:
        """Re-read the peer list; on any failure keep the last good one."""
        try:
            if self.peers_command:
                text = await self._run_command()
            else:
                text = Path(self.peers_file).read_text()
            self.dynamic = parse_peers(text)
        except Exception as exc:  # a broken peer source must never stop lookups
            self.refresh_errors += 1
            source = self.peers_command or self.peers_file
            log.warning(
                "overlay peers: %s failed (%s); keeping %d known peers", source, exc, len(self.dynamic)
            )

    async def _run_command(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(self.peers_command),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), self.command_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TimeoutError(f"no output within {self.command_timeout} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}")
        return stdout.decode("utf-8", "replace")

    async def __call__(self, host: str, version: int, timeout: float) -> list[IPAddress] | None:
        peers = self.peers
        if not peers:
            return None
        qtype = QTYPE.A if version == 4 else QTYPE.AAAA
        return await first_found([self._ask(peer, host, qtype, version, timeout) for peer in peers])

    async def _ask(self, peer: str, host: str, qtype: int, version: int, timeout: float) -> list[IPAddress]:
        assert self.fanout is not None

        async def via(reply: Awaitable[bytes | None], name: str, llmnr: bool = False) -> list[IPAddress]:
            data = await reply
            if not data or (llmnr and not usable_response(data)):
                return []
            return addresses_in(data, version, name)

        async with self.fanout:
            asks = [via(query_tcp(peer, host, qtype, timeout), host, llmnr=True)]
            if ":" not in peer:  # avahi answers legacy unicast over IPv4 only
                mdns_name = f"{host}.local"
                asks.append(via(query_mdns_unicast(peer, mdns_name, qtype, timeout), mdns_name))
            return await first_found(asks)


async def query_mdns_unicast(peer: str, name: str, qtype: int, timeout: float) -> bytes | None:
    """A legacy unicast mDNS query (RFC 6762 §6.7): from a port other than 5353, to
    peer:5353, whose reply repeats our ID and question; None on no answer."""
    message = build_query(secrets.randbits(16), name, qtype)  # flags all zero: RFC 6762 §18
    try:
        return await exchange_udp(Upstream(peer, MDNS.port), message, len(message), timeout)
    except (OSError, TimeoutError):
        return None
