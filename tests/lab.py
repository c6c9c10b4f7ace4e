"""The overlay lab (../shared/lab): network namespaces with real avahi, systemd-resolved.

Every packet of a lab test stays inside namespaces the test created. A lab needs
root and the lab's Debian packages; without them the test skips on a laptop and
fails in CI (see conftest.require_tool).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_tool, tools_required

LAB = Path(__file__).resolve().parent.parent.parent / "shared" / "lab"
ROOT = Path(__file__).resolve().parent.parent


def require_lab() -> None:
    problem = ""
    if os.geteuid() != 0:
        problem = "lab tests need root (network namespaces)"
    elif not (LAB / "overlay-lab.sh").exists():
        problem = f"the lab scripts are missing at {LAB}"
    if problem:
        if tools_required():
            pytest.fail(problem + " -- CI forbids skipping", pytrace=False)
        pytest.skip(problem)
    for tool in ("ip", "avahi-daemon", "dig"):
        require_tool(tool)


@dataclass
class Lab:
    prefix: str
    nodes: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, script: str, *args: str, timeout: float = 60, check: bool = True) -> str:
        result = subprocess.run(
            ["bash", str(LAB / script), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr

    def exec(
        self, node: str, *cmd: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LAB / "overlay-lab.sh"), "exec", node, *cmd],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=check,
        )  # fmt: skip

    def spawn(self, node: str, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", str(LAB / "overlay-lab.sh"), "exec", node, *cmd],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def bridge(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", f"{self.prefix}-br", *cmd], capture_output=True, text=True, timeout=30
        )

    def block_multicast(self) -> None:
        """Drop multicast between nodes on the bridge: a tailscale-like overlay."""
        for family, group in (("ip", "224.0.0.0/4"), ("ip6", "ff00::/8")):
            self.bridge("nft", "add", "table", "bridge", "hzmc")
            self.bridge(
                "nft", "add", "chain", "bridge", "hzmc", "mcdrop", "{ type filter hook forward priority 0 ; }"
            )
            result = self.bridge(
                "nft", "add", "rule", "bridge", "hzmc", "mcdrop", family, "daddr", group, "drop"
            )
            if result.returncode != 0:
                raise RuntimeError(f"nft failed: {result.stderr}")

    def allow_multicast(self) -> None:
        self.bridge("nft", "delete", "table", "bridge", "hzmc")


@contextmanager
def lab(prefix: str, nodes: str = "a b c") -> Iterator[Lab]:
    require_lab()
    env = {**os.environ, "LAB_PREFIX": prefix, "LAB_NODES": nodes}
    the_lab = Lab(prefix, nodes, env)
    the_lab.run("overlay-lab.sh", "down", check=False)
    the_lab.run("overlay-lab.sh", "up")
    try:
        yield the_lab
    finally:
        for proc in the_lab.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        the_lab.run("overlay-lab.sh", "down", check=False)


_LISTENING = re.compile(r"listening on (.*)$", re.M)


@dataclass
class LabServer:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if re.search(pattern, text):
                return text
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)  # polling another process's log: there is no event to await
        raise AssertionError(f"{pattern!r} not in log within {timeout} s:\n{self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(10)


def start_lab_server(the_lab: Lab, node: str, workdir: Path, server_yaml: str, rules: str = "") -> LabServer:
    """horizon-dns in a lab node with the given server file (and one rules file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules").mkdir(exist_ok=True)
    if rules:
        (workdir / "rules" / "10-test.yaml").write_text(textwrap.dedent(rules))
    config = workdir / "horizon.yaml"
    config.write_text(textwrap.dedent(server_yaml))
    log = workdir / "server.log"
    cmd = [sys.executable, "-m", "horizon_dns", "--log-level", "debug", "serve", "--config", str(config)]
    proc = the_lab.spawn(node, "env", f"PYTHONPATH={ROOT}", *cmd, log=log)
    server = LabServer(proc, log, 0)
    text = server.wait_for(r"listening on ")
    found = _LISTENING.search(text)
    assert found is not None
    server.port = int(found.group(1).split(", ")[0].rpartition(":")[2])
    return server
