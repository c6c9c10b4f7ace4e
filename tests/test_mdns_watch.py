"""The mDNS watcher: its wire walker on hand-built responses, and real sockets.

* :func:`hosts_in` on hand-built messages (goodbye, announcement, compression,
  everything it must ignore), differentially against dnslib on generated
  responses, and never raising on arbitrary bytes;
* the watcher on loopback (IPv4): multicast seen, unicast to 5353 never taken,
  wrong source port and oversized datagrams dropped;
* the lab: real avahi on node b stopping (goodbye, RFC 6762 §10.1) and starting
  (announcement, §8.3), watched from node a while avahi runs in node a as well.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import AAAA, PTR, QTYPE, RR, TXT, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from lab import ROOT, Lab, lab

from horizon_dns.llmnr.responder import Interface
from horizon_dns.net.mdns_watch import MAX_DATAGRAM, MdnsWatcher, hosts_in

# Hand-built wire format -------------------------------------------------------

QR_AA = 0x8400


def name(*labels: str | bytes) -> bytes:
    out = b""
    for label in labels:
        raw = label.encode() if isinstance(label, str) else label
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def pointer(offset: int) -> bytes:
    return struct.pack("!H", 0xC000 | offset)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = 0x8001) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def message(
    answers: list[bytes],
    flags: int = QR_AA,
    questions: Sequence[bytes] = (),
    authority: Sequence[bytes] = (),
    additional: Sequence[bytes] = (),
) -> bytes:
    header = struct.pack("!HHHHHH", 0, flags, len(questions), len(answers), len(authority), len(additional))
    return header + b"".join([*questions, *answers, *authority, *additional])


V4 = bytes([100, 64, 0, 2])
V6 = ipaddress.ip_address("fd7a:115c:a1e0::2").packed


def test_goodbye_is_a_record_with_ttl_zero() -> None:
    assert hosts_in(message([rr(name("nodeb", "local"), 1, 0, V4)])) == [("nodeb", True)]


def test_announcement_reports_each_host_once_lowercased() -> None:
    data = message(
        [rr(name("NodeB", "LOCAL"), 1, 120, V4), rr(name("nodeb", "local"), 28, 120, V6)],
        additional=[rr(name("printer", "local"), 28, 120, V6)],
    )
    assert hosts_in(data) == [("nodeb", False), ("printer", False)]


def test_goodbye_and_announcement_in_one_datagram_are_both_reported_in_order() -> None:
    # An address change: the old address said goodbye, the new one announced.
    data = message([rr(name("nodeb", "local"), 1, 0, V4), rr(name("nodeb", "local"), 1, 120, bytes(4))])
    assert hosts_in(data) == [("nodeb", True), ("nodeb", False)]


def test_queries_are_ignored_even_with_known_answers() -> None:
    question = name("nodeb", "local") + struct.pack("!HH", 1, 1)
    known_answer = rr(name("nodeb", "local"), 1, 120, V4)
    assert hosts_in(message([known_answer], flags=0, questions=[question])) == []


@pytest.mark.parametrize(
    "owner",
    [
        name("a", "b", "local"),
        name("nodeb", "local", "x"),
        name("nodeb", "example"),
        name("local"),
        name("nodeb"),
        name(),
        name("no.deb", "local"),  # a dot inside the label
        name(b"\xff\xfe", "local"),  # not UTF-8
    ],
)
def test_only_one_label_dot_local_owners_count(owner: bytes) -> None:
    assert hosts_in(message([rr(owner, 1, 0, V4), rr(name("ok", "local"), 1, 0, V4)])) == [("ok", True)]


def test_only_a_and_aaaa_records_of_class_in_with_the_right_length_count() -> None:
    owner = name("nodeb", "local")
    data = message(
        [
            rr(owner, 12, 0, name("x", "local")),  # PTR
            rr(owner, 16, 0, b"\x03abc"),  # TXT
            rr(owner, 33, 0, struct.pack("!HHH", 0, 0, 80) + owner),  # SRV
            rr(owner, 1, 0, V4, rclass=3),  # class CH
            rr(owner, 1, 0, V4 + b"\x00"),  # A with 5 bytes
            rr(owner, 28, 0, V4),  # AAAA with 4 bytes
        ]
    )
    assert hosts_in(data) == []
    assert hosts_in(message([rr(owner, 1, 0, V4, rclass=1)])) == [("nodeb", True)]  # no cache-flush bit


def test_non_ascii_labels_are_lowercased_for_ascii_only() -> None:
    # RFC 6762 §16: case-insensitive for ASCII letters; other bytes compared as they are.
    owner = name("NÖDE".encode(), "local")
    assert hosts_in(message([rr(owner, 1, 120, V4)])) == [("nÖde", False)]


def test_authority_section_and_questions_are_skipped() -> None:
    question = name("x", "local") + struct.pack("!HH", 255, 1)
    data = message(
        [rr(name("nodeb", "local"), 1, 0, V4)],
        questions=[question],
        authority=[rr(name("prober", "local"), 1, 120, V4)],  # a probe's proposed record
        additional=[rr(name("nodec", "local"), 28, 0, V6)],
    )
    assert hosts_in(data) == [("nodeb", True), ("nodec", True)]


def test_compression_pointers_are_followed() -> None:
    header = 12
    first = name("_http", "_tcp", "local")  # at offset 12; "local" starts at 12 + 6 + 5
    local_at = header + len(b"\x05_http\x04_tcp")
    answers = [
        rr(first, 12, 120, b"\x05nodeb" + pointer(local_at)),  # PTR -> nodeb.local
        rr(b"\x05NodeB" + pointer(local_at), 1, 0, V4),  # label + pointer to "local"
    ]
    at_nodeb = header + len(answers[0])
    answers.append(rr(pointer(at_nodeb), 28, 0, V6))  # the whole owner is a pointer
    answers.append(rr(pointer(header), 1, 0, V4))  # _http._tcp.local: three labels
    assert hosts_in(message(answers)) == [("nodeb", True)]


def test_pointer_loops_and_forward_pointers_are_malformed() -> None:
    # An owner that points at itself, and one that points forward past itself.
    assert hosts_in(message([rr(pointer(12), 1, 0, V4)])) == []
    assert hosts_in(message([rr(pointer(40), 1, 0, V4), rr(name("x", "local"), 1, 0, V4)])) == []
    # a -> b -> a: each stretch ends in a pointer back to the other one's start.
    looping = b"\x01a" + pointer(15) + b"\x01b" + pointer(12)
    assert hosts_in(message([rr(looping, 1, 0, V4)])) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 11,
        message([rr(name("nodeb", "local"), 1, 0, V4)])[:-1],  # rdata cut short
        message([rr(name("nodeb", "local"), 1, 0, V4)])[:20],  # the owner name cut short
        struct.pack("!HHHHHH", 0, QR_AA, 0, 2, 0, 0) + rr(name("nodeb", "local"), 1, 0, V4),  # count lies
        message([rr(name("nodeb", "local"), 1, 0, V4)], flags=QR_AA | 0x0003),  # rcode NXDOMAIN
        message([rr(name("nodeb", "local"), 1, 0, V4)], flags=QR_AA | 0x2800),  # opcode UPDATE
        message([rr(b"\x40" + b"x" * 64 + b"\x05local\x00", 1, 0, V4)]),  # label type 01
    ],
)
def test_malformed_or_unwanted_messages_give_nothing(data: bytes) -> None:
    assert hosts_in(data) == []


@given(st.binary(max_size=600))
def test_hosts_in_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(hosts_in(data), list)


@given(st.binary(max_size=400), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_hosts_in_never_raises_on_responses_with_arbitrary_bodies(body: bytes, an: int, ar: int) -> None:
    for host, goodbye in hosts_in(struct.pack("!HHHHHH", 0, QR_AA, 0, an, 0, ar) + body):
        assert isinstance(host, str) and isinstance(goodbye, bool)


LABELS = st.sampled_from(["nodeb", "NodeB", "printer", "local", "LOCAL", "_tcp", "x"])
RECORDS = st.lists(
    st.tuples(
        st.lists(LABELS, min_size=1, max_size=3),
        st.sampled_from(["A", "AAAA", "PTR", "TXT"]),
        st.sampled_from([0, 120, 4500]),
        st.booleans(),  # additional section
    ),
    max_size=8,
)


def reference(records: list[tuple[list[str], str, int, bool]]) -> list[tuple[str, bool]]:
    """What hosts_in must find, straight from the record list (no wire format)."""
    found: dict[tuple[str, bool], None] = {}
    for labels, rtype, ttl, _additional in sorted(records, key=lambda r: r[3]):
        if rtype in ("A", "AAAA") and len(labels) == 2 and labels[1].lower() == "local":
            found[(labels[0].lower(), ttl == 0)] = None
    return list(found)


@settings(max_examples=300)
@given(RECORDS)
def test_hosts_in_agrees_with_the_records_dnslib_encoded_with_compression(
    records: list[tuple[list[str], str, int, bool]],
) -> None:
    response = DNSRecord()
    response.header.qr = 1
    response.header.aa = 1
    for labels, rtype, ttl, additional in records:
        rdata = {"A": A("100.64.0.2"), "AAAA": AAAA("fd7a::2"), "PTR": PTR("nodeb.local"), "TXT": TXT("v")}
        record = RR(".".join(labels) + ".", getattr(QTYPE, rtype), rdata=rdata[rtype], ttl=ttl)
        (response.add_ar if additional else response.add_answer)(record)
    assert hosts_in(response.pack()) == reference(records)


# Real sockets on loopback -----------------------------------------------------


def loopback() -> Interface:
    return Interface("lo", socket.if_nametoindex("lo"), (ipaddress.ip_interface("127.0.0.1/8"),))


def send(data: bytes, to: tuple[str, int], source: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sock.bind(source)
        sock.sendto(data, to)


def goodbye(host: str) -> bytes:
    return message([rr(name(host, "local"), 1, 0, V4)])


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)  # the watcher's reader runs in this loop: yield to it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux multicast on loopback")
def test_watcher_on_loopback_takes_multicast_only() -> None:
    """Bound to 224.0.0.251, the watcher never takes a unicast datagram to port 5353.

    A "responder" holds 0.0.0.0:5353 the way python-zeroconf does. Unicast
    responses to 127.0.0.2:5353 from ten source addresses (ten reuseport hashes)
    would reach a wildcard-bound watcher; ours sees none of them, then sees the
    multicast barrier. Multicast from another port, and an oversized datagram,
    are dropped.
    """
    reports: list[tuple[str, bool]] = []

    async def scenario() -> MdnsWatcher:
        responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        responder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        responder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        responder.bind(("0.0.0.0", 5353))
        watcher = MdnsWatcher(lambda host, bye: reports.append((host, bye)), lambda: [loopback()])
        try:
            assert await watcher.start()
            assert watcher.listening == ["lo/IPv4"]
            for i in range(3, 13):
                send(goodbye("unicast"), ("127.0.0.2", 5353), (f"127.0.0.{i}", 5353))
            send(goodbye("otherport"), ("224.0.0.251", 5353), ("127.0.0.1", 0))
            send(goodbye("big") + b"\x00" * MAX_DATAGRAM, ("224.0.0.251", 5353), ("127.0.0.1", 5353))
            send(goodbye("barrier"), ("224.0.0.251", 5353), ("127.0.0.1", 5353))
            await until(lambda: ("barrier", True) in reports)
            watcher.rejoin()  # still joined: nothing changes
            assert watcher.listening == ["lo/IPv4"]
            send(goodbye("again"), ("224.0.0.251", 5353), ("127.0.0.1", 5353))
            await until(lambda: ("again", True) in reports)
        finally:
            await watcher.stop()
            responder.close()
        return watcher

    watcher = asyncio.run(scenario())
    assert reports == [("barrier", True), ("again", True)]
    assert (watcher.seen, watcher.goodbyes, watcher.dropped) == (2, 2, 2)
    assert watcher.listening == []


def test_start_without_interfaces_is_false_and_rejoin_picks_them_up_later() -> None:
    available: list[Interface] = []

    async def scenario() -> tuple[bool, list[str], list[str]]:
        watcher = MdnsWatcher(lambda host, bye: None, lambda: list(available))
        started = await watcher.start()
        before = watcher.listening
        available.append(loopback())
        watcher.rejoin()
        after = watcher.listening
        available.clear()
        watcher.rejoin()  # the interface went away: left
        assert watcher.listening == []
        await watcher.stop()
        watcher.rejoin()  # stopped: no-op
        assert watcher.listening == []
        return started, before, after

    assert asyncio.run(scenario()) == (False, [], ["lo/IPv4"])


def test_start_never_raises_when_interfaces_cannot_be_listed_or_joined() -> None:
    def broken() -> list[Interface]:
        raise OSError("no netlink")

    ghost = Interface("ghost", 999_999, (ipaddress.ip_interface("10.9.9.9/24"),))

    async def scenario() -> tuple[bool, bool]:
        first = MdnsWatcher(lambda host, bye: None, broken)
        second = MdnsWatcher(lambda host, bye: None, lambda: [ghost])
        results = (await first.start(), await second.start())
        await first.stop()
        await second.stop()
        return results

    assert asyncio.run(scenario()) == (False, False)


# The lab: real avahi ----------------------------------------------------------

WATCH = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from horizon_dns.llmnr.responder import Interface
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.mdns_watch import MdnsWatcher

families, late = sys.argv[2], sys.argv[3] == "late"
available = not late

def interfaces():
    if not available:
        return []
    return [
        Interface(i.name, i.index, tuple(a for a in i.addresses if str(a.version) in families))
        for i in list_interfaces(["eth0"])
    ]

def report(host, goodbye):
    print("record", host, int(goodbye), f"{time.monotonic():.4f}", flush=True)

async def main():
    global available
    watcher = MdnsWatcher(report, interfaces)
    print("started", await watcher.start(), ",".join(watcher.listening), flush=True)
    if late:
        available = True
        watcher.rejoin()
        print("rejoined", ",".join(watcher.listening), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class Child:
    label: str
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text(), re.M):
            assert time.monotonic() < deadline, f"{self.label}: {pattern!r} not seen:\n{self.text()}"
            time.sleep(0.02)  # polling another process's output: there is no event to await

    def records(self, host: str, goodbye: bool, after: float) -> list[float]:
        found = re.findall(rf"^record {host} {int(goodbye)} ([\d.]+)$", self.text(), re.M)
        return [float(t) for t in found if float(t) > after]

    def latency(self, host: str, goodbye: bool, since: float, within: float) -> float:
        """Seconds from ``since`` to the first such report (the child stamps it with the
        same CLOCK_MONOTONIC); fails unless it comes within ``within`` seconds."""
        while True:
            times = self.records(host, goodbye, since)
            if times:
                latency = times[0] - since
                assert latency < within, f"{self.label}: {host} {goodbye} after {latency:.3f} s"
                return latency
            assert time.monotonic() < since + within, (
                f"{self.label}: no ({host!r}, {goodbye}) within {within} s:\n{self.text()}"
            )
            time.sleep(0.01)  # polling another process's output


def spawn_watcher(the_lab: Lab, work: Path, families: str, when: str) -> Child:
    child = Child(f"watcher IPv{families}/{when}", work / f"watch-{families}-{when}.log")
    the_lab.spawn("a", "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", WATCH, str(ROOT), families, when,
                  log=child.log)  # fmt: skip
    return child


def legacy_unicast_answered(the_lab: Lab, count: int) -> int:
    """How many of ``count`` legacy unicast queries (RFC 6762 §6.7) from node b to
    avahi's 100.64.0.1:5353 on node a are answered: each from a new source port."""
    answered = 0
    for _ in range(count):
        result = the_lab.exec("b", "dig", "-p", "5353", "@100.64.0.1", "nodea.local", "+short", "+tries=1",
                              "+time=1")  # fmt: skip
        answered += result.stdout.split() == ["100.64.0.1"]
    return answered


@pytest.mark.lab
def test_avahi_goodbye_and_announcement_reach_watchers_sharing_5353_with_avahi(tmp_path: Path) -> None:
    """node b: avahi stopped (SIGTERM) and started again; node a: three watchers and avahi.

    An IPv4-only and an IPv6-only watcher opened before avahi in node a; an IPv4+IPv6
    watcher opened after it, with no interface at start and eth0 added by rejoin().
    avahi in node a keeps answering legacy unicast queries throughout: nothing of
    ours takes unicast datagrams to 5353 (a watcher bound to 0.0.0.0:5353 after
    avahi does, and this assertion then fails).
    """
    with lab("hzmw", nodes="a b") as the_lab:
        the_lab.run("start-avahi.sh", "b")
        v4 = spawn_watcher(the_lab, tmp_path, "4", "now")
        v6 = spawn_watcher(the_lab, tmp_path, "6", "now")
        v4.wait_for(r"^started True eth0/IPv4$")
        v6.wait_for(r"^started True eth0/IPv6$")
        the_lab.run("start-avahi.sh", "a")  # avahi binds 5353 after our watchers: shared
        # Ours binds after avahi: shared, and the socket bound last is the one a
        # wildcard bind would have made the taker of avahi's unicast (checked below).
        late = spawn_watcher(the_lab, tmp_path, "46", "late")
        late.wait_for(r"^started False $")
        late.wait_for(r"^rejoined eth0/IPv4,eth0/IPv6$")
        children = [v4, v6, late]
        assert legacy_unicast_answered(the_lab, 5) == 5

        stopped = time.monotonic()
        the_lab.run("start-avahi.sh", "stop", "b")
        goodbye = {c.label: c.latency("nodeb", True, stopped, within=2.0) for c in children}

        started = time.monotonic()
        the_lab.run("start-avahi.sh", "b")
        hello = {c.label: c.latency("nodeb", False, started, within=3.0) for c in children}

        assert legacy_unicast_answered(the_lab, 5) == 5
        avahi_a = Path(f"/run/{the_lab.prefix}/a/avahi/avahi.log").read_text()
        assert "Server startup complete" in avahi_a
        for child in children:
            assert "Traceback" not in child.text(), child.text()
        print(
            "\n[mdns watch] goodbye latency (SIGTERM -> report): "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in goodbye.items())
            + "\n[mdns watch] announcement latency (start -> report): "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in hello.items())
            + f"\n[mdns watch] nodea records seen by {v4.label}: "
            + str(len(re.findall(r"^record nodea ", v4.text(), re.M)))
        )
