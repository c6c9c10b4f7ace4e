"""The overlay stage in a lab node against a real avahi-daemon and a real systemd-resolved.

node a: horizon-dns with an overlay stage; node b: avahi (mDNS for nodeb.local);
node c: systemd-resolved (LLMNR responder for nodec). First with multicast on the
bridge (zerotier-like), then with multicast dropped and peers configured
(tailscale-like). Latencies are printed for the record.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import LAB, ROOT, Lab, LabServer, lab, start_lab_server

pytestmark = pytest.mark.lab

SERVER = """
listen: ["127.0.0.1:0"]
rules: rules
"""

RULES = """
zones:
  mydomain.tld:
    stages:
      - overlay:
          interfaces: [eth0]
          methods: [{methods}]
          {peers}
          prefer: [100.64.0.0/10, "fd7a:115c:a1e0::/48"]
          timeout: 0.5
          negative_ttl: 30
"""


def dig(the_lab: Lab, server: LabServer, name: str, qtype: str = "A") -> tuple[str, list[str], int]:
    result = the_lab.exec(
        "a", "dig", "@127.0.0.1", "-p", str(server.port), name, qtype, "+tries=1", "+time=3", "+noall",
        "+answer", "+comments", "+stats",
    )  # fmt: skip
    out = result.stdout
    status = re.search(r"status: (\w+)", out)
    answers = [line.split()[-1] for line in out.splitlines() if line and not line.startswith(";")]
    took = re.search(r"Query time: (\d+) msec", out)
    return (status.group(1) if status else "NO-ANSWER"), answers, int(took.group(1)) if took else -1


@pytest.fixture(scope="module")
def peers_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    with lab("hzo") as the_lab:
        the_lab.run("start-avahi.sh", "b", timeout=60)
        the_lab.run("start-resolved.sh", "c", "--dns", "127.0.0.1:9", timeout=60)
        yield the_lab, tmp_path_factory.mktemp("overlay")


def run_story(the_lab: Lab, server: LabServer, label: str) -> None:
    timings: dict[str, int] = {}
    status, answers, timings["nodeb A first (mDNS)"] = dig(the_lab, server, "nodeb.mydomain.tld")
    assert (status, answers) == ("NOERROR", ["100.64.0.2"]), (status, answers, server.text()[-3000:])
    status, answers, timings["nodeb A cached"] = dig(the_lab, server, "nodeb.mydomain.tld")
    assert answers == ["100.64.0.2"]
    status, answers, timings["nodeb AAAA"] = dig(the_lab, server, "nodeb.mydomain.tld", "AAAA")
    assert status == "NOERROR" and answers and all(a.startswith("fd7a:115c:a1e0::") for a in answers), answers
    status, answers, timings["nodec A first (LLMNR)"] = dig(the_lab, server, "NodeC.mydomain.tld")
    assert (status, answers) == ("NOERROR", ["100.64.0.3"]), (status, answers, server.text()[-3000:])
    started = time.monotonic()
    status, answers, timings["unknown host (miss)"] = dig(the_lab, server, "ghost.mydomain.tld")
    assert status == "NXDOMAIN" and time.monotonic() - started < 0.5 + 1.0
    status, _, timings["unknown host (negative cache)"] = dig(the_lab, server, "ghost.mydomain.tld")
    assert status == "NXDOMAIN" and timings["unknown host (negative cache)"] <= 5
    print(f"\n[{label}] " + "; ".join(f"{k}: {v} ms" for k, v in timings.items()))
    assert "Traceback" not in server.text()


def test_multicast_overlay_resolves_through_avahi_and_resolved(peers_lab: tuple[Lab, Path]) -> None:
    the_lab, work = peers_lab
    server = start_lab_server(
        the_lab, "a", work / "mcast", SERVER, RULES.format(methods="mdns, llmnr", peers="")
    )
    try:
        run_story(the_lab, server, "multicast: mdns+llmnr")
        text = server.text()
        assert "IPv4 of nodeb: ['100.64.0.2'] by mdns" in text
        assert "IPv4 of nodec: ['100.64.0.3'] by llmnr" in text
    finally:
        server.stop()


def test_without_multicast_peers_are_asked_directly(peers_lab: tuple[Lab, Path]) -> None:
    the_lab, work = peers_lab
    the_lab.block_multicast()
    try:
        # Multicast is really gone: the lab's LLMNR probe from node a gets no answer for nodec.
        probe = the_lab.exec("a", "python3", str(LAB / "llmnr_query.py"), "nodec", timeout=20)
        assert "no answer" in probe.stdout + probe.stderr, probe
        server = start_lab_server(
            the_lab,
            "a",
            work / "unicast",
            SERVER,
            RULES.format(methods="mdns, llmnr, peers", peers="peers: [100.64.0.2, 100.64.0.3]"),
        )
        try:
            run_story(the_lab, server, "no multicast: peers")
            text = server.text()
            assert "IPv4 of nodeb: ['100.64.0.2'] by peers" in text
            assert "IPv4 of nodec: ['100.64.0.3'] by peers" in text
        finally:
            server.stop()
    finally:
        the_lab.allow_multicast()


LOOKUPS = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.overlay import MdnsLookup

async def main() -> None:
    lookup = MdnsLookup(lambda: list_interfaces(["eth0"]))
    for _ in range(5):
        for version in (4, 6):
            started = time.monotonic()
            found = await lookup("nodeb", version, 0.5)
            print(version, [str(a) for a in found], round((time.monotonic() - started) * 1000, 1), flush=True)

asyncio.run(main())
"""


def test_mdns_lookups_are_answered_every_time_beside_other_mdns_programs(peers_lab: tuple[Lab, Path]) -> None:
    """Back to back, from two processes at once, with avahi holding 5353 on the asking node.

    avahi on node b multicasts an answer at most every half second and otherwise
    replies by unicast to port 5353, which on node a belongs to several sockets: a
    lookup asking from 5353 then waits out its timeout. Ours ask from ports of their
    own (RFC 6762 §5.1), so every one is answered.
    """
    the_lab, work = peers_lab
    the_lab.run("start-avahi.sh", "a", timeout=60)
    try:
        logs = [work / f"lookups-{i}.log" for i in range(2)]
        procs = [the_lab.spawn("a", sys.executable, "-c", LOOKUPS, str(ROOT), log=log) for log in logs]
        for proc in procs:
            proc.wait(timeout=30)
        outputs = [log.read_text() for log in logs]
    finally:
        the_lab.run("start-avahi.sh", "stop", "a", check=False)
    for out in outputs:
        lines = [line.split(" ", 1) for line in out.strip().splitlines()]
        assert len(lines) == 10, out
        for version, rest in lines:
            want = "'100.64.0.2'" if version == "4" else "'fd7a:115c:a1e0::2'"
            assert want in rest, out  # found, so well within the 0.5 s timeout
