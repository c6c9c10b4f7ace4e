"""contrib/systemd-resolved/ as shipped: a real systemd-resolved given exactly its files; the unit's sandbox.

node a: systemd-resolved whose own lab.conf says the opposite of the drop-in (LLMNR=resolve,
        a dead server 127.0.0.1:5399, another routing domain), then the shipped
        resolved.conf.d/horizon-dns.conf as zz-horizon-dns.conf, which sorts after it;
        horizon-dns on 127.0.0.1:5300 with an LLMNR responder (alias hub, device printer).
        Every lookup goes through resolved's stub, 127.0.0.53.
node c: the per-link variant: resolved.conf.d/horizon-dns-per-link.conf and the
        `resolvectl` lines documented in networkd/horizon-dns.conf, run as written.
node b: horizon-dns inside as much of horizon-dns.service's sandbox as exists without
        systemd as PID 1: the kernel's memory-deny-write-execute (PR_SET_MDWE), every
        system call recorded by strace and checked against the unit's SystemCallFilter=,
        and a $NOTIFY_SOCKET that receives what Type=notify waits for.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from lab import LAB, ROOT, Lab, LabServer, lab, start_lab_server

pytestmark = pytest.mark.lab

CONTRIB = ROOT / "contrib" / "systemd-resolved"
DROP_IN = CONTRIB / "resolved.conf.d" / "horizon-dns.conf"
PER_LINK_DROP_IN = CONTRIB / "resolved.conf.d" / "horizon-dns-per-link.conf"
NETWORKD = CONTRIB / "networkd" / "horizon-dns.conf"
UNIT = CONTRIB / "horizon-dns.service"

RULES = r"""
zones:
  mydomain.tld:
    stages:
      - template:
          name: service-cname
          type: [A, AAAA]
          match: ['^(?P<p>.+)\.nodeb\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN CNAME nodeb.mydomain.tld.']
      - template:
          name: nodeb
          type: [A]
          match: ['^nodeb\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN A 100.64.0.2']
"""


def server_file(aliases: list[str], devices: dict[str, list[str]], metrics: bool = False) -> str:
    """The embedded default's zone "." (cache, then the overlay for single-label names) without
    forwarding -- nothing leaves the lab -- on the port the drop-in names, with a query log."""
    default = yaml.safe_load((ROOT / "horizon_dns" / "default.yaml").read_text())
    stages = [stage for stage in default["zones"]["."]["stages"] if "forward" not in stage]
    server = {
        "listen": ["127.0.0.1:5300"],
        "rules": "rules",
        "metrics": {"listen": "127.0.0.1:9153"} if metrics else False,
        "query_log": {"sample": 1.0},
        "llmnr": {"interfaces": ["eth0"], "aliases": aliases, "devices": devices},
        "zones": {".": {"stages": stages}},
    }
    return yaml.safe_dump(server)


@dataclass
class Answer:
    status: str
    records: list[str]
    ms: float


def stub(the_lab: Lab, node: str, name: str, *options: str) -> Answer:
    """Ask resolved's stub in ``node``, as every program there does."""
    out = the_lab.exec(
        node, "dig", "@127.0.0.53", name, "+tries=1", "+time=5", "+noall", "+answer", "+comments", "+stats",
        *options,
    ).stdout  # fmt: skip
    status = re.search(r"status: (\w+)", out)
    took = re.search(r"Query time: (\d+) msec", out)
    records = [" ".join(line.split()[3:]) for line in out.splitlines() if line and not line.startswith(";")]
    return Answer(status.group(1) if status else "NO-ANSWER", records, float(took.group(1)) if took else -1.0)


def resolvectl(the_lab: Lab, node: str, *args: str) -> str:
    bus = f"unix:path=/run/{the_lab.prefix}/{node}/resolved/dbus/system_bus_socket"
    result = the_lab.exec(node, "env", f"DBUS_SYSTEM_BUS_ADDRESS={bus}", "resolvectl", *args)
    return result.stdout + result.stderr


def start_resolved(the_lab: Lab, node: str, drop_in: Path, *lab_options: str) -> Path:
    """resolved in ``node`` with ``drop_in`` as zz-horizon-dns.conf, after the lab's own lab.conf."""
    conf_d = Path(f"/run/{the_lab.prefix}/{node}/resolved/conf.d")
    conf_d.mkdir(parents=True, exist_ok=True)
    shutil.copy(drop_in, conf_d / "zz-horizon-dns.conf")  # start-resolved.sh rewrites only lab.conf
    the_lab.run("start-resolved.sh", node, "--dbus", *lab_options, timeout=60)
    return conf_d.parent / "log"


def port_5355(the_lab: Lab, node: str) -> str:
    return the_lab.exec(node, "ss", "-Hlnp", "sport = :5355").stdout


def queries(server: LabServer, name: str, qtype: str = "A") -> int:
    """How many times ``name`` reached horizon-dns, by its query log."""
    return len(re.findall(rf"client=127\.0\.0\.1 \S+ name={re.escape(name)}\. type={qtype} ", server.text()))


def wait_for_count(server: LabServer, name: str, count: int) -> int:
    deadline = time.monotonic() + 3
    while (seen := queries(server, name)) < count and time.monotonic() < deadline:
        time.sleep(0.02)  # the query log is another process's file: poll it
    return seen


@pytest.fixture(scope="module")
def the_lab() -> Iterator[Lab]:
    with lab("hzr") as running:
        yield running


# -- the global drop-in, node a ------------------------------------------------------------


@dataclass
class GlobalSetup:
    lab: Lab
    server: LabServer
    resolved_log: Path
    port_5355_before: str
    before_us: Answer


@pytest.fixture(scope="module")
def global_setup(the_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlobalSetup]:
    # lab.conf says the opposite of the drop-in; --llmnr resolve also spares the lab
    # script its wait for an LLMNR probe, which never comes with LLMNR=no.
    log = start_resolved(
        the_lab, "a", DROP_IN, "--llmnr", "resolve", "--dns", "127.0.0.1:5399", "--domains", "~lab.invalid"
    )
    try:
        before_5355 = port_5355(the_lab, "a")
        before_us = stub(the_lab, "a", "www.nodeb.mydomain.tld")  # horizon-dns is not up yet
        work = tmp_path_factory.mktemp("global")
        server = start_lab_server(
            the_lab, "a", work, server_file(["hub"], {"printer": ["100.64.0.22"]}), RULES
        )
        try:
            server.wait_for("LLMNR responder for")
            yield GlobalSetup(the_lab, server, log, before_5355, before_us)
        finally:
            server.stop()
        assert "Traceback" not in server.text(), server.text()
    finally:
        the_lab.run("start-resolved.sh", "stop", "a", check=False)


def test_shipped_drop_in_overrides_what_came_before(global_setup: GlobalSetup) -> None:
    the_lab = global_setup.lab
    # DNS= is a list that adds up across files: the drop-in's empty DNS= dropped 5399.
    assert resolvectl(the_lab, "a", "dns").splitlines()[0] == "Global: 127.0.0.1:5300"
    assert resolvectl(the_lab, "a", "llmnr").splitlines()[0] == "Global: no"
    assert "~mydomain.tld" in resolvectl(the_lab, "a", "domain").splitlines()[0]
    status = resolvectl(the_lab, "a", "status")
    assert "-LLMNR" in status and "5399" not in status, status
    assert "5399" not in global_setup.resolved_log.read_text()  # never asked


def test_llmnr_port_is_left_to_horizon_dns(global_setup: GlobalSetup) -> None:
    assert global_setup.port_5355_before == "", global_setup.port_5355_before  # resolved holds nothing
    text = global_setup.server.text()
    assert "TCP port 5355 is in use" not in text
    held = port_5355(global_setup.lab, "a")
    assert re.search(r"^tcp .*100\.64\.0\.1:5355 .*python", held, re.M), held
    assert "systemd-resolve" not in held


def test_overlay_domain_reaches_horizon_dns_through_the_stub(global_setup: GlobalSetup) -> None:
    # Before horizon-dns listened, resolved failed the lookup at once (connection refused).
    assert global_setup.before_us.status == "SERVFAIL" and 0 <= global_setup.before_us.ms < 1000
    answer = stub(global_setup.lab, "a", "www.nodeb.mydomain.tld")
    assert answer.status == "NOERROR"
    assert answer.records == ["CNAME nodeb.mydomain.tld.", "A 100.64.0.2"], answer
    print(f"\nstub -> horizon-dns, www.nodeb.mydomain.tld: {answer.ms:.0f} ms")


def test_single_label_names_reach_horizon_dns_as_unicast_dns(global_setup: GlobalSetup) -> None:
    """ResolveUnicastSingleLabel=yes with LLMNR=no: resolved sends `printer` to DNS=, where the
    zone "." of the server file (the embedded default's) asks the overlay; here this node's own
    LLMNR responder answers it."""
    the_lab, server = global_setup.lab, global_setup.server
    for name, address in (("printer", "100.64.0.22"), ("hub", "100.64.0.1")):
        answer = stub(the_lab, "a", name)
        assert answer.records == [f"A {address}"], (name, answer, server.text()[-2000:])
        assert wait_for_count(server, name, 1) >= 1, server.text()[-2000:]
    line = re.search(r"client=127\.0\.0\.1 transport=udp name=printer\. type=A zone=\. (.*)", server.text())
    assert line is not None and "rcode=NOERROR" in line.group(1), server.text()[-2000:]
    assert "overlay:single-label" in line.group(1), line.group(1)


def test_resolved_keeps_no_copy_of_our_answers(global_setup: GlobalSetup) -> None:
    """CacheFromLocalhost=no (the default): every lookup reaches horizon-dns, which caches."""
    the_lab, server = global_setup.lab, global_setup.server
    name = "www.nodeb.mydomain.tld"
    before = queries(server, name)
    for _ in range(2):
        assert stub(the_lab, "a", name).status == "NOERROR"
    assert wait_for_count(server, name, before + 2) == before + 2, server.text()[-2000:]


# -- the per-link variant, node c ----------------------------------------------------------


def test_per_link_variant_sends_only_the_overlay_domain(
    the_lab: Lab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    network = NETWORKD.read_text()
    commands = [shlex.split(line) for line in re.findall(r"^#\s+(resolvectl .+)$", network, re.M)]
    assert [c[1] for c in commands] == ["dns", "domain", "llmnr"], commands
    # The run-time lines say what the [Network] section says.
    section = configparser.ConfigParser(strict=False, interpolation=None)
    section.read_string(network)
    settings = section["Network"]
    assert [c[3] for c in commands] == [settings["DNS"], settings["Domains"], settings["LLMNR"]]

    # No global server, no global domain (the lab's defaults would set both); LLMNR=resolve
    # globally, which the per-link drop-in turns off.
    log = start_resolved(the_lab, "c", PER_LINK_DROP_IN, "--llmnr", "resolve", "--dns", "", "--domains", "")
    try:
        for command in commands:
            out = resolvectl(the_lab, "c", *[("eth0" if word == "zt0" else word) for word in command[1:]])
            assert out.strip() == "", out
        assert port_5355(the_lab, "c") == ""  # LLMNR=no on the link alone would not free it
        server = start_lab_server(
            the_lab, "c", tmp_path_factory.mktemp("per-link"), server_file(["wiki"], {}), RULES
        )
        try:
            assert "TCP port 5355 is in use" not in server.wait_for("LLMNR responder for")
            status = resolvectl(the_lab, "c", "status", "eth0")
            assert "-DefaultRoute" in status and "127.0.0.1:5300" in status, status

            answer = stub(the_lab, "c", "www.nodeb.mydomain.tld")
            assert answer.records == ["CNAME nodeb.mydomain.tld.", "A 100.64.0.2"], (answer, log.read_text())
            # Other names, and single labels, never come to horizon-dns on this link.
            for name in ("something.example", "printer"):
                assert stub(the_lab, "c", name).status != "NOERROR"
                assert queries(server, name) == 0, server.text()[-2000:]

            # The commented alternative: a search domain, and no default route.
            assert "\n#Domains=mydomain.tld\n#DNSDefaultRoute=no\n" in network
            assert resolvectl(the_lab, "c", "domain", "eth0", "mydomain.tld").strip() == ""
            assert resolvectl(the_lab, "c", "default-route", "eth0", "no").strip() == ""
            found = resolvectl(the_lab, "c", "query", "-4", "nodeb")
            assert "nodeb: 100.64.0.2" in found and "(nodeb.mydomain.tld)" in found, found
            assert "No appropriate name servers" in resolvectl(the_lab, "c", "query", "something.example")
            assert queries(server, "something.example") == 0
        finally:
            server.stop()
        assert "Traceback" not in server.text(), server.text()
    finally:
        the_lab.run("start-resolved.sh", "stop", "c", check=False)


# -- the unit's sandbox, node b ------------------------------------------------------------

# Sets the kernel's memory-deny-write-execute (Linux >= 6.3), inherited by every child and
# kept across execve -- what MemoryDenyWriteExecute=yes enforces -- then runs argv[1:].
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0:
    print("MDWE: on", file=sys.stderr, flush=True)
else:
    print("MDWE: unsupported:", os.strerror(ctypes.get_errno()), file=sys.stderr, flush=True)
os.execvp(sys.argv[1], sys.argv[1:])
"""

FETCH_READY = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9153/ready', timeout=5).status)"


@functools.cache
def syscalls_in(group: str) -> frozenset[str]:
    """The system calls of a systemd filter group, nested groups expanded."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= syscalls_in(word) if word.startswith("@") else {word}
    return frozenset(names)


def unit_allows() -> frozenset[str]:
    """What the unit's SystemCallFilter= lines let through, read from the unit itself."""
    allowed: frozenset[str] = frozenset()
    for value in re.findall(r"^SystemCallFilter=(.*)$", UNIT.read_text(), re.M):
        deny = value.startswith("~")
        names = frozenset().union(
            *(syscalls_in(w) if w.startswith("@") else {w} for w in value.lstrip("~").split())
        )
        allowed = allowed - names if deny else allowed | names
    return allowed


@dataclass
class SandboxRun:
    log: str
    notifications: list[tuple[int, str]]
    used: set[str]
    answers: dict[str, Answer] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None


def receive(sock: socket.socket, until: str, timeout: float) -> list[tuple[int, str]]:
    """sd_notify datagrams, with the sender's PID (SCM_CREDENTIALS), up to one containing ``until``."""
    got: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while not any(until in text.split("\n") for _, text in got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no {until} within {timeout} s; got {got}") from None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iii", payload[:12])[0]
        got.append((pid, data.decode()))
    return got


@pytest.fixture(scope="module")
def sandbox_run(the_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> SandboxRun:
    strace = require_tool("strace")
    require_tool("systemd-analyze")
    work = tmp_path_factory.mktemp("sandbox")
    (work / "rules").mkdir()
    (work / "rules" / "10-test.yaml").write_text(textwrap.dedent(RULES))
    config = work / "horizon.yaml"
    config.write_text(server_file(["grafana"], {}, metrics=True))
    trace, log = work / "trace", work / "server.log"
    notify_path = work / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    command = [
        "env", f"PYTHONPATH={ROOT}", f"NOTIFY_SOCKET={notify_path}",
        sys.executable, "-c", MDWE_EXEC,
        strace, "-f", "-qq", "-o", str(trace),
        sys.executable, "-m", "horizon_dns", "--log-level", "debug", "serve", "--config", str(config),
    ]  # fmt: skip
    proc = the_lab.spawn("b", *command, log=log)
    run = SandboxRun("", [], set())
    try:
        run.notifications += receive(sock, "READY=1", timeout=40)  # strace slows the start
        pid = run.notifications[-1][0]
        for name, options in (
            ("www.nodeb.mydomain.tld", ()),
            ("www.nodeb.mydomain.tld", ("+tcp",)),
            ("grafana", ()),  # zone "." -> overlay -> LLMNR -> our own responder
            ("nosuchhost", ()),  # the overlay's mDNS and LLMNR both miss
        ):
            out = the_lab.exec("b", "dig", "@127.0.0.1", "-p", "5300", name, "+short", "+time=5", *options)
            run.answers[" ".join((name, *options))] = Answer("", out.stdout.split(), 0)
        probe = the_lab.exec(
            "c", "python3", str(LAB / "llmnr_query.py"), "grafana", "--to", "100.64.0.2", "--tcp"
        )
        run.extra["llmnr tcp"] = probe.stdout + probe.stderr
        run.extra["ready"] = the_lab.exec("b", "python3", "-c", FETCH_READY).stdout.strip()
        os.kill(pid, signal.SIGHUP)
        run.notifications += receive(sock, "READY=1", timeout=20)
        after = the_lab.exec("b", "dig", "@127.0.0.1", "-p", "5300", "www.nodeb.mydomain.tld", "+short")
        run.answers["after reload"] = Answer("", after.stdout.split(), 0)
        os.kill(pid, signal.SIGTERM)
        run.notifications += receive(sock, "STOPPING=1", timeout=20)
        run.returncode = proc.wait(30)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    run.log = log.read_text()
    run.used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    return run


def test_server_runs_under_memory_deny_write_execute(sandbox_run: SandboxRun) -> None:
    """MemoryDenyWriteExecute=yes: CPython without a JIT never needs writable+executable memory."""
    if "MDWE: on" not in sandbox_run.log:
        reason = "this kernel has no PR_SET_MDWE (Linux >= 6.3): " + sandbox_run.log.splitlines()[0]
        pytest.skip(reason)  # a kernel feature, not a tool CI could install
    assert sandbox_run.returncode == 0, sandbox_run.log[-3000:]
    assert sandbox_run.answers["www.nodeb.mydomain.tld"].records == ["nodeb.mydomain.tld.", "100.64.0.2"]
    assert "reloaded:" in sandbox_run.log and "Traceback" not in sandbox_run.log, sandbox_run.log[-3000:]


def test_server_speaks_type_notify(sandbox_run: SandboxRun) -> None:
    states = [text for _, text in sandbox_run.notifications]
    assert states[0].startswith("READY=1\n"), states
    assert states[1].startswith("RELOADING=1\nMONOTONIC_USEC="), states
    assert states[2:] == ["READY=1", "STOPPING=1"], states
    assert len({pid for pid, _ in sandbox_run.notifications}) == 1  # all from the main PID


def test_server_uses_only_system_calls_the_unit_allows(sandbox_run: SandboxRun) -> None:
    """SystemCallFilter=@system-service and ~@privileged @resources: a call outside them would
    kill the service (SIGSYS). Recorded over start, UDP and TCP queries, overlay lookups
    (mDNS, LLMNR), the LLMNR responder over UDP and TCP, metrics, reload and stop."""
    run = sandbox_run
    assert run.answers["www.nodeb.mydomain.tld +tcp"].records == ["nodeb.mydomain.tld.", "100.64.0.2"]
    assert run.answers["grafana"].records == ["100.64.0.2"], run.log[-3000:]
    assert run.answers["nosuchhost"].records == []
    assert run.answers["after reload"].records == ["nodeb.mydomain.tld.", "100.64.0.2"]
    assert "TCP reply from 100.64.0.2" in run.extra["llmnr tcp"], run.extra["llmnr tcp"]
    assert run.extra["ready"] == "200"
    assert len(run.used) > 30, run.used  # strace saw the server
    forbidden = run.used - unit_allows()
    assert not forbidden, f"system calls the unit would kill the service for: {sorted(forbidden)}"
    print(f"\n{len(run.used)} distinct system calls, all allowed by the unit")


# -- the unit file -------------------------------------------------------------------------


def test_port_53_variant_of_the_unit_keeps_its_capability(tmp_path: Path) -> None:
    """The unit says: uncomment two lines to listen on port 53. Done, the bounding set must
    still hold CAP_NET_BIND_SERVICE (an empty CapabilityBoundingSet= after them would reset it)."""
    analyze = require_tool("systemd-analyze")
    text = UNIT.read_text().replace("/usr/local/bin/horizon-dns", shutil.which("true") or "/bin/true")
    port_53 = re.sub(r"^#((?:Ambient|CapabilityBounding)\w*=CAP_NET_BIND_SERVICE)$", r"\1", text, flags=re.M)
    for line in ("CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE"):
        assert f"\n{line}\n" in port_53, "the unit no longer has the commented port-53 lines"
    unit = tmp_path / "horizon-dns.service"
    for content, elevated in ((text, False), (port_53, True)):
        unit.write_text(content)
        verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
        security = subprocess.run(
            [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True
        ).stdout
        line = re.search(r"^(.) CapabilityBoundingSet=~CAP_NET_\(BIND_SERVICE.*$", security, re.M)
        assert line is not None, security[-2000:]
        assert (line.group(1) == "✗") == elevated, line.group(0)
