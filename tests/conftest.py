"""Shared fixtures: a real horizon-dns process on an ephemeral loopback port, and tool checks.

External tools (dig, kdig) are required in CI: with ``CI`` or
``HORIZON_REQUIRE_TOOLS`` set, a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tools_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("HORIZON_REQUIRE_TOOLS"))


def require_tool(name: str) -> str:
    """Path of ``name``; skip without it on a laptop, fail without it in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install bind9-dnsutils knot-dnsutils)"
        if tools_required():
            pytest.fail(message + " -- CI forbids skipping", pytrace=False)
        pytest.skip(message)
    return path


@dataclass
class ServerProcess:
    """A running ``horizon-dns serve`` and where it listens."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    host6: str | None
    port6: int | None
    log: Path
    config: Path
    extra: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


_LISTENING = re.compile(r"listening on (.*)$", re.M)


def start_server(
    tmp: Path, rules: str, server_yaml: str = "", ipv6: bool = True, port: int = 0
) -> ServerProcess:
    """Write a config with ``rules`` as one rules file and start the server (port 0: any)."""
    rules_dir = tmp / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "10-test.yaml").write_text(textwrap.dedent(rules))
    listen = [f'"127.0.0.1:{port}"'] + ([f'"[::1]:{port}"'] if ipv6 else [])
    config = tmp / "horizon.yaml"
    head = f"listen: [{', '.join(listen)}]\nrules: rules\n"
    if "metrics:" not in server_yaml:
        head += "metrics: {listen: '127.0.0.1:0'}\n"  # tests run side by side: any free port
    config.write_text(head + textwrap.dedent(server_yaml))
    log = tmp / "server.log"
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "horizon_dns", "--log-level", "debug", "serve", "--config", str(config)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = _LISTENING.search(log.read_text())
        if found:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.02)  # polling a log file for start-up: there is no event to await
    else:
        proc.kill()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")
    host = port = host6 = port6 = None
    for item in found.group(1).split(", "):
        if item.startswith("["):
            host6 = item[1 : item.index("]")]
            port6 = int(item.rpartition(":")[2])
        else:
            host, _, port_text = item.rpartition(":")
            port = int(port_text)
    assert host is not None and port is not None
    return ServerProcess(proc, host, port, host6, port6, log, config)


def stopped_cleanly(server: ServerProcess) -> Iterator[ServerProcess]:
    """Yield ``server`` to a fixture's tests; then it must exit 0 and have logged no traceback."""
    try:
        yield server
    finally:
        assert server.stop() == 0
        log = server.log_text()
        assert "Traceback" not in log, log


SEED_RULES = r"""
aliases:
  hub: nodec
zones:
  mydomain.tld:
    stages:
      - template:
          name: service-cname
          type: [A, AAAA]
          match: ['^(?P<p>.+)\.(?P<h>[^.]+)\.(?P<d>mydomain\.tld)\.$']
          answer: ['{{ name }} 60 IN CNAME {{ group.h | alias }}.{{ group.d }}.']
      - template:
          name: hosts
          type: [A]
          match: ['^(?P<h>node[a-z])\.mydomain\.tld\.$']
          example: nodeb.mydomain.tld
          answer: ['{{ name }} 60 IN A 100.64.0.{{ "abcdefgh".index(group.h[-1]) + 1 }}']
      - template:
          name: hosts6
          type: [AAAA]
          match: ['^(?P<h>node[a-z])\.mydomain\.tld\.$']
          example: nodeb.mydomain.tld
          answer: ['{{ name }} 60 IN AAAA fd7a:115c:a1e0::{{ "abcdefgh".index(group.h[-1]) + 1 }}']
  big.test:
    stages:
      - template:
          name: many
          type: [TXT]
          answer:
            - |
              {% for i in range(40) %}{{ name }} 60 IN TXT "record {{ i }} padding padding padding padding"
              {% endfor %}
"""


@pytest.fixture(scope="module")
def seed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the seed's templates plus static hosts, for client tests."""
    server = start_server(tmp_path_factory.mktemp("seed"), SEED_RULES)
    try:
        yield server
    finally:
        server.stop()
        log = server.log_text()
        assert "Traceback" not in log, log
