"""The scenarios, the (scenario, server) cells they are measured in, and in-round ratios.

A ``Cell`` collects one ``Run`` per round (closed loop, half-load and light-load open
loop); its figures are medians over rounds. ``ratio_median`` and ``latency_ratio``
compare two cells round by round, then take the median, so that the machine's drift
from one round to the next cancels out. Pure arithmetic: nothing is run here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.dnsperf import Run, percentile
from bench.servers import Server


@dataclass
class Cell:
    scenario: str
    server: Server
    qfile: Path
    tcp: bool
    runs: list[Run] = field(default_factory=list)
    latency: list[Run] = field(default_factory=list)  # open loop at half load, one per round
    light: list[Run] = field(default_factory=list)  # open loop at light load, one per round
    skipped: str = ""

    @property
    def name(self) -> str:
        return f"{self.scenario}/{self.server.key}"

    def good_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.error]

    def median(self, get: Callable[[Run], float]) -> float:
        values = [get(r) for r in self.good_runs()]
        return statistics.median(values) if values else float("nan")

    def latency_us(self, p: float, light: bool = False) -> float:
        """Median over rounds of the p-th percentile latency (half or light load), in µs."""
        runs = self.light if light else self.latency
        values = [percentile(r.latencies, p) * 1e6 for r in runs if r.latencies]
        return statistics.median(values) if values else float("nan")


@dataclass
class Scenario:
    key: str
    title: str
    tcp: bool
    servers: list[str]
    queries: int
    references: str  # the scenario whose dnsmasq/unbound cells the ratios use


SCENARIOS = [
    Scenario("hit", "cache hit / template answer, UDP, 1,000 names", False,
             ["dnsmasq", "unbound", "hz-cache"], 1000, "hit"),
    Scenario("hot", "cache hit, UDP, 10-name hot set", False, ["dnsmasq", "unbound", "hz-cache"], 10, "hot"),
    Scenario("tcp", "cache hit / template answer, TCP (-m tcp), 1,000 names", True,
             ["dnsmasq", "unbound", "hz-cache"], 1000, "tcp"),
    Scenario("miss", "full-pipeline miss (no cache: template rendered per query), UDP", False,
             ["hz-nocache"], 1000, "hit"),
    Scenario("fwd", "forwarded miss (horizon-dns, no cache -> unbound), UDP", False,
             ["hz-forward"], 1000, "hit"),
]  # fmt: skip


def ratio_median(cell: Cell, ref: Cell | None, get: Callable[[Run], float]) -> float:
    """Median over rounds of get(cell)/get(ref) within the same round."""
    if ref is None:
        return float("nan")
    ratios = []
    for mine, theirs in zip(cell.runs, ref.runs, strict=False):
        if mine.error or theirs.error:
            continue
        a, b = get(mine), get(theirs)
        if b and b == b and a == a:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else float("nan")


def latency_ratio(cell: Cell, ref: Cell | None, p: float) -> float:
    """Median over rounds of cell's p-th percentile latency over ref's, same round."""
    if ref is None:
        return float("nan")
    ratios = []
    for mine, theirs in zip(cell.latency, ref.latency, strict=False):
        if mine.latencies and theirs.latencies:
            ratios.append(percentile(mine.latencies, p) / percentile(theirs.latencies, p))
    return statistics.median(ratios) if ratios else float("nan")
