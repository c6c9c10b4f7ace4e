"""Operations: metrics, /health and /ready, explain, hot reload, query log, EDE and NSID in dig."""

from __future__ import annotations

import asyncio
import errno
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from conftest import SEED_RULES, ServerProcess, require_tool, start_server
from helpers import config_from, udp_exchange

from horizon_dns.config.schema import ListenAddress
from horizon_dns.core.handler import QueryHandler
from horizon_dns.explain import explain, explain_query
from horizon_dns.metrics import MetricsServer, Sources
from horizon_dns.net.server import BindError, DnsServer
from horizon_dns.stages.overlay import OverlayStage


def metrics_port(server: ServerProcess) -> int:
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log_text())
    assert found, server.log_text()
    return int(found.group(1))


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def ask(server: ServerProcess, name: str, qtype: str = "A", **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    return dns.query.udp(query, server.host, port=server.port, timeout=3)


def test_metrics_count_what_was_asked(tmp_path: Path) -> None:
    server = start_server(tmp_path, SEED_RULES)
    try:
        for _ in range(3):
            assert ask(server, "www.nodeb.mydomain.tld").rcode() == dns.rcode.NOERROR
        for _ in range(2):
            assert ask(server, "example.org").rcode() == dns.rcode.REFUSED
        ask(server, "nodeb.mydomain.tld", "MX")
        port = metrics_port(server)
        status, text = get(port, "/metrics")
        assert status == 200
        zone = "mydomain.tld."
        assert sample(text, "horizon_dns_responses_total", zone=zone, qtype="A", rcode="NOERROR") == 3
        assert sample(text, "horizon_dns_responses_total", zone="-", qtype="A", rcode="REFUSED") == 2
        assert sample(text, "horizon_dns_responses_total", zone=zone, qtype="MX", rcode="NOERROR") == 1
        assert sample(text, "horizon_dns_replies_by_stage_total", stage="template:service-cname") == 3
        assert sample(text, "horizon_dns_replies_by_stage_total", stage="pipeline", reason="no-zone") == 2
        assert sample(text, "horizon_dns_request_duration_seconds_count", zone=zone) == 4
        assert sample(text, "horizon_dns_stage_duration_seconds_count", stage="template:service-cname") >= 4
        assert sample(text, "horizon_dns_ready") == 1
        assert sample(text, "horizon_dns_udp_replies_dropped_total") == 0
        assert "example.org" not in text and "nodeb" not in text  # never labelled by query name
        assert get(port, "/health") == (200, "ok\n")
        assert get(port, "/ready") == (200, "ready\n")
        assert get(port, "/nothing")[0] == 404
    finally:
        server.stop()


def test_ready_is_503_until_the_listeners_are_bound(tmp_path: Path) -> None:
    config = config_from(tmp_path, SEED_RULES)

    async def scenario() -> tuple[int, int]:
        sources = Sources(QueryHandler(config.pipeline()))
        metrics = MetricsServer(sources, "127.0.0.1", 0)
        await metrics.start()
        loop = asyncio.get_running_loop()
        try:
            before = await loop.run_in_executor(None, get, metrics.port, "/ready")
            sources.ready = True  # what Runtime.run does once the DNS listeners are bound
            after = await loop.run_in_executor(None, get, metrics.port, "/ready")
        finally:
            await metrics.stop()
        return before[0], after[0]

    assert asyncio.run(scenario()) == (503, 200)


# explain ---------------------------------------------------------------------------

EXPLAIN_RULES = r"""
zones:
  mydomain.tld:
    fallback: {zone: "."}
    stages:
      - cache: {}
      - template:
          name: service-cname
          type: [A]
          match: ['^(?P<p>.+)\.(?P<h>[^.]+)\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN CNAME {{ group.h }}.mydomain.tld.']
      - template:
          name: static
          type: [A]
          match: ['^nodeb\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN A 100.64.0.2']
      - overlay: {methods: [mdns], timeout: 0.05}
  .:
    stages:
      - template:
          name: public
          type: [A]
          answer: ['{{ name }} 300 IN A 203.0.113.10']
"""


def test_explain_shows_template_hit_chase_fallback_and_cache(tmp_path: Path) -> None:
    config = config_from(tmp_path, EXPLAIN_RULES)
    pipeline = config.pipeline()
    overlay = next(s for s in pipeline.stages if isinstance(s, OverlayStage))

    async def nobody(host: str, version: int, timeout: float) -> list:  # type: ignore[type-arg]
        return []  # an mDNS miss, without touching the network

    overlay.methods = {"mdns": nobody}
    overlay.services = []

    async def run() -> list[str]:
        await pipeline.start()
        try:
            return [
                (await explain_query(pipeline, name, "A", "127.0.0.1"))[0]
                for name in (
                    "nodeb.mydomain.tld",
                    "www.nodeb.mydomain.tld",
                    "ghost.mydomain.tld",
                    "www.nodeb.mydomain.tld",
                )
            ]
        finally:
            await pipeline.stop()

    hit, chase, fallback, cached = asyncio.run(run())
    assert "stage template:static" in hit and "rendered 'nodeb.mydomain.tld. 60 IN A 100.64.0.2'" in hit
    assert "answered by: template:static" in hit
    assert "matched" in chase and "groups {'p': 'www', 'h': 'nodeb'}" in chase
    assert "chase CNAME -> nodeb.mydomain.tld." in chase and "100.64.0.2" in chase
    assert "IPv4 of ghost: not found" in fallback
    assert "fallback: overlay:mydomain.tld said NXDOMAIN -> zone ." in fallback
    assert "reason fallback:overlay:mydomain.tld NXDOMAIN" in fallback and "203.0.113.10" in fallback
    assert "cache hit" in cached and "answered by: cache" in cached and "100.64.0.2" in cached


def test_explain_cli_offline_exit_code(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10.yaml").write_text(textwrap.dedent(EXPLAIN_RULES))
    (tmp_path / "h.yaml").write_text("rules: rules\n")
    command = ["python", "-m", "horizon_dns", "explain", "--config", str(tmp_path / "h.yaml")]
    run = subprocess.run(
        [*command, "--offline", "ghost.mydomain.tld"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr  # offline: the overlay is skipped, fallback answers
    assert "overlay" not in run.stdout.split("answered by")[0] and "203.0.113.10" in run.stdout
    # A name typed in Unicode is asked in its IDNA form, as a stub resolver would send it.
    run = subprocess.run(
        [*command, "--offline", "bücher.mydomain.tld"], capture_output=True, text=True, timeout=60
    )
    assert "query: xn--bcher-kva.mydomain.tld. A" in run.stdout, run.stdout + run.stderr
    run = subprocess.run(
        [*command, "--client", "notanip", "x.test"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "'notanip' does not appear to be an IPv4 or IPv6 address" in run.stderr
    (tmp_path / "b").mkdir()
    config = config_from(tmp_path / "b", EXPLAIN_RULES)
    _text, rcode = asyncio.run(explain(config, "x.nowhere", "A", "127.0.0.1", offline_only=True))
    assert rcode == 0  # zone "." answers everything here


# Reload ----------------------------------------------------------------------------

RELOAD_RULES = r"""
zones:
  mydomain.tld:
    stages:
      - cache: {}
      - template:
          type: [A]
          answer: ['{{ name }} 60 IN A 100.64.0.1']
"""


def test_reload_under_load_drops_nothing_and_broken_yaml_keeps_the_old_config(tmp_path: Path) -> None:
    server = start_server(tmp_path, RELOAD_RULES, "watch: false\n")
    rules = tmp_path / "rules" / "10-test.yaml"
    failures: list[str] = []
    answers: set[str] = set()
    stop = threading.Event()
    count = 0

    def load() -> None:
        nonlocal count
        client = dns.query
        while not stop.is_set() and count < 20000:  # bounded: stops by itself
            count += 1
            try:
                reply = client.udp(
                    dns.message.make_query(f"n{count % 50}.mydomain.tld", "A"),
                    server.host,
                    port=server.port,
                    timeout=2,
                )
                if reply.rcode() != dns.rcode.NOERROR:
                    failures.append(dns.rcode.to_text(reply.rcode()))
                for rrset in reply.answer:
                    answers.update(str(rr) for rr in rrset)
            except Exception as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.3)  # let the load run before the reload (the load is the thing under test)
        rules.write_text(textwrap.dedent(RELOAD_RULES).replace("100.64.0.1", "100.64.0.9"))
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded:" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        # Now a broken file: the old (new) config must keep serving.
        broken = "zones:\n  mydomain.tld:\n    stages:\n"
        broken += "      - template: {answer: ['x 1 IN A 1.2.3.4'], bogus: 1}\n"
        rules.write_text(broken)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload rejected" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    try:
        log = server.log_text()
        assert failures == [], failures[:5]
        assert count > 50
        assert "100.64.0.9" in answers  # the valid change took effect...
        after = ask(server, "late.mydomain.tld")
        assert [str(rr) for rr in after.answer[0]] == ["100.64.0.9"]  # ...and survived the broken one
        assert "reload rejected, the old configuration keeps serving" in log
        assert re.search(r"rules/10-test\.yaml:4: .*unknown key 'bogus'", log), log[-2000:]
        port = metrics_port(server)
        _, text = get(port, "/metrics")
        assert sample(text, "horizon_dns_reloads_total", result="ok") == 1
        assert sample(text, "horizon_dns_reloads_total", result="error") == 1
        print(f"\nreload under load: {count} queries, 0 failures")
    finally:
        assert server.stop() == 0


def test_reload_on_file_change_without_a_signal(tmp_path: Path) -> None:
    server = start_server(tmp_path, RELOAD_RULES)
    try:
        assert [str(rr) for rr in ask(server, "a.mydomain.tld").answer[0]] == ["100.64.0.1"]
        (tmp_path / "rules" / "10-test.yaml").write_text(
            textwrap.dedent(RELOAD_RULES).replace("100.64.0.1", "100.64.0.7")
        )
        deadline = time.monotonic() + 10
        while "reloaded:" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reloading (file change)" in server.log_text()
        assert [str(rr) for rr in ask(server, "b.mydomain.tld").answer[0]] == ["100.64.0.7"]
    finally:
        server.stop()


def test_cache_survives_a_reload_only_when_its_zone_is_unchanged(tmp_path: Path) -> None:
    from horizon_dns.runtime import carry_caches

    old = config_from(tmp_path, RELOAD_RULES).pipeline()
    old_cache = old.zones["mydomain.tld."].stages[0]
    old_cache.entries[b"key"] = object()  # type: ignore[assignment, attr-defined]
    for edit in (("cache: {}", "cache: {max_entries: 5}"), ("100.64.0.1", "100.64.0.2")):
        changed = config_from(tmp_path, RELOAD_RULES.replace(*edit)).pipeline()
        assert carry_caches(old, changed) == 0  # the cache or what it caches changed
    same = config_from(tmp_path, RELOAD_RULES).pipeline()
    assert carry_caches(old, same) == 1


# Query log, EDE and NSID seen by dig ---------------------------------------------------


def test_query_log_and_dig_sees_ede_and_nsid(tmp_path: Path) -> None:
    dig = require_tool("dig")
    server = start_server(tmp_path, SEED_RULES, "nsid: node-under-test\nquery_log: {sample: 1.0}\n")
    try:
        out = subprocess.run(
            [dig, f"@{server.host}", "-p", str(server.port), "+nsid", "example.org"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
        assert 'NSID: 6e 6f 64 65 2d 75 6e 64 65 72 2d 74 65 73 74 ("node-under-test")' in out, out
        assert "EDE: 20 (Not Authoritative): (name is in no zone of this server)" in out, out
        out = subprocess.run(
            [dig, f"@{server.host}", "-p", str(server.port), "www.nodeb.mydomain.tld"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
        assert "NSID" not in out  # only when asked (RFC 5001 §2.1)
        log = server.log_text()
        assert re.search(
            r"client=127\.0\.0\.1 transport=udp name=example\.org\. type=A zone=- rcode=REFUSED "
            r'stage=pipeline outcome=refused reason="no-zone" ms=[\d.]+',
            log,
        ), log[-1500:]
        assert "name=www.nodeb.mydomain.tld. type=A zone=mydomain.tld. rcode=NOERROR" in log
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_nsid_over_both_transports(tmp_path: Path, transport: str) -> None:
    server = start_server(tmp_path, SEED_RULES, "nsid: n1\n", ipv6=False)
    try:
        query = dns.message.make_query(
            "nodeb.mydomain.tld", "A", use_edns=0, options=[dns.edns.GenericOption(3, b"")]
        )
        send = dns.query.udp if transport == "udp" else dns.query.tcp
        reply = send(query, server.host, port=server.port, timeout=3)
        (nsid,) = [o for o in reply.options if o.otype == 3]
        assert nsid.to_wire() == b"n1" or getattr(nsid, "nsid", b"") == b"n1"
    finally:
        server.stop()


def test_workers_share_the_port_and_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    from peers import free_port

    port = free_port()
    server = start_server(tmp_path, RELOAD_RULES, "workers: 2\n", ipv6=False, port=port)
    try:
        deadline = time.monotonic() + 15
        while server.log_text().count("ready") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p) for p in re.findall(r"started 2 workers: (\d+), (\d+)", server.log_text())[0]]
        for i in range(50):
            assert ask(server, f"w{i}.mydomain.tld").rcode() == dns.rcode.NOERROR
        import os

        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while "restarting" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r"worker 0 \(pid \d+\) exited with -9; restarting", server.log_text())
        for i in range(50):  # the other worker and then the new one keep answering
            assert ask(server, f"v{i}.mydomain.tld").rcode() == dns.rcode.NOERROR
        # Two processes, one log: each worker's lines say which worker wrote them.
        assert re.search(r"INFO worker 1 horizon_dns\.runtime: listening on", server.log_text())
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log_text()


def test_grafana_dashboard_uses_only_metrics_we_export(tmp_path: Path) -> None:
    import json

    dashboard = json.loads(
        (Path(__file__).resolve().parent.parent / "contrib/grafana/horizon-dns.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"horizon_dns_[a-z_]+", " ".join(exprs)))
    # Every stage the dashboard shows, so each reports its series (stages own them).
    rules = """
    zones:
      mydomain.tld:
        stages:
          - cache: {}
          - overlay: {methods: [llmnr], interfaces: [lo], timeout: 0.1}
      .:
        stages:
          - cache: {}
          - forward: {upstreams: ["127.0.0.1:9"], timeout: 0.1, total_timeout: 0.2}
    """
    server = start_server(tmp_path, rules)
    try:
        ask(server, "nodeb.mydomain.tld")
        _, text = get(metrics_port(server), "/metrics")
    finally:
        server.stop()
    exported = set(re.findall(r"^(horizon_dns_[a-z_]+)", text, re.M))
    for name, kind in re.findall(r"^# TYPE (horizon_dns_[a-z_]+) (\w+)", text, re.M):
        # A family with no sample yet still has its TYPE line; add its sample names.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(kind, [""])
        exported.update(name if name.endswith(suffix) else name + suffix for suffix in suffixes)
    missing = {name for name in used if name not in exported}
    assert not missing, f"the dashboard queries series that are never exported: {missing}"


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (a listener binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream:
                try:
                    stream.bind(("127.0.0.1", port))
                except OSError:
                    continue  # a client's ephemeral TCP port: try another
                return port
    raise AssertionError("no port free for both UDP and TCP")


def test_a_reload_to_a_taken_port_keeps_every_old_listener(tmp_path: Path) -> None:
    """Reported: the old listener closed first, the new bind failed, the address was lost for good."""
    handler = QueryHandler(config_from(tmp_path, SEED_RULES).pipeline())
    old, fresh = _free_port(), _free_port()
    query = dns.message.make_query("nodeb.mydomain.tld", "A").to_wire()

    async def scenario() -> None:
        server = DnsServer(handler, [ListenAddress("127.0.0.1", old)])
        await server.start()
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", 0))  # another program holds this port
        try:
            taken = int(blocker.getsockname()[1])
            with pytest.raises(BindError) as info:
                await server.rebind([ListenAddress("127.0.0.1", taken)])
            assert "holds the port" in info.value.hint
            assert [a.port for a in server.bound] == [old]
            assert await udp_exchange(old, query, 2.0) is not None  # still answering
            await server.rebind([ListenAddress("127.0.0.1", fresh)])
            assert [a.port for a in server.bound] == [fresh]
            assert await udp_exchange(fresh, query, 2.0) is not None
            try:
                gone = await udp_exchange(old, query, 0.3)
            except ConnectionRefusedError:  # the kernel's ICMP: nobody listens there
                gone = None
            assert gone is None
        finally:
            blocker.close()
            await server.stop(1)

    asyncio.run(scenario())


def test_a_reload_that_changes_workers_says_it_needs_a_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path, RELOAD_RULES, "watch: false\n", ipv6=False, port=_free_port())
    try:
        server.config.write_text(server.config.read_text() + "workers: 2\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded:" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the log: the server says when it is done
        assert "workers: 1 -> 2 takes effect at the next restart, not on reload" in server.log_text()
    finally:
        server.stop()


def test_a_bind_error_hints_at_its_usual_cause() -> None:
    assert "CAP_NET_BIND_SERVICE" in BindError("cannot listen", errno.EACCES).hint
    assert "ip addr" in BindError("cannot listen", errno.EADDRNOTAVAIL).hint
    assert "listen:" in BindError("cannot listen", None).hint


def test_a_listener_that_fails_half_way_leaves_nothing_behind(tmp_path: Path) -> None:
    """UDP bound, then TCP's listen() fails: no stray UDP listener, the lists stay parallel."""
    handler = QueryHandler(config_from(tmp_path, SEED_RULES).pipeline())
    old, fresh = _free_port(), _free_port()

    async def scenario() -> None:
        server = DnsServer(handler, [ListenAddress("127.0.0.1", old)], batched=False)
        await server.start()
        loop = asyncio.get_running_loop()

        async def refuse(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.EADDRINUSE, "Address already in use")

        loop.create_server = refuse  # type: ignore[method-assign, assignment]
        try:
            with pytest.raises(BindError):
                await server.rebind([ListenAddress("127.0.0.1", old), ListenAddress("127.0.0.1", fresh)])
            lists = (server.listen, server.bound, server.udp, server.tcp, server.acls)
            assert [len(each) for each in lists] == [1] * 5
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", fresh))  # nobody kept the new port
        finally:
            del loop.create_server
            await server.stop(1)

    asyncio.run(scenario())


def test_chaos_id_server_says_which_node_answered(tmp_path: Path) -> None:
    """RFC 4892: dig CH TXT id.server (or hostname.bind) names the node, as NSID does."""
    handler = QueryHandler(config_from(tmp_path, SEED_RULES).pipeline(), nsid="nodea")
    for name in ("id.server.", "HOSTNAME.bind."):
        wire = dns.message.make_query(name, "TXT", rdclass="CH").to_wire()
        reply = dns.message.from_wire(asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp")) or b"")
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert [rr.to_text() for rr in reply.answer[0]] == ['"nodea"'], reply
    # The version stays private, and no NSID configured means no identity either.
    wire = dns.message.make_query("version.bind.", "TXT", rdclass="CH").to_wire()
    reply = dns.message.from_wire(asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp")) or b"")
    assert reply.rcode() == dns.rcode.REFUSED
    anonymous = QueryHandler(handler.pipeline, nsid="")
    wire = dns.message.make_query("id.server.", "TXT", rdclass="CH").to_wire()
    reply = dns.message.from_wire(asyncio.run(anonymous.handle(wire, ("127.0.0.1", 1), "udp")) or b"")
    assert reply.rcode() == dns.rcode.REFUSED


def test_an_edit_followed_by_sighup_is_reloaded_once(tmp_path: Path) -> None:
    """The watcher must not reload again an edit that a SIGHUP reload has already read."""
    server = start_server(tmp_path, RELOAD_RULES)
    try:
        (tmp_path / "rules" / "10-test.yaml").write_text(
            textwrap.dedent(RELOAD_RULES).replace("100.64.0.1", "100.64.0.7")
        )
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded:" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the log: the server says when it is done
        # Two watch rounds and a settle: what a second reload would need to show up.
        time.sleep(2 * 1.0 + 0.3 + 0.5)  # waiting out time itself: the event is its absence
        assert server.log_text().count("reloading (") == 1, server.log_text()
    finally:
        server.stop()
