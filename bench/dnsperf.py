"""dnsperf runs against one server, and what they measured.

``Dnsperf.run`` runs dnsperf once (bounded by ``-l`` and a subprocess timeout) and
returns a ``Run``: dnsperf's statistics, the server's (and its upstream's) CPU seconds
over the run, from which CPU per query follows, and with ``verbose`` the per-query
latencies. A run that failed comes back with ``error`` set instead of raising.
``parse_dnsperf``, ``parse_latencies`` and ``percentile`` are the pure parts.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import Server, die_with_parent

CLIENTS, OUTSTANDING, TIMEOUT = 10, 100, 2


@dataclass
class Run:
    """One dnsperf run against one server."""

    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    runtime: float = 0.0
    rcodes: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # the server's CPU during the run
    upstream_cpu_s: float = 0.0  # the upstream's (forwarded scenario)
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, from -v
    error: str = ""

    @property
    def cpu_us_per_query(self) -> float:
        return self.cpu_s / self.completed * 1e6 if self.completed else float("nan")

    @property
    def per_cpu_second(self) -> float:
        return self.completed / self.cpu_s if self.cpu_s > 0 else float("nan")

    @property
    def not_noerror(self) -> int:
        return sum(n for code, n in self.rcodes.items() if code != "NOERROR")


_STATS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "runtime": re.compile(r"Run time \(s\):\s+([\d.]+)"),
}
_RCODES = re.compile(r"Response codes:\s+(.*)")
_RCODE_ITEM = re.compile(r"([A-Z]+)\s+(\d+)")


def parse_dnsperf(text: str) -> Run:
    run = Run()
    for key, pattern in _STATS.items():
        found = pattern.search(text)
        if found is None:
            raise ValueError(f"dnsperf printed no {key!r}")
        setattr(run, key, float(found.group(1)) if key in ("qps", "runtime") else int(found.group(1)))
    found = _RCODES.search(text)
    if found:
        run.rcodes = {code: int(n) for code, n in _RCODE_ITEM.findall(found.group(1))}
    return run


def parse_latencies(lines: Sequence[str]) -> list[float]:
    """Seconds from dnsperf -v lines ``> RCODE NAME TYPE SECONDS``."""
    out = []
    for line in lines:
        if line.startswith("> "):
            try:
                out.append(float(line.rsplit(None, 1)[1]))
            except (ValueError, IndexError):
                continue
    return out


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


class Dnsperf:
    def __init__(self, binary: str, pin: Sequence[str], tmp: Path) -> None:
        self.binary = binary
        self.pin = list(pin)
        self.tmp = tmp
        self.count = 0

    def run(
        self,
        server: Server,
        qfile: Path,
        seconds: float,
        tcp: bool = False,
        rate: int | None = None,
        verbose: bool = False,
        maxruns: int | None = None,
    ) -> Run:
        argv = [
            *self.pin, self.binary, "-s", "127.0.0.1", "-p", str(server.port), "-d", str(qfile),
            "-l", f"{seconds:g}", "-c", str(CLIENTS), "-q", str(OUTSTANDING), "-t", str(TIMEOUT),
        ]  # fmt: skip
        if tcp:
            argv += ["-m", "tcp"]
        if rate is not None:
            argv += ["-Q", str(rate)]
        if verbose:
            argv += ["-v"]
        if maxruns is not None:
            argv += ["-n", str(maxruns)]
        self.count += 1
        out_path = self.tmp / f"dnsperf-{self.count}.out"
        cpu0 = server.cpu()
        up0 = server.upstream.cpu() if server.upstream else 0.0
        started = time.monotonic()
        try:
            with out_path.open("wb") as out:
                done = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                    timeout=seconds + TIMEOUT + 30, preexec_fn=die_with_parent, check=False,
                )  # fmt: skip
        except subprocess.TimeoutExpired:
            return Run(error=f"dnsperf did not finish within {seconds + TIMEOUT + 30:g} s (killed)")
        wall = time.monotonic() - started
        text = out_path.read_text(errors="replace")
        try:
            run = parse_dnsperf(text)
        except ValueError as exc:
            stderr = done.stderr.decode(errors="replace").strip()
            return Run(error=f"{exc}; exit {done.returncode}; {stderr[-500:]}")
        if server.alive():
            run.cpu_s = server.cpu() - cpu0
        if server.upstream is not None and server.upstream.alive():
            run.upstream_cpu_s = server.upstream.cpu() - up0
        run.wall = wall
        if verbose:
            run.latencies = parse_latencies(text.splitlines())
        out_path.unlink()
        return run
