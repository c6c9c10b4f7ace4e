"""The ``forward`` stage: relay the query, as wire bytes, to upstream DNS servers.

YAML::

    - forward:
        upstreams: [127.0.0.1:5301, "[::1]:53", "tls://9.9.9.9#dns.quad9.net", resolv.conf]
        policy: sequential          # or random, fastest (smoothed RTT)
        timeout: 1.0                # seconds per try
        total_timeout: 3.0          # seconds for the whole query, over all tries
        max_outstanding: 512        # queries upstream at once; beyond, SERVFAIL at once
        tls_ca: /path/ca.pem        # for tls:// upstreams; default: the system store

``resolv.conf`` stands for the ``nameserver`` lines of /etc/resolv.conf.

Each try uses a fresh random ID and source port; replies are checked for
source, ID and question (see :mod:`horizon_dns.net.upstream`). A truncated UDP
reply is retried over TCP. A FORMERR to our query (which carries OPT) is asked once
more without OPT, for servers without EDNS (RFC 6891 §7); the client never sees
that FORMERR. A try that times out, fails, or answers SERVFAIL, REFUSED or (without
OPT) FORMERR moves on to the next upstream; three failures in a row mark an
upstream down, and it is tried again after a back-off (1 s doubling to 30 s) -- or
at once when every upstream is down. REFUSED and FORMERR are answers, not signs
of ill health: they move on but never mark the upstream down. When all fail within
``total_timeout`` the reply is SERVFAIL with the Extended DNS Error an upstream's
SERVFAIL carried, else 22, "No Reachable Authority" (RFC 8914 §4.23), with a
generic text: what each upstream did goes to the log and ``explain``, not to
clients (RFC 8914 §6).

What is relayed is what a forwarder may say (RFC 1035 §4.1.1, RFC 2181 §8,
RFC 2308 §5): AA cleared, TTLs with the high bit set as 0, and a negative answer's
SOA TTL lowered to min(SOA TTL, SOA MINIMUM). The answer is final: its CNAMEs are
not chased again (the upstream recursed already).

At start the stage probes each upstream with a random name; if the probe comes
back to this server, that upstream forwards to us (a loop, e.g. resolv.conf ->
127.0.0.53 -> us) and is disabled with a logged error (CoreDNS's ``loop`` idea).

EDNS: we ask with EDNS (payload 1232) and pass the client's DO and CD
bits; the client's ID and question case are restored on the way back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from horizon_dns.config.source import Section, as_str, int_range, item_node, number_range
from horizon_dns.core.edns import EDE_NO_REACHABLE_AUTHORITY, encode_opt
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.names import text_to_name
from horizon_dns.core.packed import DEFAULT_UDP_PAYLOAD, Packed, bounded_ttls, from_upstream
from horizon_dns.core.stage import Next
from horizon_dns.core.stats import SHED_HELP, Sample, counter, gauge
from horizon_dns.core.wire import (
    AA,
    AD,
    CD,
    CLASS_IN,
    FORMERR,
    HEADER,
    NOERROR,
    NXDOMAIN,
    RD,
    REFUSED,
    SERVFAIL,
    TC,
)
from horizon_dns.net.dot import DotPool
from horizon_dns.net.upstream import Upstream, exchange_tcp, exchange_udp, parse_upstream
from horizon_dns.stages.context import BuildContext

log = logging.getLogger("horizon_dns.stages.forward")

#: What clients are told when no upstream answered; the details go to the log
#: (RFC 8914 §6: EXTRA-TEXT must not leak what an attacker could use).
UNREACHABLE_TEXT = "no upstream answered"
FAILURES_TO_MARK_DOWN = 3
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0

#: (upstream, message, question_end, timeout) -> reply bytes; replaceable in tests.
Exchange = Callable[[Upstream, bytes, int, float], Awaitable[bytes]]


@dataclass(slots=True)
class UpstreamState:
    """Health and speed of one upstream, as this stage has seen them."""

    upstream: Upstream
    srtt: float = 0.0  # smoothed RTT in seconds; 0 until measured
    failures: int = 0
    down_until: float = 0.0
    backoff: float = BACKOFF_MIN
    disabled: str = ""  # why it is never used (a forwarding loop)
    queries: int = 0
    errors: int = 0

    def usable(self, now: float) -> bool:
        return not self.disabled and now >= self.down_until

    @property
    def marked_down(self) -> bool:
        """Disabled, or failed FAILURES_TO_MARK_DOWN times in a row."""
        return bool(self.disabled) or self.failures >= FAILURES_TO_MARK_DOWN

    def succeeded(self, rtt: float) -> None:
        self.srtt = rtt if self.srtt == 0 else 0.7 * self.srtt + 0.3 * rtt
        self.failures = 0
        self.backoff = BACKOFF_MIN
        self.down_until = 0.0

    def failed(self, now: float) -> None:
        self.errors += 1
        self.failures += 1
        if self.failures >= FAILURES_TO_MARK_DOWN:
            self.down_until = now + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)


def _outcome(packed: Packed) -> Outcome:
    if packed.rcode == NOERROR:
        return Outcome.ANSWER if packed.ancount else Outcome.NODATA
    if packed.rcode == NXDOMAIN:
        return Outcome.NXDOMAIN
    if packed.rcode == REFUSED:
        return Outcome.REFUSED
    if packed.rcode == SERVFAIL:
        return Outcome.FAILED
    return Outcome.OTHER


class ForwardStage:
    """Relays queries to upstream servers; answers SERVFAIL+EDE when none answers."""

    recurses = True
    network = True  # `explain --offline` leaves it out

    def __init__(
        self,
        name: str,
        upstreams: list[Upstream],
        policy: str = "sequential",
        timeout: float = 1.0,
        total_timeout: float = 3.0,
        guard: LoopGuard | None = None,
        tls_ca: str | None = None,
        exchange_udp_: Exchange = exchange_udp,
        exchange_tcp_: Exchange = exchange_tcp,
        max_outstanding: int = 512,
    ) -> None:
        self.name = name
        self.max_outstanding = max_outstanding
        self.outstanding = 0
        self.shed = 0
        self.states = [UpstreamState(u) for u in upstreams]
        self.policy = policy
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.guard = guard
        self.tls_ca = tls_ca
        self._udp = exchange_udp_
        self._tcp = exchange_tcp_
        self._tls: DotPool | None = None  # made in start(): it needs a running loop
        self._probe_task: asyncio.Task[None] | None = None

    # Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if any(s.upstream.tls_name for s in self.states):
            self._tls = DotPool(self._ssl_context())
        if self.guard is not None and self.states:
            self._probe_task = asyncio.get_running_loop().create_task(self.probe_loops())

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self._tls is not None:
            await self._tls.close()

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.tls_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def stats(self, zone: str) -> Iterator[Sample]:
        """Per upstream: queries, failed tries, smoothed RTT, up; and work shed at the cap."""
        for state in self.states:
            labels = {"stage": self.name, "upstream": str(state.upstream)}
            yield counter("upstream_queries", "Queries sent upstream.", state.queries, **labels)
            yield counter("upstream_failures", "Failed upstream tries.", state.errors, **labels)
            yield gauge("upstream_rtt_seconds", "Smoothed upstream RTT.", state.srtt, **labels)
            yield gauge(
                "upstream_up", "1 unless marked down or disabled.", 0 if state.marked_down else 1, **labels
            )
        yield counter("stage_shed", SHED_HELP, self.shed, stage=self.name)

    async def probe_loops(self, wait: float = 2.0) -> None:
        """Send a random name to each upstream; one that brings it back to us is a loop."""
        guard = self.guard
        assert guard is not None
        names = {}
        for state in self.states:
            name = f"{secrets.token_hex(8)}.horizon-dns-loop-probe."
            names[name] = state
            guard.probes[name] = str(state.upstream)
        try:
            probes = [self._probe(name, state, wait) for name, state in names.items()]
            await asyncio.gather(*probes, return_exceptions=True)
        finally:
            for name in names:
                guard.probes.pop(name, None)
        for state in self.states:
            if str(state.upstream) in guard.looped:
                state.disabled = "forwarding loop: it sends our queries back to this server"
                log.error(
                    "%s: upstream %s forwards back to this server (a loop); it is disabled. "
                    "Remove it from 'upstreams', or stop it forwarding to horizon-dns.",
                    self.name,
                    state.upstream,
                )

    async def _probe(self, name: str, state: UpstreamState, wait: float) -> None:
        question = text_to_name(name) + struct.pack("!HH", 13, 1)  # HINFO, as CoreDNS's loop
        message = self._message(secrets.randbits(16), RD, question, False)
        await self._exchange(state.upstream, message, HEADER.size + len(question), wait)

    # Queries -----------------------------------------------------------------

    def _order(self, now: float) -> list[UpstreamState]:
        states = [s for s in self.states if not s.disabled]
        if self.policy == "random":
            states = random.sample(states, len(states))
        elif self.policy == "fastest":
            states = sorted(states, key=lambda s: s.srtt)
        usable = [s for s in states if s.usable(now)]
        # Every upstream down: try them anyway rather than fail without asking.
        return usable or states

    @staticmethod
    def _message(msg_id: int, flags: int, question: bytes, do: bool, edns: bool = True) -> bytes:
        """Our query; with OPT unless ``edns`` is False (the RFC 6891 §7 fallback)."""
        if not edns:
            return HEADER.pack(msg_id, flags, 1, 0, 0, 0) + question
        header = HEADER.pack(msg_id, flags, 1, 0, 0, 1)
        return header + question + encode_opt(DEFAULT_UDP_PAYLOAD, 0, do, None)

    async def _exchange(self, upstream: Upstream, message: bytes, question_end: int, timeout: float) -> bytes:
        if upstream.tls_name is not None:
            assert self._tls is not None, "start() makes the TLS pool"
            return await self._tls.exchange(upstream, message, question_end, timeout)
        data = await self._udp(upstream, message, question_end, timeout)
        if len(data) > 2 and data[2] & (TC >> 8):
            # RFC 7766 §5: a truncated UDP answer is asked again over TCP.
            data = await self._tcp(upstream, message, question_end, timeout)
        return data

    async def handle(self, query: Query, next: Next) -> Reply:
        if query.qclass != CLASS_IN:
            # CHAOS and the rest are the answering server's own business (RFC 4892 §2):
            # relayed, version.bind would tell clients which software the upstream runs.
            query.note(f"  class {query.class_name} is not forwarded -> next")
            return await next(query)
        if self.outstanding >= self.max_outstanding:
            # Bounded resources: a flood of misses must not open sockets without end. Our
            # own limit, so final: no zone fallback answers in its place (DECISIONS.md 1).
            self.shed += 1
            query.note(f"  {self.outstanding} queries already upstream -> SERVFAIL, final")
            return Reply(
                SERVFAIL, self.name, Outcome.FAILED, f"{self.name}:overloaded",
                ede=(EDE_NO_REACHABLE_AUTHORITY, "too many queries upstream"), cacheable=False, final=True,
            )  # fmt: skip
        self.outstanding += 1
        try:
            return await self._forward(query)
        finally:
            self.outstanding -= 1

    async def _forward(self, query: Query) -> Reply:
        loop_time = time.monotonic
        deadline = loop_time() + self.total_timeout
        question = query.question
        question_end = HEADER.size + len(question)
        do = query.edns.do if query.edns is not None else False
        flags = RD | (query.flags & CD)
        problems: list[str] = []
        upstream_ede: tuple[int, str] | None = None
        for state in self._order(loop_time()):
            remaining = deadline - loop_time()
            if remaining <= 0:
                problems.append("total timeout")
                break
            upstream = state.upstream
            message = self._message(secrets.randbits(16), flags, question, do)
            state.queries += 1
            started = loop_time()
            try:
                data = await self._exchange(upstream, message, question_end, min(self.timeout, remaining))
                if _rcode(data) == FORMERR:
                    # RFC 6891 §7: a server without EDNS may answer FORMERR to a query
                    # with OPT (often with no question section): ask once without OPT.
                    query.note(f"  {upstream}: FORMERR to a query with OPT -> again without EDNS")
                    remaining = deadline - loop_time()
                    if remaining <= 0:
                        raise TimeoutError
                    message = self._message(secrets.randbits(16), flags, question, do, edns=False)
                    data = await self._exchange(upstream, message, question_end, min(self.timeout, remaining))
                    if _rcode(data) == FORMERR:
                        # It answers; it will not take this question (a meta-type such
                        # as TYPE41, say). Like REFUSED: the next upstream, no ill health
                        # -- a client must not be able to mark our upstreams down.
                        problems.append(f"{upstream} FORMERR")
                        query.note(f"  {upstream}: FORMERR without EDNS too -> next upstream")
                        continue
                packed = from_upstream(data, question_end)
            except TimeoutError:
                state.failed(loop_time())
                problems.append(f"{upstream} timed out")
                query.note(f"  {upstream}: timeout")
                continue
            except (OSError, ValueError, ConnectionError, ssl.SSLError) as exc:
                state.failed(loop_time())
                problems.append(f"{upstream} {type(exc).__name__}: {exc}")
                query.note(f"  {upstream}: {exc}")
                continue
            if packed.rcode == REFUSED:
                # It answers: not a health failure (it may just not serve this name),
                # so it is never marked down for it; the next upstream may know the name.
                problems.append(f"{upstream} REFUSED")
                query.note(f"  {upstream}: REFUSED -> next upstream")
                continue
            if packed.rcode == SERVFAIL:
                state.failed(loop_time())
                if upstream_ede is None and packed.ede is not None:
                    upstream_ede = (packed.ede[0], packed.ede[1][:200])
                problems.append(f"{upstream} SERVFAIL" + (f" (EDE {packed.ede[0]})" if packed.ede else ""))
                query.note(f"  {upstream}: SERVFAIL -> next upstream")
                continue
            state.succeeded(loop_time() - started)
            query.note(f"  {upstream}: rcode {packed.rcode}, {packed.ancount} answer(s)")
            return Reply(
                packed.rcode, self.name, _outcome(packed), f"{self.name}", packed=_relayed(packed, do)
            )
        if not problems:
            problems.append("no usable upstream")
        text = "; ".join(problems)
        query.note(f"  all upstreams failed: {text}")
        # The details stay here (RFC 8914 §6); clients get a generic text.
        log.info("%s: no upstream answered %s %s: %s", self.name, query.name, query.type_name, text)
        return Reply(
            SERVFAIL,
            self.name,
            Outcome.FAILED,
            f"{self.name}:unreachable",
            ede=upstream_ede or (EDE_NO_REACHABLE_AUTHORITY, UNREACHABLE_TEXT),
        )


def _rcode(data: bytes) -> int:
    """The header's 4-bit rcode (a message too short to have one counts as FORMERR)."""
    return data[3] & 0xF if len(data) >= HEADER.size else FORMERR


def _relayed(packed: Packed, do: bool) -> Packed:
    """An upstream's reply as a forwarder relays it: not authoritative (RFC 1035 §4.1.1:
    AA is for a server's own data), AD only to a client that asked with DO (RFC 6840
    §5.8; the cache keeps DO and non-DO answers apart), TTLs with the high bit set as 0
    (RFC 2181 §8), a negative answer's SOA TTL as its negative TTL (RFC 2308 §5), and
    final: its CNAMEs are not chased again (RFC 1034 §4.3.2 is for a server's own data)."""
    flags = packed.flags & ~(AA if do else AA | AD)
    return replace(bounded_ttls(packed), flags=flags, final=True)


# Building from configuration ---------------------------------------------------

RESOLV_CONF = Path("/etc/resolv.conf")


def resolv_conf_upstreams(path: Path = RESOLV_CONF) -> list[Upstream]:
    """The ``nameserver`` lines of resolv.conf, as upstreams (port 53)."""
    out: list[Upstream] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(parse_upstream(parts[1].split("%")[0]))
            except ValueError:
                continue
    return out


def build(section: Section, ctx: BuildContext) -> ForwardStage | None:
    errors_before = section.where.error_count()
    name = f"forward:{section.get('name', as_str, default=ctx.zone.rstrip('.') or 'root')}"
    upstreams: list[Upstream] = []
    node = section.node_of("upstreams")
    texts = section.string_list("upstreams", hint="e.g. upstreams: [127.0.0.1:5301, '[::1]:53']")
    for i, text in enumerate(texts):
        if text == "resolv.conf":
            found = resolv_conf_upstreams()
            if not found:
                section.where.child("upstreams").child(i).warn(
                    item_node(node, i), f"{RESOLV_CONF} lists no usable nameserver"
                )
            upstreams.extend(u for u in found if u not in upstreams)
            continue
        try:
            upstreams.append(parse_upstream(text))
        except ValueError as exc:
            section.where.child("upstreams").child(i).error(item_node(node, i), str(exc))
    if node is not None and not texts:
        section.where.child("upstreams").error(
            node,
            "no upstreams: every query would get SERVFAIL",
            "e.g. upstreams: [resolv.conf] or [127.0.0.1:5301]",
        )
    policy = section.get("policy", as_str, default="sequential")
    if policy not in ("sequential", "random", "fastest"):
        section.where.child("policy").error(
            section.node_of("policy"), f"unknown policy {policy!r}", "use sequential, random or fastest"
        )
    timeout = section.get("timeout", number_range(0.01, 60), default=1.0)
    total = section.get("total_timeout", number_range(0.01, 300), default=3.0)
    tls_ca = section.get("tls_ca", as_str, default="")
    max_outstanding = section.get("max_outstanding", int_range(1, 100_000), default=512)
    if tls_ca and not Path(tls_ca).is_file():
        section.where.child("tls_ca").error(section.node_of("tls_ca"), f"CA file {tls_ca} does not exist")
    section.finish()
    if section.where.error_count() != errors_before:
        return None
    return ForwardStage(
        name, upstreams, policy, timeout, total, ctx.guard, tls_ca or None, max_outstanding=max_outstanding
    )
