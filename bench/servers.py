"""The servers under test: their configs, starting them, and stopping every one.

``servers_under_test`` builds dnsmasq, unbound and the three horizon-dns variants, each
on a free 127.0.0.1 port with its config written to the temp dir; ``Processes.start``
starts one (pinned by the caller's taskset prefix) and returns once it answers the
probe of ``bench.queries``; ``Processes.stop_all``, in a ``finally``, stops everything
started. Every child gets PR_SET_PDEATHSIG (``die_with_parent``), so none outlives the
benchmark.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procfs import proc_cpu_seconds
from bench.queries import answer_ok, ask, names

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
ROOT = HERE.parent


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec (taskset execs)


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP right now."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            tcp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            udp.close()
            tcp.close()
    raise RuntimeError("no free port on 127.0.0.1")


@dataclass
class Server:
    key: str
    label: str
    port: int
    argv: list[str]
    log: Path
    cwd: Path | None = None
    upstream: Server | None = None
    proc: subprocess.Popen[bytes] | None = None
    crashed: str = ""  # what we saw when it died under load
    idle_rss_kib: int = 0
    peak_rss_kib: int = 0
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Everything we started; ``stop_all`` in a finally ends it."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, server: Server, pin: Sequence[str]) -> Server:
        with server.log.open("wb") as out:  # the child keeps its own descriptor
            server.proc = subprocess.Popen(
                [*pin, *server.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=server.cwd,
                preexec_fn=die_with_parent,
            )
        self.servers.append(server)
        deadline = time.monotonic() + 20
        probe = names(1)[0]
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.label} exited with {server.proc.returncode} at start:\n{server.log_tail()}"
                )
            if answer_ok(ask(server.port, probe, 0.3)):
                return server
            time.sleep(0.05)  # another process's listen(): nothing to await
        raise RuntimeError(
            f"{server.label} does not answer {probe} A on port {server.port}:\n{server.log_tail()}"
        )

    def stop(self, server: Server) -> None:
        proc = server.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        server.exit_code = proc.returncode

    def stop_all(self) -> None:
        for server in reversed(self.servers):  # horizon-dns before the unbound it forwards to
            try:
                self.stop(server)
            except BaseException as exc:  # keep stopping the others
                print(f"bench: could not stop {server.label}: {exc}", file=sys.stderr)


def horizon_dir(tmp: Path, key: str, port: int, rules: str) -> Path:
    folder = tmp / key
    (folder / "rules").mkdir(parents=True)
    server = (CONFIGS / "horizon-server.yaml.in").read_text().replace("@PORT@", str(port))
    (folder / "server.yaml").write_text(server)
    (folder / "rules" / "10-bench.yaml").write_text(rules)
    return folder / "server.yaml"


def horizon_server(tmp: Path, key: str, label: str, rules: str) -> Server:
    port = free_port()
    config = horizon_dir(tmp, key, port, rules)
    argv = [sys.executable, "-m", "horizon_dns", "--log-level", "info", "serve", "--config", str(config)]
    return Server(key, label, port, argv, tmp / f"{key}.log", cwd=ROOT)


def servers_under_test(tools: dict[str, str], tmp: Path) -> dict[str, Server]:
    """dnsmasq, unbound and the three horizon-dns variants, not started, keyed by ``Server.key``
    in the order to start them. TOOLS maps each program to its path; configs go under TMP."""
    dnsmasq_port = free_port()
    dnsmasq = Server(
        "dnsmasq", "dnsmasq", dnsmasq_port,
        [tools["dnsmasq"], "-C", str(CONFIGS / "dnsmasq.conf"), "-k", "-p", str(dnsmasq_port)],
        tmp / "dnsmasq.log",
    )  # fmt: skip
    unbound_port = free_port()
    unbound_conf = tmp / "unbound.conf"
    unbound_conf.write_text((CONFIGS / "unbound.conf.in").read_text().replace("@PORT@", str(unbound_port)))
    unbound = Server(
        "unbound", "unbound (1 thread)", unbound_port, [tools["unbound"], "-d", "-c", str(unbound_conf)],
        tmp / "unbound.log",
    )  # fmt: skip
    hz_cache = horizon_server(tmp, "hz-cache", "horizon-dns", (CONFIGS / "rules-cache.yaml").read_text())
    hz_nocache = horizon_server(
        tmp, "hz-nocache", "horizon-dns, no cache", (CONFIGS / "rules-nocache.yaml").read_text()
    )
    forward_rules = (CONFIGS / "rules-forward.yaml.in").read_text()
    hz_forward = horizon_server(
        tmp, "hz-forward", "horizon-dns forward -> unbound",
        forward_rules.replace("@UPSTREAM@", f"127.0.0.1:{unbound_port}"),
    )  # fmt: skip
    hz_forward.upstream = unbound
    return {s.key: s for s in (dnsmasq, unbound, hz_cache, hz_nocache, hz_forward)}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_after(server: Server, problems: list[str], what: str) -> bool:
    """False (and a problem noted) when the server died during WHAT."""
    if server.alive() or server.crashed:
        return server.alive()
    assert server.proc is not None
    server.crashed = f"exited with {server.proc.returncode} during {what}"
    problems.append(f"**{server.label} {server.crashed}**; log tail:\n\n```\n{server.log_tail()}\n```")
    return False
