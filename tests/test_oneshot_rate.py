"""The multicast budget and the packets a host miss costs (horizon_dns.net.oneshot, net.overlay).

A flood of random unknown names starts one lookup per name; each miss used to send
8 multicast packets per interface. Unit tests drive the token bucket with a fake
clock and the lookups with a recording ``ask_group`` (nothing sent); the lab tests
count the datagrams node a really sends and check that a real avahi and a real
systemd-resolved still answer both versions through the fewer packets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dnslib import AAAA, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from helpers import FakeClock
from hypothesis import given
from hypothesis import strategies as st
from lab import ROOT, Lab, lab

from horizon_dns.errors import LocalLimit
from horizon_dns.llmnr.responder import Interface, build_query
from horizon_dns.net import oneshot
from horizon_dns.net.oneshot import LLMNR, MDNS, Group, MulticastBudget, ask_group, build_questions
from horizon_dns.net.overlay import IPAddress, LlmnrLookup, Lookup, MdnsLookup

V4 = ipaddress.ip_interface("100.64.0.1/24")
V6 = ipaddress.ip_interface("fd7a:115c:a1e0::1/64")
LINK6 = ipaddress.ip_interface("fe80::1/64")
DUAL = Interface("zt0", 7, (V4, V6, LINK6))
V4_ONLY = Interface("wg0", 8, (V4,))
V6_ONLY = Interface("zt6", 9, (V6, LINK6))


# The token bucket ------------------------------------------------------------


def test_budget_starts_full_and_refuses_beyond_the_burst() -> None:
    budget = MulticastBudget(rate=1.0, burst=3, clock=FakeClock())
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    assert (budget.sent, budget.limited) == (3, 1)


def test_budget_refills_at_its_rate_and_never_beyond_the_burst() -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=4.0, burst=8, clock=clock)
    assert budget.take(8)
    clock.now += 0.5  # 2 packets at 4/s
    assert budget.take(2) and not budget.take(1)
    clock.now += 3600  # an idle hour refills to the burst, no more
    assert budget.take(8) and not budget.take(1)
    assert (budget.sent, budget.limited) == (18, 2)


def test_budget_refills_whole_packets_despite_float_error() -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=50.0, burst=1, clock=clock)
    assert budget.take()
    for _ in range(100):
        clock.now += 0.02  # exactly one packet's worth, give or take float rounding
        assert budget.take(), clock.now
    assert (budget.sent, budget.limited) == (101, 0)


def test_budget_is_all_or_nothing_and_never_negative() -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=1.0, burst=3, clock=clock)
    assert not budget.take(4)  # more than it holds: nothing spent
    assert budget.tokens == 3
    assert budget.take(3)
    for _ in range(5):
        assert not budget.take(2)
        assert budget.tokens >= 0
    assert budget.take(0)  # a lookup that sends nothing costs nothing
    clock.now += 1
    assert budget.take(1)
    assert (budget.sent, budget.limited) == (4, 6)


def test_budget_a_clock_stepping_back_refills_nothing() -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=10.0, burst=2, clock=clock)
    assert budget.take(2)
    clock.now -= 50
    assert not budget.take()
    clock.now += 0.1  # from the stepped-back time on, time counts again
    assert budget.take() and not budget.take()


def test_budget_rejects_negative_settings() -> None:
    with pytest.raises(ValueError):
        MulticastBudget(rate=-1)
    with pytest.raises(ValueError):
        MulticastBudget(burst=-1)
    with pytest.raises(ValueError):
        MulticastBudget().take(-1)


def test_budget_default_clock_is_boottime() -> None:
    from horizon_dns.core import clock

    assert MulticastBudget().clock is clock.now


@given(
    st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 12)), max_size=60),
    st.floats(0, 100, allow_nan=False),
    st.integers(0, 20),
)
def test_budget_invariants_for_any_sequence(steps: list[tuple[float, int]], rate: float, burst: int) -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=rate, burst=burst, clock=clock)
    allowed = refused = 0
    for advance, packets in steps:
        clock.now += advance
        if budget.take(packets):
            allowed += packets
        else:
            refused += 1
        assert 0 <= budget.tokens <= burst
    assert (budget.sent, budget.limited) == (allowed, refused)
    # Never more than the burst plus what the elapsed time refilled (plus the float slack).
    assert budget.sent <= burst + rate * (clock.now - 1000.0) + 1e-6 * (len(steps) + 1)


# Lookups with a recording ask_group: nothing is sent -----------------------------


class Recorder:
    """Stands in for ask_group: records each query, delivers scripted replies, waits the window."""

    def __init__(self, replies: dict[str, list[bytes]] | None = None) -> None:
        self.replies = replies or {}
        self.sent: list[tuple[str, str, int, tuple[int, ...]]] = []
        self.cancelled = 0

    async def __call__(
        self,
        group: Group,
        name: str,
        qtype: int | tuple[int, ...],
        interface: Interface,
        window: float,
        family: int = socket.AF_INET,
        first: bool = False,
        accept: Callable[[bytes], bool] | None = None,
        on_reply: Callable[[str, bytes], None] | None = None,
    ) -> list[tuple[str, bytes]] | None:
        qtypes = (qtype,) if isinstance(qtype, int) else qtype
        self.sent.append((group.name, interface.name, family, qtypes))
        await asyncio.sleep(0)
        got = [("100.64.0.2", reply) for reply in self.replies.get(name, [])]
        for source, reply in got:
            if on_reply is not None:
                on_reply(source, reply)
        try:
            await asyncio.sleep(window)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return got


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    fake = Recorder()
    monkeypatch.setattr(oneshot, "ask_group", fake)
    yield fake


def both_versions(
    *methods: Lookup, host: str = "ghost", timeout: float = 0.05
) -> list[list[IPAddress] | None]:
    """What the overlay stage does for a name: IPv4 and IPv6 of the host, every method, at once."""

    async def main() -> list[list[IPAddress] | None]:
        return await asyncio.gather(
            *(method(host, version, timeout) for method in methods for version in (4, 6))
        )

    return asyncio.run(main())


AF = {int(socket.AF_INET): "v4", int(socket.AF_INET6): "v6"}


@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        (
            DUAL,
            [
                ("LLMNR", "v4", ("A",)),
                ("LLMNR", "v6", ("AAAA",)),
                ("mDNS", "v4", ("A", "AAAA")),
                ("mDNS", "v6", ("AAAA",)),
            ],
        ),
        (V4_ONLY, [("LLMNR", "v4", ("A",)), ("LLMNR", "v4", ("AAAA",)), ("mDNS", "v4", ("A", "AAAA"))]),
        (V6_ONLY, [("LLMNR", "v6", ("A",)), ("LLMNR", "v6", ("AAAA",)), ("mDNS", "v6", ("A", "AAAA"))]),
    ],
    ids=["dual-stack", "ipv4-only", "ipv6-only"],
)
def test_a_host_miss_costs_4_packets_not_8(
    recorder: Recorder, interface: Interface, expected: list[tuple[str, str, tuple[str, ...]]]
) -> None:
    budget = MulticastBudget(clock=FakeClock())
    mdns, llmnr = MdnsLookup(lambda: [interface], budget), LlmnrLookup(lambda: [interface], budget)
    assert both_versions(mdns, llmnr) == [[], [], [], []]
    sent = sorted((g, AF[f], tuple(QTYPE[t] for t in q)) for g, _i, f, q in recorder.sent)
    assert sent == sorted(expected)
    assert budget.sent == len(expected) and budget.limited == 0
    assert not mdns.pool.inflight and not llmnr.pool.inflight


def test_every_interface_is_asked_and_paid_for(recorder: Recorder) -> None:
    budget = MulticastBudget(clock=FakeClock())
    mdns = MdnsLookup(lambda: [DUAL, V4_ONLY, Interface("down0", 3, ())], budget)
    both_versions(mdns)
    assert sorted(i for _g, i, _f, _q in recorder.sent) == ["wg0", "zt0", "zt0"]
    assert budget.sent == 3


def mdns_reply(name: str, *addresses: str) -> bytes:
    reply = DNSRecord(DNSHeader(id=0, qr=1, aa=1))
    for address in addresses:
        rdata = A(address) if ":" not in address else AAAA(address)
        reply.add_answer(RR(name, QTYPE.A if ":" not in address else QTYPE.AAAA, rdata=rdata, ttl=120))
    return bytes(reply.pack())


def test_both_versions_read_their_own_records_from_one_shared_query(recorder: Recorder) -> None:
    recorder.replies["nodeb.local"] = [mdns_reply("nodeb.local", "fd7a:115c:a1e0::2", "100.64.0.2")]
    mdns = MdnsLookup(lambda: [V4_ONLY])
    v4, v6 = both_versions(mdns, host="nodeb", timeout=5)
    assert v4 == [ipaddress.ip_address("100.64.0.2")]
    assert v6 == [ipaddress.ip_address("fd7a:115c:a1e0::2")]
    assert len(recorder.sent) == 1  # one query, two readers
    # Both found at once: the query stops listening long before its 5 s window.
    assert recorder.cancelled == 1 and not mdns.pool.inflight


def test_a_found_version_does_not_cut_off_the_other(recorder: Recorder) -> None:
    """The IPv4 lookup is done at the first reply; the IPv6 one keeps the query open."""
    recorder.replies["nodeb.local"] = [mdns_reply("nodeb.local", "100.64.0.2")]
    mdns = MdnsLookup(lambda: [V4_ONLY])

    async def main() -> tuple[list[IPAddress] | None, list[IPAddress] | None]:
        v6 = asyncio.ensure_future(mdns("nodeb", 6, 0.1))
        v4 = await mdns("nodeb", 4, 0.1)
        assert not v6.done()  # still listening for an AAAA
        return v4, await v6

    v4, v6 = asyncio.run(main())
    assert v4 == [ipaddress.ip_address("100.64.0.2")] and v6 == []
    assert len(recorder.sent) == 1 and recorder.cancelled == 0  # ran out its window


def test_an_empty_llmnr_answer_is_final(recorder: Recorder) -> None:
    """Only the owner of a name answers LLMNR: its answer without AAAA means it has none."""
    recorder.replies["nodec"] = [mdns_reply("nodec")]
    llmnr = LlmnrLookup(lambda: [V4_ONLY])
    assert asyncio.run(llmnr("nodec", 6, 5)) == []
    assert recorder.cancelled == 1  # not waited out


@pytest.mark.parametrize("method", [MdnsLookup, LlmnrLookup])
def test_over_budget_a_lookup_raises_local_limit_and_sends_nothing(
    recorder: Recorder, method: type[MdnsLookup] | type[LlmnrLookup]
) -> None:
    clock = FakeClock()
    budget = MulticastBudget(rate=1.0, burst=3, clock=clock)
    lookup = method(lambda: [DUAL], budget)
    both_versions(lookup)  # 2 packets of 3
    recorder.sent.clear()
    with pytest.raises(LocalLimit, match="multicast budget"):
        both_versions(lookup)  # the first version takes the last packet, the second needs more
    assert len(recorder.sent) == 1 and budget.limited == 1
    recorder.sent.clear()
    with pytest.raises(LocalLimit):
        asyncio.run(lookup("ghost2", 4, 0.05))
    assert recorder.sent == [] and budget.limited == 2 and budget.tokens == 0
    clock.now += 1  # the bucket refills: lookups send again
    assert asyncio.run(lookup("ghost3", 4, 0.05)) == []
    assert len(recorder.sent) == 1


def test_a_lookup_with_nothing_to_send_costs_nothing_even_over_budget(recorder: Recorder) -> None:
    budget = MulticastBudget(rate=0.0, burst=0, clock=FakeClock())
    assert asyncio.run(MdnsLookup(lambda: [], budget)("ghost", 4, 0.05)) is None  # nobody asked
    assert budget.limited == 0


def test_without_a_budget_lookups_are_unlimited(recorder: Recorder) -> None:
    mdns, llmnr = MdnsLookup(lambda: [DUAL]), LlmnrLookup(lambda: [DUAL])
    for i in range(200):
        both_versions(mdns, llmnr, host=f"ghost{i}", timeout=0)
    assert len(recorder.sent) == 200 * 4


# The messages --------------------------------------------------------------------


def test_one_mdns_query_carries_both_questions() -> None:
    parsed = DNSRecord.parse(build_questions(0x1234, "nodeb.local", (QTYPE.A, QTYPE.AAAA)))
    assert parsed.header.id == 0x1234 and parsed.header.qr == 0 and parsed.header.bitmap == 0
    assert parsed.questions == [DNSQuestion("nodeb.local", QTYPE.A), DNSQuestion("nodeb.local", QTYPE.AAAA)]
    assert build_questions(7, "nodeb", (QTYPE.A,)) == build_query(7, "nodeb", QTYPE.A)


def test_llmnr_never_sends_two_questions_in_one_message() -> None:
    """RFC 4795 §2.1.1: QDCOUNT must be 1; responders discard anything else."""
    with pytest.raises(ValueError, match="LLMNR takes 1 to 1 questions"):
        asyncio.run(ask_group(LLMNR, "nodeb", (QTYPE.A, QTYPE.AAAA), DUAL, 0.1))
    assert MDNS.questions > 1


# The lab: real sockets, real avahi and systemd-resolved ----------------------------------

COUNT = """
import asyncio, json, socket, struct, sys
sys.path.insert(0, sys.argv[1])
from dnslib import QTYPE, DNSRecord
from horizon_dns.errors import LocalLimit
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.oneshot import MulticastBudget
from horizon_dns.net.overlay import LlmnrLookup, MdnsLookup

GROUPS = [("224.0.0.251", 5353), ("224.0.0.252", 5355), ("ff02::fb", 5353), ("ff02::1:3", 5355)]

def listener(group, port, eth0, v4):
    # Joined on eth0 in this node: the kernel loops back a copy of every datagram the
    # node sends to the group (IP_MULTICAST_LOOP is on by default).
    family = socket.AF_INET6 if ":" in group else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((group, port, 0, eth0.index))
        join = socket.inet_pton(family, group) + struct.pack("@I", eth0.index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, join)
    else:
        sock.bind((group, port))
        join = socket.inet_aton(group) + socket.inet_aton(v4)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, join)
    sock.setblocking(False)
    return sock

async def miss(host, budget, interfaces):
    mdns, llmnr = MdnsLookup(lambda: interfaces, budget), LlmnrLookup(lambda: interfaces, budget)
    results = await asyncio.gather(
        *(m(host, v, 0.3) for m in (mdns, llmnr) for v in (4, 6)), return_exceptions=True
    )
    return [r if isinstance(r, list) else type(r).__name__ for r in results]

async def main():
    interfaces = list_interfaces(["eth0"])
    eth0 = interfaces[0]
    v4 = str(next(a.ip for a in eth0.addresses if a.version == 4))
    loop = asyncio.get_running_loop()
    seen = {}
    for group, port in GROUPS:
        sock = listener(group, port, eth0, v4)
        def readable(sock=sock, group=group):
            while True:
                try:
                    data, _source = sock.recvfrom(9000)
                except OSError:
                    return
                msg = DNSRecord.parse(data)
                names = {str(q.qname).rstrip(".").split(".")[0] for q in msg.questions}
                if msg.header.qr == 0 and len(names) == 1:
                    types = "+".join(QTYPE[q.qtype] for q in msg.questions)
                    seen.setdefault(names.pop(), []).append(group + " " + types)
        loop.add_reader(sock.fileno(), readable)
    out = {}
    out["free"] = await miss("ghost-free", MulticastBudget(), interfaces)
    out["spent"] = await miss("ghost-spent", MulticastBudget(rate=0, burst=0), interfaces)
    await asyncio.sleep(0.3)
    out["packets"] = {host: sorted(packets) for host, packets in seen.items()}
    print(json.dumps(out))

asyncio.run(main())
"""

ANSWERS = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.oneshot import MulticastBudget
from horizon_dns.net.overlay import LlmnrLookup, MdnsLookup

async def main():
    budget = MulticastBudget()
    interfaces = lambda: list_interfaces(["eth0"])
    methods = {"mdns": MdnsLookup(interfaces, budget), "llmnr": LlmnrLookup(interfaces, budget)}
    out = {}
    for method, host in (("mdns", "nodeb"), ("llmnr", "nodec"), ("mdns", "noded")):
        # Both versions at once, as the overlay stage asks them.
        found = await asyncio.gather(*(methods[method](host, v, 0.5) for v in (4, 6)))
        out[f"{method} {host}"] = [[str(a) for a in f or []] for f in found]
    out["sent"] = budget.sent
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def rate_lab() -> Iterator[Lab]:
    # b: avahi (mDNS); c: systemd-resolved's LLMNR responder; d: systemd-resolved's
    # mDNS responder (LLMNR off), which answers A only on 224.0.0.251, AAAA only on ff02::fb.
    with lab("hzrl", "a b c d") as the_lab:
        the_lab.run("start-avahi.sh", "b", timeout=60)
        the_lab.run("start-resolved.sh", "c", "--dns", "127.0.0.1:9", timeout=60)
        the_lab.run(
            "start-resolved.sh", "d", "--dbus", "--dns", "127.0.0.1:9", "--llmnr", "no", "--mdns", "yes",
            timeout=60,
        )  # fmt: skip
        bus = "DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/hzrl/d/resolved/dbus/system_bus_socket"
        the_lab.exec("d", "env", bus, "resolvectl", "mdns", "eth0", "yes", check=True)
        yield the_lab


def _child(the_lab: Lab, script: str) -> dict[str, Any]:
    result = the_lab.exec("a", sys.executable, "-c", script, str(ROOT), timeout=30)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.lab
def test_lab_a_host_miss_sends_4_datagrams_and_none_over_budget(rate_lab: Lab) -> None:
    out = _child(rate_lab, COUNT)
    assert out["free"] == [[], [], [], []]
    packets = out["packets"]
    print(
        f"\npackets for one host miss (both versions, mDNS + LLMNR, dual-stack eth0): {packets['ghost-free']}"
    )
    assert packets["ghost-free"] == [
        "224.0.0.251 A+AAAA",  # mDNS: both questions in one query, shared by both versions
        "224.0.0.252 A",  # LLMNR: one question a message, on its own family's group
        "ff02::1:3 AAAA",
        "ff02::fb AAAA",  # mDNS AAAA for responders that answer it only over IPv6
    ]
    assert out["spent"] == ["LocalLimit"] * 4
    assert "ghost-spent" not in packets


@pytest.mark.lab
def test_lab_avahi_and_resolved_answer_both_versions_through_fewer_packets(rate_lab: Lab) -> None:
    out = _child(rate_lab, ANSWERS)
    assert out["mdns nodeb"] == [["100.64.0.2"], ["fd7a:115c:a1e0::2"]], out  # avahi
    for key, n in (("llmnr nodec", 3), ("mdns noded", 4)):  # resolved: LLMNR, mDNS
        v4, v6 = out[key]
        assert v4 == [f"100.64.0.{n}"] and f"fd7a:115c:a1e0::{n}" in v6, out
    assert out["sent"] == 6
