"""The whole split-horizon story, end to end, through a real systemd-resolved.

node a ("laptop"):  an overlay link (eth0) and a "wi-fi" link that stays up;
                    horizon-dns with the shipped rules (rules/10-mydomain.yaml, cache
                    windows shortened to 2 s so the test need not wait 30 s), a real
                    systemd-resolved configured by the shipped drop-in
                    (contrib/systemd-resolved/resolved.conf.d/horizon-dns.conf), every
                    lookup through its stub 127.0.0.53; a dnsmasq on loopback playing
                    the public DNS (*.mydomain.tld -> the edge proxy 203.0.113.10).
node b ("nodeb"):   a server announced by a real avahi-daemon.
node c ("hub"):     horizon-dns as LLMNR responder: hostname nodec, alias hub, device printer.

The story runs twice: on a multicast overlay (zerotier-like) and with multicast dropped
on the bridge and peers configured (tailscale-like). Each answer's latency is printed.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from lab import ROOT, Lab, LabServer, lab, start_lab_server

pytestmark = pytest.mark.lab

EDGE = "203.0.113.10"
WINDOW = 2  # seconds: the overlay's ttl and negative_ttl in this test
LOOKUP_TIMEOUT = 0.3

PUBLIC_DNS = """port=5301
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
user=root
local-ttl=0
address=/mydomain.tld/203.0.113.10
address=/something.example/198.51.100.77
log-queries
log-facility=-
"""

HUB = """
listen: ["127.0.0.1:5300"]
rules: rules
metrics: false
llmnr:
  interfaces: [eth0]
  aliases: [hub]
  devices:
    printer: [100.64.0.22]
"""


def laptop_rules(peers: list[str]) -> str:
    """The shipped rules, with 2 s cache windows and, for a tailscale-like overlay, peers."""
    rules = yaml.safe_load((ROOT / "rules" / "10-mydomain.yaml").read_text())
    for stage in rules["zones"]["mydomain.tld"]["stages"]:
        if "overlay" in stage:
            stage["overlay"].update({"ttl": WINDOW, "negative_ttl": WINDOW, "timeout": LOOKUP_TIMEOUT})
            if peers:
                stage["overlay"].update({"peers": peers})
    return yaml.safe_dump(rules)


def laptop_server(peers: list[str]) -> str:
    """The embedded default's shape, with the lab's public DNS as upstream."""
    default = yaml.safe_load((ROOT / "horizon_dns" / "default.yaml").read_text())
    default.update({"listen": ["127.0.0.1:5300"], "metrics": False})
    for stage in default["zones"]["."]["stages"]:
        if "forward" in stage:
            stage["forward"] = {"upstreams": ["127.0.0.1:5301"], "timeout": 0.5}
        if "overlay" in stage:
            stage["overlay"].update({"ttl": WINDOW, "negative_ttl": WINDOW, "timeout": LOOKUP_TIMEOUT})
            if peers:
                stage["overlay"].update({"peers": peers})
    return yaml.safe_dump(default)


@dataclass
class Answer:
    status: str
    records: list[str]
    ms: float


def resolve(the_lab: Lab, name: str, qtype: str = "A") -> Answer:
    """Ask through node a's systemd-resolved stub, as every program on the laptop does."""
    started = time.monotonic()
    result = the_lab.exec(
        "a", "dig", "@127.0.0.53", name, qtype, "+tries=1", "+time=5", "+noall", "+answer", "+comments"
    )
    ms = (time.monotonic() - started) * 1000
    out = result.stdout
    status = re.search(r"status: (\w+)", out)
    records = [" ".join(line.split()[3:]) for line in out.splitlines() if line and not line.startswith(";")]
    return Answer(status.group(1) if status else "NO-ANSWER", records, ms)


def wait_for(the_lab: Lab, name: str, want: str, within: float, qtype: str = "A") -> Answer:
    """Ask until an answer record contains ``want``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        answer = resolve(the_lab, name, qtype)
        if any(want in record for record in answer.records):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not turn to {want} within {within} s: {answer}")
        time.sleep(0.2)  # waiting out a cache window: the event here is time passing


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    drop_in = ROOT / "contrib" / "systemd-resolved" / "resolved.conf.d" / "horizon-dns.conf"
    assert drop_in.is_file(), "the shipped resolved drop-in is missing"
    with lab("hze") as the_lab:
        work = tmp_path_factory.mktemp("e2e")
        # The laptop's other network ("wi-fi"), which stays up when it leaves the overlay:
        # systemd-resolved answers SERVFAIL (network-down) when no link is up at all.
        for command in (
            ("ip", "link", "add", "wifi0", "type", "veth", "peer", "name", "wifi0-ap"),
            ("ip", "addr", "add", "192.0.2.77/24", "dev", "wifi0"),
            ("ip", "link", "set", "wifi0-ap", "up"),
            ("ip", "link", "set", "wifi0", "up"),
        ):
            the_lab.exec("a", *command, check=True)
        (work / "public.conf").write_text(PUBLIC_DNS)
        the_lab.spawn("a", "dnsmasq", "-k", "-C", str(work / "public.conf"), log=work / "public.log")
        conf_d = Path(f"/run/{the_lab.prefix}/a/resolved/conf.d")
        conf_d.mkdir(parents=True, exist_ok=True)
        # zz- sorts after the lab's own lab.conf, so the shipped settings win.
        shutil.copy(drop_in, conf_d / "zz-horizon-dns.conf")
        # --llmnr no: the lab script then does not wait for an LLMNR probe (ours turns it off).
        the_lab.run("start-resolved.sh", "a", "--llmnr", "no", timeout=60)
        the_lab.run("start-avahi.sh", "b", timeout=60)
        hub = start_lab_server(the_lab, "c", work / "hub", HUB)
        hub.wait_for("LLMNR responder for")
        yield the_lab, work


def story(the_lab: Lab, work: Path, label: str, peers: list[str]) -> None:
    laptop = start_lab_server(the_lab, "a", work / label, laptop_server(peers), laptop_rules(peers))
    try:
        run_story(the_lab, laptop, label)
        if peers:  # no multicast crossed the bridge: the peers answered
            assert "IPv4 of nodeb: ['100.64.0.2'] by peers" in laptop.text()
            assert "IPv4 of nodec: ['100.64.0.3'] by peers" in laptop.text()
    finally:
        laptop.stop()


def run_story(the_lab: Lab, laptop: LabServer, label: str) -> None:
    times: dict[str, float] = {}
    # 1. www.nodeb -> CNAME nodeb -> nodeb's overlay address; AAAA the ULA, never link-local.
    answer = resolve(the_lab, "www.nodeb.mydomain.tld")
    assert answer.records == ["CNAME nodeb.mydomain.tld.", "A 100.64.0.2"], (answer, laptop.text()[-3000:])
    times["www.nodeb A"] = answer.ms
    answer = resolve(the_lab, "www.nodeb.mydomain.tld", "AAAA")
    assert answer.records[0] == "CNAME nodeb.mydomain.tld."
    addresses = [r.split()[1] for r in answer.records[1:]]
    assert addresses and all(a.startswith("fd7a:115c:a1e0::") for a in addresses), answer
    times["www.nodeb AAAA"] = answer.ms
    # 2. grafana.hub -> the hub alias -> node c.
    answer = resolve(the_lab, "grafana.hub.mydomain.tld")
    assert answer.records == ["CNAME nodec.mydomain.tld.", "A 100.64.0.3"], (answer, laptop.text()[-3000:])
    times["grafana.hub A"] = answer.ms
    # 3. single-label names through resolved with the shipped settings.
    for name, address in (("nodeb", "100.64.0.2"), ("printer", "100.64.0.22")):
        answer = resolve(the_lab, name)
        assert answer.records == [f"A {address}"], (name, answer, laptop.text()[-3000:])
        times[f"{name} (single label)"] = answer.ms
    # 4. an outside name goes to the upstream.
    answer = resolve(the_lab, "something.example")
    assert answer.records == ["A 198.51.100.77"], answer
    times["something.example"] = answer.ms
    run = the_lab.exec(
        "a", "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "horizon_dns", "explain", "--config",
        str(laptop.log.parent / "horizon.yaml"), "www.nodeb.mydomain.tld", timeout=30,
    )  # fmt: skip
    explained = run.stdout
    assert "stage template:service-cname" in explained, (run.returncode, run.stderr[-3000:])
    assert "chase CNAME -> nodeb.mydomain.tld." in explained
    assert "IPv4 of nodeb: ['100.64.0.2'] by" in explained, explained

    # 5a. The laptop leaves the overlay: public answers within the windows, no long waits.
    the_lab.exec("a", "ip", "link", "set", "eth0", "down", check=True)
    try:
        answer = wait_for(the_lab, "www.nodeb.mydomain.tld", EDGE, within=WINDOW + 3)
        times["outside: www.nodeb A"] = answer.ms
        answer = resolve(the_lab, "grafana.hub.mydomain.tld")
        assert EDGE in " ".join(answer.records), answer
        for _ in range(5):
            answer = resolve(the_lab, "www.nodeb.mydomain.tld")
            assert answer.ms < (LOOKUP_TIMEOUT + 0.5) * 1000 + 300, answer  # bounded by the lookup timeout
        explained = the_lab.exec(
            "a", "env", f"PYTHONPATH={ROOT}", "python3", "-m", "horizon_dns", "explain", "--config",
            str(laptop.log.parent / "horizon.yaml"), "www.nodeb.mydomain.tld", timeout=30,
        ).stdout  # fmt: skip
        assert "fallback:" in explained and EDGE in explained, explained
    finally:
        the_lab.exec("a", "ip", "link", "set", "eth0", "up", check=True)
    # 6a. Back in the overlay: the overlay answer returns within the windows.
    answer = wait_for(the_lab, "www.nodeb.mydomain.tld", "100.64.0.2", within=2 * WINDOW + 5)
    times["back: www.nodeb A"] = answer.ms

    # 5b. nodeb goes away (its avahi stops): public answer within the windows.
    the_lab.run("start-avahi.sh", "stop", "b")
    try:
        answer = wait_for(the_lab, "www.nodeb.mydomain.tld", EDGE, within=WINDOW + 3)
        times["nodeb gone: www.nodeb A"] = answer.ms
        assert answer.ms < (LOOKUP_TIMEOUT + 0.5) * 1000 + 300
    finally:
        the_lab.run("start-avahi.sh", "b", timeout=60)
    # 6b. nodeb is back.
    answer = wait_for(the_lab, "www.nodeb.mydomain.tld", "100.64.0.2", within=2 * WINDOW + 5)
    times["nodeb back: www.nodeb A"] = answer.ms
    print(f"\n[{label}] " + "; ".join(f"{k}: {v:.0f} ms" for k, v in times.items()))


def test_split_horizon_on_a_multicast_overlay(world: tuple[Lab, Path]) -> None:
    the_lab, work = world
    story(the_lab, work, "multicast", peers=[])


def test_split_horizon_without_multicast_through_peers(world: tuple[Lab, Path]) -> None:
    the_lab, work = world
    the_lab.block_multicast()
    try:
        story(the_lab, work, "unicast-peers", peers=["100.64.0.2", "100.64.0.3"])
    finally:
        the_lab.allow_multicast()
