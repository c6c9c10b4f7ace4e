"""The LLMNR responder in a lab node, queried by a real systemd-resolved and the lab's probe."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import LAB, ROOT, Lab, lab, start_lab_server

pytestmark = pytest.mark.lab

SERVER = """
listen: ["127.0.0.1:0"]
rules: rules
llmnr:
  interfaces: [eth0]
  aliases: [hub, grafana]
  devices:
    printer: [100.64.0.22, "fd7a:115c:a1e0::22"]
"""

RAW_QUERY = """
import socket, struct, sys
flags, dest = int(sys.argv[1], 0), sys.argv[2]
q = struct.pack('!HHHHHH', 77, flags, 1, 0, 0, 0) + b'\\x03hub\\x00' + struct.pack('!HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton('100.64.0.3'))
s.settimeout(1.0)
s.sendto(q, (dest, 5355))
try:
    data, src = s.recvfrom(4096)
    print('REPLY', src[0], len(data))
except socket.timeout:
    print('SILENCE')
"""


@pytest.fixture(scope="module")
def llmnr_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    with lab("hzl") as the_lab:
        work = tmp_path_factory.mktemp("llmnr")
        server = start_lab_server(the_lab, "a", work / "a", SERVER)
        server.wait_for("LLMNR responder for")
        yield the_lab, work
        assert "Traceback" not in server.text(), server.text()


def probe(the_lab: Lab, *args: str) -> str:
    result = the_lab.exec("c", "python3", str(LAB / "llmnr_query.py"), *args, timeout=20)
    return result.stdout + result.stderr


def test_real_systemd_resolved_resolves_our_aliases(llmnr_lab: tuple[Lab, Path]) -> None:
    the_lab, _work = llmnr_lab
    the_lab.run("start-resolved.sh", "b", timeout=60)
    try:
        for name, expected in (("hub", "100.64.0.1"), ("grafana", "100.64.0.1"), ("printer", "100.64.0.22")):
            result = the_lab.exec("b", "dig", "@127.0.0.53", name, "+short", "+tries=1", "+time=5")
            assert result.stdout.split() == [expected], result
        aaaa = the_lab.exec("b", "dig", "@127.0.0.53", "printer", "AAAA", "+short").stdout.split()
        assert aaaa == ["fd7a:115c:a1e0::22"]
        timed = the_lab.exec("b", "dig", "@127.0.0.53", "hub", "+noall", "+stats")
        print("resolved -> LLMNR hub:", re.findall(r"Query time: \d+ msec", timed.stdout))
    finally:
        the_lab.run("start-resolved.sh", "stop", "b", check=False)


@pytest.mark.parametrize("to", ["mcast4", "mcast6"])
def test_multicast_replies_carry_ttl_255(llmnr_lab: tuple[Lab, Path], to: str) -> None:
    out = probe(llmnr_lab[0], "hub", "--to", to)
    assert re.search(r"reply from \S+ ipttl=255 C=0 TC=0 T=0 rcode=0", out), out
    assert "100.64.0.1" in out
    print(to, re.findall(r"[\d.]+ ms", out))


def test_tcp_unicast_is_answered(llmnr_lab: tuple[Lab, Path]) -> None:
    out = probe(llmnr_lab[0], "printer", "--to", "100.64.0.1", "--tcp")
    assert "TCP reply from 100.64.0.1" in out and "100.64.0.22" in out, out


@pytest.mark.parametrize(
    ("flags", "dest", "why"),
    [("0x0400", "224.0.0.252", "C bit"), ("0", "100.64.0.1", "unicast UDP")],
)
def test_ignored_queries_get_silence(llmnr_lab: tuple[Lab, Path], flags: str, dest: str, why: str) -> None:
    the_lab, _ = llmnr_lab
    out = the_lab.exec("c", "python3", "-c", RAW_QUERY, flags, dest).stdout
    assert out.strip() == "SILENCE", f"{why}: {out}"


def test_unknown_name_gets_no_reply(llmnr_lab: tuple[Lab, Path]) -> None:
    out = probe(llmnr_lab[0], "nosuchhost")
    assert "no answer" in out and "reply from" not in out


def test_second_responder_claiming_hub_reports_a_conflict(llmnr_lab: tuple[Lab, Path]) -> None:
    the_lab, work = llmnr_lab
    other = start_lab_server(the_lab, "c", work / "c", SERVER.replace("[hub, grafana]", "[hub]"))
    try:
        text = other.wait_for(r"LLMNR conflict: 100\.64\.0\.1 also answers for 'hub'", timeout=15)
        assert "setting the T bit" in text
    finally:
        other.stop()


def test_resolved_holding_tcp_5355_gives_the_documented_message(llmnr_lab: tuple[Lab, Path]) -> None:
    the_lab, work = llmnr_lab
    the_lab.run("start-resolved.sh", "c", "--llmnr", "yes", timeout=60)
    try:
        server = start_lab_server(the_lab, "c", work / "c2", SERVER.replace("[hub, grafana]", "[other]"))
        try:
            text = server.wait_for("TCP port 5355 is in use", timeout=10)
            assert "LLMNR=no" in text and "systemctl restart systemd-resolved" in text
            assert "Traceback" not in text
            # UDP still works alongside resolved (SO_REUSEADDR).
            out = probe(the_lab, "other")
            assert "100.64.0.3" in out, out
        finally:
            server.stop()
    finally:
        the_lab.run("start-resolved.sh", "stop", "c", check=False)


RESOLVE_MDNS = """
import asyncio, sys
from zeroconf import AddressResolverIPv4, IPVersion
from zeroconf.asyncio import AsyncZeroconf
async def main():
    zc = AsyncZeroconf(interfaces=["100.64.0.2"])
    found = {}
    for name in sys.argv[1:]:
        r = AddressResolverIPv4(name + ".local.")
        await r.async_request(zc.zeroconf, 3000)
        found[name] = [str(a) for a in r.ip_addresses_by_version(IPVersion.V4Only)]
    await zc.async_close()
    print(found)
asyncio.run(main())
"""

OUR_MDNS_LOOKUP = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from horizon_dns.net.interfaces import list_interfaces
from horizon_dns.net.overlay import MdnsLookup
async def main():
    lookup = MdnsLookup(lambda: list_interfaces(["eth0"]))
    print({name: [str(a) for a in await lookup(name, 4, 1.0)] for name in sys.argv[2:]})
asyncio.run(main())
"""


def test_aliases_are_published_over_mdns_beside_a_real_avahi(llmnr_lab: tuple[Lab, Path]) -> None:
    the_lab, work = llmnr_lab
    the_lab.run("start-avahi.sh", "b", timeout=60)  # avahi on the asking node: both share 5353
    announcing = SERVER.replace("[hub, grafana]", "[wiki]") + "  mdns_announce: true\n"
    announcing = announcing.replace("printer:", "scanner:")
    server = start_lab_server(the_lab, "c", work / "mdns", announcing)
    try:
        server.wait_for(r"mDNS: publishing scanner\.local", timeout=15)
        out = the_lab.exec("b", "python3", "-c", RESOLVE_MDNS, "wiki", "scanner", timeout=30)
        assert "'wiki': ['100.64.0.3']" in out.stdout and "'scanner': ['100.64.0.22']" in out.stdout, out
        # Our own one-shot lookup (RFC 6762 §5.1) gets zeroconf's unicast answer too (§6.7).
        ours = the_lab.exec("a", sys.executable, "-c", OUR_MDNS_LOOKUP, str(ROOT), "wiki", "scanner")
        assert "'wiki': ['100.64.0.3']" in ours.stdout and "'scanner': ['100.64.0.22']" in ours.stdout, ours
        # avahi in node b keeps answering for its own host name meanwhile (asked from node a).
        own = the_lab.exec("a", "python3", "-c", RESOLVE_MDNS.replace("100.64.0.2", "100.64.0.1"), "nodeb")
        assert "'nodeb': ['100.64.0.2']" in own.stdout, own
    finally:
        server.stop()
        the_lab.run("start-avahi.sh", "stop", "b", check=False)
