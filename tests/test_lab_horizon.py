"""How fast the horizon switches (issue 14), measured as DECISIONS.md 8 defines it.

A switch time runs from the moment of the change (a link goes down, an address is
removed, a daemon stops) to the first answer that shows the new horizon, for a client
asking every 200 ms through a real systemd-resolved: ``dig @127.0.0.53`` in node a, one
background thread per name (resolved keeps no copy of answers from a localhost server,
so every ask reaches horizon-dns).

node a: horizon-dns with the shipped rules (rules/10-mydomain.yaml, as shipped) and the
        embedded default's zone "." whose forward stage asks the "public DNS": a dnsmasq
        on 127.0.0.1:5301 answering every mydomain.tld name with 192.0.2.1, TTL 3600,
        NXDOMAIN for the single label ``peer1`` and REFUSED for everything else. systemd-resolved pointed at
        127.0.0.1:5300 for ~mydomain.tld with LLMNR=no and ResolveUnicastSingleLabel=yes
        (what contrib/systemd-resolved/resolved.conf.d/horizon-dns.conf sets).
node b: a real avahi-daemon (nodeb.local and peer1..peer6.local) and a real
        systemd-resolved answering LLMNR for ``nodeb`` (multicast and TCP), as a node would.
node c: systemd-resolved (LLMNR for ``nodec``): a live peer that knows nothing of nodeb.

Inside answer 100.64.0.2, public answer 192.0.2.1. Every scenario starts its own
horizon-dns (fresh caches) and puts the network back in a ``finally``. Each prints
``SWITCH <scenario> <name>: <seconds> s`` (run pytest with -s); a scenario asserts
after every phase of its timeline was measured, so one failure still shows all numbers.

HORIZON_SWITCH_MAX_WAIT=70 waits up to 70 s for each switch (to measure a slow one);
by default a phase gives up at max(3 x bound, bound + 8) s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from lab import ROOT, Lab, LabServer, lab

pytestmark = pytest.mark.lab

PREFIX = "hzhz"
NODES = "a b c"

INSIDE = "100.64.0.2"  # nodeb on the overlay
PUBLIC = "192.0.2.1"  # every mydomain.tld name in the public DNS
PUBLIC_TTL = 3600
PEERS = {f"peer{i}": f"100.64.0.{20 + i}" for i in range(1, 7)}  # more names avahi on b publishes
OVERLAY_NET = "100.64.0."

A_V4, A_V6 = "100.64.0.1/24", "fd7a:115c:a1e0::1/64"

INTERVAL = 0.2  # the client's cadence (DECISIONS.md 8)
HOLD = 1.0  # after a switch, watch this long for a flip back
STEADY = 1.0  # before a change, the old horizon must have shown this long
WARMUP = 20.0  # seconds to reach that steady state

LEAVE_BOUND = RETURN_BOUND = 10.0
OWN_LINK_BOUND = 2.0
GOODBYE_BOUND = 1.5
MULTICAST_RATE, MULTICAST_BURST = 50, 100  # the overlay stage's multicast_rate default
FLOOD_QPS, FLOOD_SECONDS, FLOOD_MIN_QPS = 2500, 5.0, 2000
FLOOD_TAIL = 1.0  # the flood's cost includes the lookups still running when it ends

# The code under test: this checkout, or another tree (e.g. an export of an older commit, to
# measure a baseline) named by HORIZON_SWITCH_CODE.
CODE = Path(os.environ.get("HORIZON_SWITCH_CODE") or ROOT)
SHIPPED_RULES = CODE / "rules" / "10-mydomain.yaml"
DEFAULT_SERVER = CODE / "horizon_dns" / "default.yaml"

PUBLIC_DNS = f"""port=5301
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
user=root
local-ttl={PUBLIC_TTL}
address=/mydomain.tld/{PUBLIC}
local=/peer1/
"""


def max_wait(bound: float) -> float:
    """How long a phase waits for its switch before it counts as none."""
    configured = os.environ.get("HORIZON_SWITCH_MAX_WAIT")
    return float(configured) if configured else max(3 * bound, bound + 8)


def switch_timeout(*bounds: float) -> pytest.MarkDecorator:
    """pytest-timeout for a test whose phases each wait up to max_wait(bound)."""
    return pytest.mark.timeout(90 + sum(max_wait(b) + HOLD + 5 for b in bounds))


# -- the 200 ms client ---------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One ask: when it left and came back (time.monotonic), and what the reply showed."""

    slot: str
    name: str
    via: str
    t_sent: float
    t_done: float
    status: str  # NOERROR, NXDOMAIN, SERVFAIL, ... or TIMEOUT / ERROR (no reply)
    addresses: tuple[str, ...] = ()
    ttls: tuple[int, ...] = ()
    ede: tuple[int, ...] = ()
    text: str = ""

    @property
    def answered(self) -> bool:
        return self.status not in ("TIMEOUT", "ERROR")

    def brief(self) -> str:
        ede = f" EDE {','.join(map(str, self.ede))}" if self.ede else ""
        return f"{self.status} {','.join(self.addresses) or '(no address)'}{ede}"


SERVERS = {
    "resolved": ["@127.0.0.53"],  # resolved's stub, as every program in node a asks
    "direct": ["@127.0.0.1", "-p", "5300"],  # horizon-dns itself
    "public": ["@127.0.0.1", "-p", "5301"],  # the lab's public DNS
}

_STATUS = re.compile(r"status: (\w+)")
_EDE = re.compile(r"^; EDE: (\d+)", re.M)


def parse_dig(out: str) -> tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """status, A/AAAA addresses, their TTLs and the EDE codes of ``dig +noall +answer +comments``."""
    status = _STATUS.search(out)
    if status is None:
        return ("TIMEOUT" if "timed out" in out else "ERROR"), (), (), ()
    addresses: list[str] = []
    ttls: list[int] = []
    for line in out.splitlines():
        fields = line.split()
        if line.startswith(";") or len(fields) < 5:
            continue
        if fields[3] in ("A", "AAAA"):
            addresses.append(fields[4])
        if fields[1].isdigit():
            ttls.append(int(fields[1]))
    return status.group(1), tuple(addresses), tuple(ttls), tuple(int(c) for c in _EDE.findall(out))


class Client:
    """Asks each slot's name(s) every 200 ms from node a, each slot in a thread of its own.

    A slot with several names asks them in turn. ``via="resolved"`` asks resolved's stub
    127.0.0.53 (what every program in the node does); ``via="direct"`` asks horizon-dns
    on 127.0.0.1:5300 itself (to see what resolved does not pass on, e.g. EDE). Bounded:
    each slot stops after ``max_seconds`` or ``max_seconds / interval`` asks.
    """

    def __init__(self, netns: str, interval: float = INTERVAL, max_seconds: float = 400) -> None:
        self.netns = netns
        self.interval = interval
        self.max_seconds = max_seconds
        self._records: list[Record] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, slot: str, names: Sequence[str], via: str = "resolved") -> None:
        thread = threading.Thread(target=self._run, args=(slot, list(names), via), daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ask(self, slot: str, name: str, via: str) -> Record:
        cmd = ["ip", "netns", "exec", self.netns, "dig", *SERVERS[via], name, "A"]
        cmd += ["+tries=1", "+time=1", "+noall", "+answer", "+comments"]
        sent = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        except (subprocess.SubprocessError, OSError) as exc:
            out = f"error: {exc}"
        done = time.monotonic()
        status, addresses, ttls, ede = parse_dig(out)
        return Record(slot, name, via, sent, done, status, addresses, ttls, ede, out)

    def _run(self, slot: str, names: list[str], via: str) -> None:
        started = time.monotonic()
        due = started
        for count in range(int(self.max_seconds / self.interval) + 1):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                break
            record = self.ask(slot, names[count % len(names)], via)
            with self._cond:
                self._records.append(record)
                self._cond.notify_all()
            due = max(due + self.interval, time.monotonic())
            if self._stop.wait(max(0.0, due - time.monotonic())):  # the 200 ms cadence
                break

    def records(self, slot: str | None = None) -> list[Record]:
        with self._cond:
            return [r for r in self._records if slot is None or r.slot == slot]

    def wait(self, check: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``check()`` (re-evaluated after every new answer) holds or ``deadline`` passes."""
        with self._cond:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_until(self, moment: float) -> None:
        """Let the client run (and record) until ``moment``."""
        self.wait(lambda: False, moment)


def switch_time(
    records: Sequence[Record], t_change: float, predicate: Callable[[Record], bool]
) -> float | None:
    """Seconds from ``t_change`` to the first answer after it that satisfies ``predicate``."""
    for record in sorted(records, key=lambda r: r.t_done):
        if record.t_done > t_change and predicate(record):
            return record.t_done - t_change
    return None


def steady(records: Sequence[Record], predicate: Callable[[Record], bool], seconds: float) -> bool:
    """The last ``seconds`` of answers (at least 3) all satisfy ``predicate``."""
    if not records:
        return False
    last = records[-1].t_done
    recent = [r for r in records if r.t_done >= last - seconds]
    return len(recent) >= 3 and all(predicate(r) for r in recent)


def overlay(r: Record) -> bool:
    return r.status == "NOERROR" and INSIDE in r.addresses and PUBLIC not in r.addresses


def public(r: Record) -> bool:
    return (
        r.status == "NOERROR"
        and PUBLIC in r.addresses
        and not any(a.startswith(OVERLAY_NET) for a in r.addresses)
    )


@dataclass
class Phase:
    """One change of a timeline and its switch time for each name."""

    label: str
    bound: float
    t_change: float = 0.0
    times: dict[str, float | None] = field(default_factory=dict)
    flips: dict[str, list[str]] = field(default_factory=dict)
    problem: str = ""

    def failures(self) -> list[str]:
        if self.problem:
            return [f"{self.label}: {self.problem}"]
        out = []
        for name, seconds in self.times.items():
            if seconds is None:
                waited = max_wait(self.bound)
                out.append(f"{self.label} {name}: no switch within {waited:.0f} s (bound {self.bound} s)")
            elif seconds > self.bound:
                out.append(f"{self.label} {name}: {seconds:.2f} s > bound {self.bound} s")
        for name, flips in self.flips.items():
            if flips:
                out.append(f"{self.label} {name}: showed the old horizon again after switching: {flips[:5]}")
        return out


def run_phase(
    client: Client,
    label: str,
    slots: Sequence[str],
    change: Callable[[], object],
    new: Callable[[Record], bool],
    old: Callable[[Record], bool],
    bound: float,
) -> Phase:
    """Make ``change``; measure, per slot, the switch from ``old`` to ``new``.

    Before the change each slot's last answer must not show ``new`` yet (else the phase is
    not measured: the previous phase never switched). After every slot switched, the client
    watches ``HOLD`` more seconds for a flip back to ``old``.
    """
    phase = Phase(label, bound)
    latest = {s: [r for r in client.records(s) if r.answered][-1:] for s in slots}
    already = {s: (r[0].brief() if r else "no answer") for s, r in latest.items() if not r or new(r[0])}
    if already:
        phase.problem = f"not measured: before the change the new horizon showed already ({already})"
        print(f"SWITCH {label}: not measured ({already})")
        return phase
    change()
    phase.t_change = t_change = time.monotonic()  # the change is in effect once its command returned
    deadline = t_change + max_wait(bound)

    def all_switched() -> bool:
        return all(switch_time(client.records(s), t_change, new) is not None for s in slots)

    if client.wait(all_switched, deadline):
        client.wait_until(min(deadline, time.monotonic() + HOLD))
    for slot in slots:
        records = client.records(slot)
        seconds = switch_time(records, t_change, new)
        phase.times[slot] = seconds
        if seconds is None:
            last = records[-1].brief() if records else "-"
            print(f"SWITCH {label} {slot}: none within {max_wait(bound):.0f} s (last answer: {last})")
            continue
        print(f"SWITCH {label} {slot}: {seconds:.2f} s")
        phase.flips[slot] = [
            f"+{r.t_done - t_change:.2f}s {r.brief()}"
            for r in records
            if r.t_done > t_change + seconds and old(r)
        ]
    return phase


# -- the lab -----------------------------------------------------------------------------------


@dataclass
class World:
    lab: Lab
    work: Path

    def ns(self, node: str) -> str:
        return self.lab.netns(node)

    def ip(self, node: str, *commands: str) -> None:
        """``ip -n NODE -batch``: several changes in one process, so they land together."""
        netns = f"{self.lab.prefix}-br" if node == "br" else self.ns(node)
        result = subprocess.run(
            ["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True,
            text=True, timeout=10,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {netns} {commands}: {result.stderr}")

    def pid(self, node: str, daemon: str) -> int | None:
        path = Path(f"/run/{self.lab.prefix}/{node}/{daemon}/pid")
        try:
            pid = int(path.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    # the changes of the timelines
    def b_leaves(self) -> None:  # b's cable is pulled: b itself notices nothing, sends nothing
        self.ip("br", "link set veth-b down")

    def b_returns(self) -> None:
        self.ip("br", "link set veth-b up")

    def a_link_down(self) -> None:
        self.ip("a", "link set eth0 down")

    def a_link_up(self) -> None:
        # IPv6 addresses and the multicast route go with the link; they come back with it.
        self.ip(
            "a",
            "link set eth0 up",
            f"addr replace {A_V6} dev eth0 nodad",
            "route replace 224.0.0.0/4 dev eth0",
        )

    def a_addresses_removed(self) -> None:
        self.ip("a", f"addr del {A_V4} dev eth0", f"addr del {A_V6} dev eth0")

    def a_addresses_back(self) -> None:
        self.ip(
            "a", f"addr replace {A_V4} dev eth0", f"addr replace {A_V6} dev eth0 nodad",
            "route replace 224.0.0.0/4 dev eth0",
        )  # fmt: skip

    def start_avahi_b(self) -> None:
        self.lab.run("start-avahi.sh", "b", *(f"{n}={a}" for n, a in PEERS.items()), timeout=60)

    def start_resolved_b(self) -> None:
        self.lab.run("start-resolved.sh", "b", "--dns", "127.0.0.1:9", timeout=60)

    def baseline(self) -> None:
        """Every node on the overlay, b's daemons running, multicast flowing."""
        self.lab.allow_multicast()
        self.b_returns()
        self.a_link_up()
        self.a_addresses_back()
        if self.pid("b", "avahi") is None:
            self.start_avahi_b()
        if self.pid("b", "resolved") is None:
            self.start_resolved_b()

    def reset_resolved_a(self) -> None:
        """Forget what a's resolved learnt about horizon-dns (feature level, caches)."""
        pid = self.pid("a", "resolved")
        assert pid is not None, "systemd-resolved in node a died"
        os.kill(pid, signal.SIGRTMIN + 1)  # reset server features
        os.kill(pid, signal.SIGUSR2)  # flush caches

    def resolved_log_size(self) -> int:
        return Path(f"/run/{self.lab.prefix}/a/resolved/log").stat().st_size

    def resolved_downgrades(self, since: int) -> list[str]:
        with Path(f"/run/{self.lab.prefix}/a/resolved/log").open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if re.search("downgrad|degraded", line, re.I)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for tool in ("dnsmasq", "nft", "dig"):
        require_tool(tool)
    with lab(PREFIX, NODES) as the_lab:
        work = tmp_path_factory.mktemp("horizon")
        (work / "public.conf").write_text(PUBLIC_DNS)
        the_lab.spawn("a", "dnsmasq", "-k", "-C", str(work / "public.conf"), log=work / "public.log")
        world = World(the_lab, work)
        # a: what the shipped drop-in sets (LLMNR=no: horizon-dns asks the overlay itself)
        the_lab.run(
            "start-resolved.sh", "a", "--llmnr", "no", "--set", "ResolveUnicastSingleLabel=yes", timeout=60
        )
        the_lab.run("start-resolved.sh", "c", "--dns", "127.0.0.1:9", timeout=60)
        world.start_avahi_b()
        world.start_resolved_b()
        probe = Client(the_lab.netns("a"))
        deadline = time.monotonic() + 10
        while PUBLIC not in probe.ask("", "x.nodeb.mydomain.tld", "public").addresses:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the public DNS does not answer: {(work / 'public.log').read_text()}")
            time.sleep(0.05)  # dnsmasq starting: polling another process
        yield world


def rules_file(peers: list[str] | None) -> str:
    """The shipped rules; for a tailscale-like overlay the overlay stage asks ``peers`` only."""
    rules = yaml.safe_load(SHIPPED_RULES.read_text())
    if peers:
        for stage in rules["zones"]["mydomain.tld"]["stages"]:
            if "overlay" in stage:
                stage["overlay"].update({"peers": peers, "methods": ["peers"]})
    return yaml.safe_dump(rules)


def server_file(peers: list[str] | None) -> str:
    """The embedded default (zone "." = cache, single-label overlay, forward), forwarding
    to the lab's public DNS instead of resolv.conf."""
    server = yaml.safe_load(DEFAULT_SERVER.read_text())
    server.update({"listen": ["127.0.0.1:5300"], "metrics": False})
    for stage in server["zones"]["."]["stages"]:
        if "forward" in stage:
            stage["forward"] = {"upstreams": ["127.0.0.1:5301"]}
        if "overlay" in stage and peers:
            stage["overlay"].update({"peers": peers, "methods": ["peers"]})
    return yaml.safe_dump(server)


def start_server(world: World, label: str, server_yaml: str, rules_yaml: str) -> LabServer:
    """horizon-dns in node a, as lab.start_lab_server starts it, but waiting for the runtime's own
    "listening on" line (other parts log "listening on" too) and stopping a server that failed."""
    work = world.work / label
    (work / "rules").mkdir(parents=True, exist_ok=True)
    (work / "rules" / "10-test.yaml").write_text(rules_yaml)
    config = work / "horizon.yaml"
    config.write_text(server_yaml)
    cmd = [sys.executable, "-m", "horizon_dns", "--log-level", "debug", "serve", "--config", str(config)]
    # -C: not from this checkout's folder, whose horizon_dns would shadow PYTHONPATH (-m puts the cwd first)
    proc = world.lab.spawn("a", "env", "-C", str(work), f"PYTHONPATH={CODE}", *cmd, log=work / "server.log")
    server = LabServer(proc, work / "server.log", 5300)
    try:
        server.wait_for(r"horizon_dns\.runtime: listening on 127\.0\.0\.1:5300")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        raise
    return server


@contextmanager
def horizon(world: World, label: str, peers: list[str] | None = None) -> Iterator[LabServer]:
    """A fresh horizon-dns in node a (fresh caches) for one scenario."""
    world.reset_resolved_a()
    since = world.resolved_log_size()
    server = start_server(world, label, server_file(peers), rules_file(peers))
    try:
        yield server
    finally:
        server.stop()
        downgrades = world.resolved_downgrades(since)
        if downgrades:  # resolved asks differently after these (e.g. twice, without EDNS)
            print(f"resolved in node a during {label}: {len(downgrades)} downgrades, e.g. {downgrades[:2]}")
    assert "Traceback" not in server.text(), server.text()[-5000:]


@contextmanager
def client(world: World) -> Iterator[Client]:
    with Client(world.ns("a")) as running:
        yield running


def warm_up(c: Client, slots: Sequence[str], predicate: Callable[[Record], bool], server: LabServer) -> None:
    """Wait for the steady state the timeline starts from."""
    ok = c.wait(
        lambda: all(steady(c.records(s), predicate, STEADY) for s in slots), time.monotonic() + WARMUP
    )
    if not ok:
        last = {s: [r.brief() for r in c.records(s)[-3:]] for s in slots}
        raise AssertionError(f"no steady state within {WARMUP} s: {last}\n{server.text()[-3000:]}")


def check(phases: Sequence[Phase], extra: Sequence[str] = ()) -> None:
    failures = [f for p in phases for f in p.failures()] + list(extra)
    assert not failures, "\n".join(failures)


NODEB = "nodeb.mydomain.tld"
WWW = "www.nodeb.mydomain.tld"
BOTH = [NODEB, WWW]


Step = tuple[str, Callable[[], object], Callable[[Record], bool], Callable[[Record], bool], float]


def run_timeline(
    world: World,
    label: str,
    steps: Sequence[Step],
    restore: Callable[[], object],
    peers: list[str] | None = None,
) -> None:
    """A fresh server, the client on nodeb and www.nodeb, then each (name, change, new, old,
    bound) step in turn; ``restore`` in a ``finally``; then every bound is asserted."""
    with horizon(world, label, peers) as server, client(world) as c:
        for name in BOTH:
            c.add(name, [name])
        warm_up(c, BOTH, overlay, server)
        phases = []
        try:
            for step, change, new, old, bound in steps:
                phases.append(run_phase(c, f"{label}:{step}", BOTH, change, new, old, bound))
        finally:
            restore()
        # DECISIONS.md 8: no reply TTL for an overlay-zone name outlives the (leave/return)
        # switch bound, so no client cache does either.
        ttls: dict[str, int] = {}
        for r in c.records():
            ttls[r.name] = max([ttls.get(r.name, 0), *r.ttls])
        too_long = {name: ttl for name, ttl in ttls.items() if ttl > LEAVE_BOUND}
        long_ttls = (
            [f"{label}: reply TTLs above {LEAVE_BOUND:.0f} s (the largest): {too_long}"] if too_long else []
        )
        print(f"{label}: largest reply TTLs {ttls}")
    check(phases, long_ttls)


def leave_and_return(world: World, label: str, peers: list[str] | None) -> None:
    steps: list[Step] = [
        ("leave", world.b_leaves, public, overlay, LEAVE_BOUND),
        ("return", world.b_returns, overlay, public, RETURN_BOUND),
    ]
    run_timeline(world, label, steps, world.b_returns, peers)


@contextmanager
def wifi(world: World) -> Iterator[None]:
    """A second link in node a that stays up, as a laptop's wi-fi: with no routable address on
    any link, resolved answers SERVFAIL (network-down) itself and never asks horizon-dns."""
    bridge_ns = f"{world.lab.prefix}-br"  # the far end waits there, on no bridge: nothing answers
    subprocess.run(
        ["ip", "link", "add", "wifi0", "netns", world.ns("a"), "type", "veth", "peer", "name", "wifi0-ap",
         "netns", bridge_ns], check=True, timeout=10,
    )  # fmt: skip
    world.ip("br", "link set wifi0-ap up")
    world.ip("a", "addr add 198.51.100.77/24 dev wifi0", "link set wifi0 up")
    try:
        yield
    finally:
        world.ip("a", "link del wifi0")


# -- the scenarios -------------------------------------------------------------------------------


@switch_timeout(LEAVE_BOUND, RETURN_BOUND)
def test_peer_leaves_silently_and_returns(world: World) -> None:
    """1 and 2: b's link goes down (no goodbye; avahi and resolved keep running, unreachable):
    public within 10 s; b comes back: the overlay within 10 s although the public TTL is 3600."""
    world.baseline()
    leave_and_return(world, "multicast", peers=None)


@switch_timeout(OWN_LINK_BOUND, OWN_LINK_BOUND)
def test_own_link_down_and_up(world: World) -> None:
    """3a: node a's overlay link goes down: public within 2 s; up again: overlay within 2 s
    (a "wi-fi" link stays up)."""
    world.baseline()
    steps: list[Step] = [
        ("down", world.a_link_down, public, overlay, OWN_LINK_BOUND),
        ("up", world.a_link_up, overlay, public, OWN_LINK_BOUND),
    ]
    with wifi(world):
        run_timeline(world, "own-link", steps, world.a_link_up)


@switch_timeout(OWN_LINK_BOUND, OWN_LINK_BOUND)
def test_own_overlay_addresses_removed_and_back(world: World) -> None:
    """3b: node a loses its overlay addresses (100.64.0.1/24 and fd7a:115c:a1e0::1/64, as when
    tailscale goes down; eth0 stays up with its link-local address, a "wi-fi" link stays up):
    public within 2 s; addresses back: overlay within 2 s."""
    world.baseline()
    steps: list[Step] = [
        ("removed", world.a_addresses_removed, public, overlay, OWN_LINK_BOUND),
        ("back", world.a_addresses_back, overlay, public, OWN_LINK_BOUND),
    ]
    with wifi(world):
        run_timeline(world, "own-address", steps, world.a_addresses_back)


@switch_timeout(GOODBYE_BOUND)
def test_mdns_goodbye_switches_at_once(world: World) -> None:
    """4: only mDNS knows b (its resolved is stopped); avahi on b stops and multicasts its
    goodbye (TTL 0): public "at once", within 1.5 s of the SIGTERM."""
    world.baseline()
    world.lab.run("start-resolved.sh", "stop", "b")

    def avahi_stops() -> None:  # avahi multicasts its goodbyes on SIGTERM
        pid = world.pid("b", "avahi")
        assert pid is not None, "avahi on b is not running"
        os.kill(pid, signal.SIGTERM)

    try:
        run_timeline(
            world, "goodbye", [("avahi stopped", avahi_stops, public, overlay, GOODBYE_BOUND)], lambda: None
        )
    finally:
        world.lab.run("start-avahi.sh", "stop", "b", check=False)
        world.baseline()


@switch_timeout(LEAVE_BOUND)
def test_single_label_names_after_leave_never_stale(world: World) -> None:
    """5: single-label names (resolved sends them to horizon-dns with ResolveUnicastSingleLabel=yes;
    zone "." asks the overlay, then the public DNS): ``nodeb``, which the public DNS refuses
    (the forward stage fails: SERVFAIL, where serve-stale used to step in), and ``peer1``
    (published by avahi on b), which it says NXDOMAIN for. After b leaves: no overlay address
    after 10 s, and never an EDE 3 (Stale Answer). resolved does not pass EDE on, so two more
    200 ms clients ask horizon-dns directly."""
    world.baseline()
    names = {"nodeb": INSIDE, "peer1": PEERS["peer1"]}
    slots = {f"{name}{via}": name for name in names for via in ("", "@5300")}

    def inside(r: Record) -> bool:
        return r.status == "NOERROR" and r.addresses == (names[r.name],)

    def gone(r: Record) -> bool:  # answered, without the overlay address: SERVFAIL, NXDOMAIN
        return r.answered and names[r.name] not in r.addresses

    with horizon(world, "single-label") as server, client(world) as c:
        for slot, name in slots.items():
            c.add(slot, [name], via="direct" if "@" in slot else "resolved")
        warm_up(c, list(slots), inside, server)
        try:
            phase = run_phase(c, "single-label:leave", list(slots), world.b_leaves, gone, inside, LEAVE_BOUND)
            t_change = phase.t_change or time.monotonic()
            c.wait_until(t_change + LEAVE_BOUND + 3)  # so that "after the bound" is seen
        finally:
            world.b_returns()
        records = c.records()
    late = [f"+{r.t_done - t_change:.1f}s {r.slot} {r.brief()}" for r in records
            if r.t_done > t_change + LEAVE_BOUND and names[r.name] in r.addresses]  # fmt: skip
    stale = [f"{r.t_done - t_change:+.1f}s {r.slot} {r.brief()}" for r in records if 3 in r.ede]
    print(f"single-label: {len(late)} overlay answers after the bound, {len(stale)} with EDE 3")
    extra = []
    if late:
        extra.append(f"single-label: {len(late)} overlay answers after the bound, e.g. {late[:3]}")
    if stale:
        extra.append(f"single-label: {len(stale)} answers with EDE 3 (Stale Answer), e.g. {stale[:3]}")
    check([phase], extra)


FLOOD = r"""
import json, os, select, socket, struct, sys, time
rate, seconds, port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
total = int(rate * seconds)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.connect(("127.0.0.1", port))
sock.setblocking(False)
tag = os.urandom(3).hex()

def query(i):
    name = b"".join(bytes([len(x)]) + x for x in (f"f{tag}x{i}".encode(), b"mydomain", b"tld")) + b"\0"
    return struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)

replies = {}
def drain():
    for _ in range(100000):
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionRefusedError:
            data = b"\0\0\0\xff"
        code = str(data[3] & 0xF) if len(data) > 3 else "short"
        replies[code] = replies.get(code, 0) + 1

start = time.monotonic()
sent = failed = 0
while sent + failed < total and time.monotonic() - start < 2 * seconds:
    due = min(total, int((time.monotonic() - start) * rate) + 1)
    while sent + failed < due:
        try:
            sock.send(query(sent + failed))
            sent += 1
        except OSError:
            failed += 1
    drain()
    select.select([sock], [], [], 0.002)
end = time.monotonic()
while time.monotonic() < end + 1.5:
    select.select([sock], [], [], 0.05)
    drain()
print(json.dumps({"start": start, "end": end, "sent": sent, "failed": failed, "replies": replies}))
"""

COUNT_MULTICAST = """
table inet hzswitch {
  chain out {
    type filter hook output priority 0; policy accept;
    ip daddr 224.0.0.251 udp dport 5353 counter
    ip daddr 224.0.0.252 udp dport 5355 counter
    ip6 daddr ff02::fb udp dport 5353 counter
    ip6 daddr ff02::1:3 udp dport 5355 counter
  }
}
"""


def multicast_sent(world: World) -> dict[str, int]:
    """Packets node a sent to the mDNS and LLMNR groups, by group (nft counters)."""
    out = subprocess.run(
        ["ip", "netns", "exec", world.ns("a"), "nft", "-j", "list", "table", "inet", "hzswitch"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    counts: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        group = next(e["match"]["right"] for e in rule["expr"] if "match" in e)
        counts[group] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return counts


@pytest.mark.timeout(150)
def test_flood_never_picks_the_public_horizon(world: World) -> None:
    """6: from node a, 2,500 random names a second under mydomain.tld for 5 s straight at
    horizon-dns, while the 200 ms client asks names that ARE on the overlay: nodeb (warm)
    and peer1..peer6 (cold, in turn: each first asked during the flood). They never get
    the public answer (SERVFAIL is acceptable under overload, DECISIONS.md 1), and the
    multicast queries a sends stay under multicast_rate (50/s, burst 100)."""
    world.baseline()
    table = world.work / "count.nft"
    table.write_text(COUNT_MULTICAST)
    subprocess.run(["ip", "netns", "exec", world.ns("a"), "nft", "-f", str(table)], check=True, timeout=10)
    try:
        with horizon(world, "flood") as server, client(world) as c:
            for name in (NODEB, WWW):
                c.add(name, [name])
            warm_up(c, [NODEB, WWW], overlay, server)
            before = multicast_sent(world)
            t_before = time.monotonic()
            c.add("peers", [f"{peer}.mydomain.tld" for peer in PEERS])
            log = world.work / "flood.log"
            flood = world.lab.spawn(
                "a", sys.executable, "-c", FLOOD, str(FLOOD_QPS), str(FLOOD_SECONDS), "5300", log=log
            )
            flood.wait(timeout=4 * FLOOD_SECONDS + 10)
            result = json.loads(log.read_text().strip().splitlines()[-1])
            t_end = result["end"] + FLOOD_TAIL
            c.wait_until(t_end)
            after = multicast_sent(world)
            t_after = time.monotonic()
            records = [r for r in c.records() if t_before <= r.t_sent <= t_end]
    finally:
        subprocess.run(["ip", "netns", "exec", world.ns("a"), "nft", "delete", "table", "inet", "hzswitch"],
                       timeout=10, check=False)  # fmt: skip
    seconds = t_after - t_before
    qps = result["sent"] / (result["end"] - result["start"])
    packets = {group: after[group] - before.get(group, 0) for group in after}
    total = sum(packets.values())
    allowed = MULTICAST_RATE * seconds + MULTICAST_BURST
    t0 = result["start"]
    wrong = [f"+{r.t_done - t0:.2f}s {r.name} {r.brief()}" for r in records if PUBLIC in r.addresses]
    seen = Counter(f"{r.slot}: {'overlay' if inside_any(r) else r.status}" for r in records)
    print(
        f"\nSWITCH flood: {result['sent']} queries in {result['end'] - result['start']:.2f} s ({qps:.0f}/s), "
        f"replies by rcode {result['replies']}; multicast sent {total} in {seconds:.1f} s "
        f"(allowed {allowed:.0f}) {packets}; client answers {dict(seen)}; public answers to inside names: "
        f"{len(wrong)}"
    )
    failures = []
    if qps < FLOOD_MIN_QPS:
        failures.append(f"flood: only {qps:.0f} queries/s sent (want >= {FLOOD_MIN_QPS})")
    if wrong:
        failures.append(f"flood: {len(wrong)} inside names got the public answer, e.g. {wrong[:5]}")
    if total > allowed:
        failures.append(f"flood: {total} multicast packets in {seconds:.1f} s > {allowed:.0f}")
    if not any(r.slot == "peers" and overlay_peer(r) for r in records):
        failures.append("flood: no peerN name was ever answered from the overlay (is avahi on b publishing?)")
    check([], failures)


def inside_any(r: Record) -> bool:
    return r.status == "NOERROR" and any(a.startswith(OVERLAY_NET) for a in r.addresses)


def overlay_peer(r: Record) -> bool:
    return r.status == "NOERROR" and any(a in PEERS.values() for a in r.addresses)


@switch_timeout(LEAVE_BOUND, RETURN_BOUND)
def test_without_multicast_peer_leaves_and_returns(world: World) -> None:
    """7: the same leave/return timeline on a tailscale-like overlay: multicast dropped on the
    bridge, the overlay stage asks peers [100.64.0.2, 100.64.0.3] directly (methods [peers]);
    b answers by LLMNR over TCP (resolved) and legacy unicast mDNS (avahi)."""
    world.baseline()
    world.lab.block_multicast()
    try:
        leave_and_return(world, "peers", peers=["100.64.0.2", "100.64.0.3"])
    finally:
        world.lab.allow_multicast()
