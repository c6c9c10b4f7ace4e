"""Real DNS servers as upstreams on loopback: dnsmasq and unbound, like ../shared/lab's.

Neither can ever query the outside: dnsmasq has no-resolv and only the
``server=`` lines given; unbound refuses every name outside its local data and
forward zones (``local-zone: "." refuse``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP right now."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", port))
            return int(port)
        except OSError:
            continue
        finally:
            udp.close()
            tcp.close()
    raise RuntimeError("no free port")


def wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10) -> None:
    """Wait until something accepts TCP on 127.0.0.1:port (the daemon is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)  # no event to await for another process's listen()
    raise RuntimeError(f"peer did not start: {log.read_text()}")


@dataclass
class Peer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    tls_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def dnsmasq(tmp: Path, forward: dict[str, str] | None = None, extra: str = "") -> Iterator[Peer]:
    """dnsmasq with lab.test data; ``forward`` maps domain -> 127.0.0.1#PORT ('' = all)."""
    require_tool("dnsmasq")
    port = free_port()
    servers = "\n".join(
        f"server=/{domain}/{target}" if domain else f"server={target}"
        for domain, target in (forward or {}).items()
    )
    conf = tmp / f"dnsmasq-{port}.conf"
    conf.write_text(
        f"""port={port}
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
user=root
local=/lab.test/
host-record=alpha.lab.test,100.64.0.11,fd7a:115c:a1e0::11
host-record=beta.lab.test,100.64.0.12
txt-record=info.lab.test,"dnsmasq peer"
address=/wild.lab.test/100.64.0.99
log-queries
log-facility=-
{servers}
{extra}
"""
    )
    log = tmp / f"dnsmasq-{port}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(["dnsmasq", "-k", "-C", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_tcp(port, proc, log)
        yield Peer(proc, port, log)
    finally:
        _stop(proc)


def make_certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (its own CA), made with openssl."""
    require_tool("openssl")
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@contextmanager
def unbound(tmp: Path, forward: dict[str, str] | None = None, tls_name: str | None = None) -> Iterator[Peer]:
    """unbound with lab.test data; optionally also serving DNS over TLS with a fresh cert."""
    require_tool("unbound")
    port = free_port()
    tls_port = free_port() if tls_name else 0
    tls = ""
    if tls_name:
        key, cert = make_certificate(tmp, tls_name)
        tls = f"""    interface: 127.0.0.1@{tls_port}
    tls-port: {tls_port}
    tls-service-key: "{key}"
    tls-service-pem: "{cert}"
"""
    zones = ""
    for domain in forward or {}:
        zones += f"""    local-zone: "{domain}." transparent
    domain-insecure: "{domain}."
"""
    forwards = "".join(
        f'forward-zone:\n    name: "{domain}."\n    forward-addr: {target.replace("#", "@")}\n'
        for domain, target in (forward or {}).items()
    )
    conf = tmp / f"unbound-{port}.conf"
    conf.write_text(
        f"""server:
    interface: 127.0.0.1@{port}
{tls}    port: {port}
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    chroot: ""
    username: ""
    directory: "{tmp}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    log-queries: yes
    num-threads: 1
    so-reuseport: no
    module-config: "iterator"
    qname-minimisation: no
    prefetch: no
    local-zone: "." refuse
    local-zone: "lab.test." static
    local-data: "alpha.lab.test. 60 IN A 100.64.0.11"
    local-data: "alpha.lab.test. 60 IN AAAA fd7a:115c:a1e0::11"
    local-data: "beta.lab.test. 60 IN A 100.64.0.12"
    local-data: 'info.lab.test. 60 IN TXT "unbound peer"'
{zones}{forwards}remote-control:
    control-enable: no
"""
    )
    log = tmp / f"unbound-{port}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            ["unbound", "-d", "-p", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_tcp(port, proc, log)
        if tls_port:
            wait_tcp(tls_port, proc, log)
        yield Peer(proc, port, log, tls_port)
    finally:
        _stop(proc)
