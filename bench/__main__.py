"""python -m bench: horizon-dns against dnsmasq and unbound, measured with dnsperf.

Method (the one of ../shared/bench/README.md):

* every server on 127.0.0.1, on a free port, pinned to the second CPU
  (``taskset -c 1``) and dnsperf to the first (``taskset -c 0``) when the machine
  has two CPUs or more; nothing is ever sent off the loopback;
* query files: 1,000 distinct names ``hN.svc.mydomain.test A`` and a hot set of
  the first 10 (the logic of ../shared/bench/gen_queries.py), written to a temp dir;
* closed loop ``dnsperf -l 5 -c 10 -q 100 -t 2`` after a 1 s warm-up run of the
  same command, for every (scenario, server) cell, in interleaved rounds (the cell
  order is rotated each round); medians over rounds, ratios taken within a round;
* server CPU: utime+stime (+cutime+cstime: dnsmasq forks for TCP) from
  /proc/PID/stat before and after each measured run -> CPU µs per query and
  queries per server CPU-second (the fair figure once dnsperf saturates its CPU);
* latency: right after each closed-loop run, an open-loop run of the same length
  at 50% of the QPS it reached (``-Q RATE -v``), then a 2 s one (1 s with
  ``--quick``) at light load (2,000 QPS, or a tenth of that QPS if less); p50/p99
  from dnsperf's per-query lines ``> NOERROR h1.svc.mydomain.test A 0.000117``
  (the last field is seconds), then the median over rounds;
* memory: VmHWM (peak RSS) of each server at the end; and a separate horizon-dns
  with room for 100k cache entries: VmRSS idle, after 100k distinct names, and
  after a second (all-hit) pass over them.

Every child process gets PR_SET_PDEATHSIG and is stopped in a ``finally`` (also on
Ctrl-C and SIGTERM); every dnsperf run is bounded by ``-l`` and a subprocess timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
ROOT = HERE.parent
ZONE = "svc.mydomain.test"
ANSWER = bytes([100, 64, 0, 7])  # 100.64.0.7, what every server answers
APT_LINE = "apt-get install -y dnsperf dnsmasq unbound"
CLIENTS, OUTSTANDING, TIMEOUT = 10, 100, 2
# Light load: a rate every server takes in its stride (a tenth of its maximum at most),
# for long enough that p99 rests on ~40 queries (~20 in a --quick run, 1 s long).
LIGHT_QPS, LIGHT_SECONDS = 2000, 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Query files ---------------------------------------------------------------------


def names(n: int) -> list[str]:
    """The names of ../shared/bench/gen_queries.py: h0..h(n-1).svc.mydomain.test."""
    return [f"h{i}.{ZONE}" for i in range(n)]


def write_queries(out: Path, n: int) -> Path:
    path = out / f"queries-{n}.txt"
    path.write_text("".join(f"{name} A\n" for name in names(n)))
    return path


# Processes -------------------------------------------------------------------------


def _die_with_parent() -> None:
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


def dns_query(name: str, msg_id: int) -> bytes:
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", msg_id, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)


def ask(port: int, name: str, timeout: float = 0.5) -> bytes | None:
    """One UDP query for NAME A to 127.0.0.1:PORT; the reply, or None."""
    msg_id = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.send(dns_query(name, msg_id))
        try:
            while True:
                reply = sock.recv(4096)
                if len(reply) >= 12 and struct.unpack_from("!H", reply)[0] == msg_id:
                    return reply
        except (TimeoutError, ConnectionRefusedError):
            return None


def answer_ok(reply: bytes | None) -> bool:
    """NOERROR, at least one answer, and 100.64.0.7 in it."""
    if reply is None or len(reply) < 12:
        return False
    flags, _qd, ancount = struct.unpack_from("!HHH", reply, 2)
    return flags & 0x8000 != 0 and flags & 0xF == 0 and ancount > 0 and ANSWER in reply[12:]


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of PID, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


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
                preexec_fn=_die_with_parent,
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


# dnsperf -----------------------------------------------------------------------------


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
                    timeout=seconds + TIMEOUT + 30, preexec_fn=_die_with_parent, check=False,
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


# Scenarios ---------------------------------------------------------------------------


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


def verdict(value: float, bound: float, at_least: bool) -> str:
    """'met', or by how much ``value`` misses ``bound``."""
    if value != value:
        return "not measured"
    if (value >= bound) if at_least else (value <= bound):
        return "met"
    return f"**missed by {abs(value - bound) / bound:.0%}**"


def targets_section(cells: dict[str, Cell], mem: Memory | None, quick: bool) -> str:
    """Issue #7's targets against this run: each figure and whether it holds."""
    rows: list[list[str]] = []

    def add(target: str, figure: str, value: float, bound: float, at_least: bool = True) -> None:
        rows.append([target, figure, fmt(value), verdict(value, bound, at_least)])

    def cell(name: str) -> Cell | None:
        found = cells.get(name)
        return found if found is not None and found.good_runs() else None

    for key in ("hit", "hot"):
        hz = cell(f"{key}/hz-cache")
        if hz is None:
            continue
        for peer in ("dnsmasq", "unbound"):
            add(f"UDP {key} QPS >= 1.0x {peer}", f"{key} × {peer}",
                ratio_median(hz, cell(f"{key}/{peer}"), lambda r: r.qps), 1.0)  # fmt: skip
        add(f"UDP {key} queries per CPU-s >= 0.9x dnsmasq", f"{key} per CPU-s × dnsmasq",
            ratio_median(hz, cell(f"{key}/dnsmasq"), lambda r: r.per_cpu_second), 0.9)  # fmt: skip
    miss = cell("miss/hz-nocache")
    if miss is not None:
        add("full-pipeline misses >= 0.25x dnsmasq", "miss × dnsmasq (hit cell)",
            ratio_median(miss, cell("hit/dnsmasq"), lambda r: r.qps), 0.25)  # fmt: skip
    tcp = cell("tcp/hz-cache")
    if tcp is not None:
        ratio = ratio_median(tcp, cell("tcp/unbound"), lambda r: r.qps)
        add("TCP >= 2x unbound", "tcp × unbound", ratio, 2.0)
    for key in ("hit", "hot", "tcp"):
        hz = cell(f"{key}/hz-cache")
        if hz is not None:
            add("p99 at half load <= 1.2x dnsmasq's", f"{key}: p99 ÷ dnsmasq's p99",
                latency_ratio(hz, cell(f"{key}/dnsmasq"), 99), 1.2, at_least=False)  # fmt: skip
    ours = [c for name, c in cells.items() if name.split("/")[1].startswith("hz")]
    lost = sum(r.lost for c in ours for r in c.runs + c.latency + c.light)
    sent = sum(r.sent for c in ours for r in c.runs + c.latency + c.light)
    rows.append(["0 lost queries in every run", f"horizon-dns: {lost} of {sent} lost", str(lost),
                 "met" if lost == 0 else f"**missed: {lost} lost**"])  # fmt: skip
    if mem is not None and not mem.error:
        add("RSS <= 40 MiB idle", "idle VmRSS, MiB", mem.idle_kib / 1024, 40, at_least=False)
        if quick:
            rows.append(["RSS <= 64 MiB with 100k cached entries", "quick run: 10k names", "–", "not run"])
        else:
            add("RSS <= 64 MiB with 100k cached entries", "VmHWM after 100k names, MiB",
                mem.hwm_kib / 1024, 64, at_least=False)  # fmt: skip
    return table(["target", "figure", "this run", "verdict"], rows, "llrl")


# Machine info -------------------------------------------------------------------------


def first_line(argv: list[str], pattern: str = "") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (done.stdout + done.stderr).splitlines():
        if re.search(pattern, line):
            return line.strip()
    return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def machine_info(tools: dict[str, str], pinned: bool, cpus: list[int]) -> list[tuple[str, str]]:
    git = first_line(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], ".")
    dirty = first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--", "horizon_dns"], ".")
    return [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("nproc", f"{os.cpu_count()} (usable: {len(cpus)})"),
        ("CPU", cpu_model()),
        ("kernel", platform.release()),
        ("pinning", f"servers taskset -c {cpus[1]}, dnsperf -c {cpus[0]}" if pinned else "none (1 CPU)"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("uvloop / dnslib / Jinja2", " / ".join(package_version(p) for p in ("uvloop", "dnslib", "Jinja2"))),
        ("horizon-dns", f"{package_version('horizon-dns')}, commit {git}"
         + (" (horizon_dns/ has uncommitted changes)" if dirty != "?" else "")),
        ("dnsmasq", first_line([tools["dnsmasq"], "--version"], "version")),
        ("unbound", first_line([tools["unbound"], "-V"], "Version")),
        ("dnsperf", first_line([tools["dnsperf"], "-h"], "Version")),
    ]  # fmt: skip


# Report -------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "–"
    return f"{value:.{digits}f}"


def kqps(value: float) -> str:
    if value != value:
        return "–"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}" if kib else "–"


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(cells: dict[str, Cell]) -> str:
    header = [
        "scenario", "server", "QPS", "× dnsmasq", "× unbound", "server CPU %", "CPU µs/query",
        "queries per CPU-s", "per CPU-s × dnsmasq", "per CPU-s × unbound", "lost", "p50/p99 µs light",
        "p50/p99 µs @50%", "peak RSS MiB",
    ]  # fmt: skip
    rows = []
    for scenario in SCENARIOS:
        for key in scenario.servers:
            cell = cells.get(f"{scenario.key}/{key}")
            if cell is None:
                continue
            server = cell.server
            dnsmasq = cells.get(f"{scenario.references}/dnsmasq")
            unbound = cells.get(f"{scenario.references}/unbound")
            if cell.skipped or not cell.good_runs():
                rows.append([scenario.key, server.label, f"**{cell.skipped or 'no result'}**"] + ["–"] * 11)
                continue
            qps = cell.median(lambda r: r.qps)
            cpu_pct = cell.median(lambda r: 100 * r.cpu_s / r.runtime if r.runtime else float("nan"))
            cpu_us = fmt(cell.median(lambda r: r.cpu_us_per_query), 1)
            if server.upstream is not None:
                up = cell.median(
                    lambda r: r.upstream_cpu_s / r.completed * 1e6 if r.completed else float("nan")
                )
                cpu_us += f" (+{fmt(up, 1)} upstream)"
            lost = sum(r.lost for r in cell.runs)
            sent = sum(r.sent for r in cell.runs)
            bad = sum(r.not_noerror for r in cell.runs)
            lost_text = f"{lost}/{sent}" + (f", {bad} not NOERROR" if bad else "")
            lat = light = "–"
            if any(r.latencies for r in cell.latency):
                lat = f"{cell.latency_us(50):.0f}/{cell.latency_us(99):.0f}"
            if any(r.latencies for r in cell.light):
                light = f"{cell.latency_us(50, light=True):.0f}/{cell.latency_us(99, light=True):.0f}"
            is_peer = key in ("dnsmasq", "unbound")
            rows.append([
                scenario.key,
                server.label,
                kqps(qps),
                fmt(ratio_median(cell, dnsmasq, lambda r: r.qps)),
                fmt(ratio_median(cell, unbound, lambda r: r.qps)),
                f"{cpu_pct:.0f}" if cpu_pct == cpu_pct else "–",
                cpu_us,
                kqps(cell.median(lambda r: r.per_cpu_second)),
                fmt(ratio_median(cell, dnsmasq, lambda r: r.per_cpu_second)),
                fmt(ratio_median(cell, unbound, lambda r: r.per_cpu_second)),
                lost_text,
                light,
                lat,
                mib(server.peak_rss_kib) if (is_peer and scenario.key == "hit") or not is_peer else "″",
            ])  # fmt: skip
    return table(header, rows, "llrrrrrrrrrrrr")


def rounds_table(cells: dict[str, Cell], rounds: int) -> str:
    header = ["cell"] + [f"round {i + 1}: QPS / CPU µs per query / lost / p50-p99 µs" for i in range(rounds)]
    rows = []
    for cell in cells.values():
        row = [cell.name]
        for i in range(rounds):
            if i >= len(cell.runs):
                row.append("–")
                continue
            run = cell.runs[i]
            if run.error:
                row.append(run.error[:60])
                continue
            lat = "–"
            if i < len(cell.latency) and cell.latency[i].latencies:
                values = cell.latency[i].latencies
                lat = f"{percentile(values, 50) * 1e6:.0f}-{percentile(values, 99) * 1e6:.0f}"
            row.append(f"{kqps(run.qps)} / {fmt(run.cpu_us_per_query, 1)} / {run.lost} / {lat}")
        rows.append(row)
    return table(header, rows, "l" + "r" * rounds)


# The benchmark ------------------------------------------------------------------------


@dataclass
class Memory:
    count: int = 100_000
    idle_kib: int = 0
    after_kib: int = 0
    after_second_kib: int = 0
    hwm_kib: int = 0
    first: Run | None = None
    second: Run | None = None
    error: str = ""


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


def memory_test(
    procs: Processes, perf: Dnsperf, tmp: Path, pin: Sequence[str], problems: list[str], count: int
) -> Memory:
    mem = Memory(count=count)
    rules = (CONFIGS / "rules-cache-100k.yaml").read_text()
    server = procs.start(
        horizon_server(tmp, "hz-cache-100k", "horizon-dns cache (max_entries 200000)", rules), pin
    )
    time.sleep(1.0)
    mem.idle_kib = proc_status_kib(server.pid, "VmRSS")
    qfile = write_queries(tmp, count)
    say(f"memory: {count} distinct names, first pass (template + store)")
    mem.first = perf.run(server, qfile, 120, maxruns=1)
    if check_after(server, problems, f"the {count}-name pass"):
        time.sleep(0.5)
        mem.after_kib = proc_status_kib(server.pid, "VmRSS")
        say("memory: second pass (all cache hits)")
        mem.second = perf.run(server, qfile, 120, maxruns=1)
        if check_after(server, problems, f"the second {count}-name pass"):
            mem.after_second_kib = proc_status_kib(server.pid, "VmRSS")
            mem.hwm_kib = proc_status_kib(server.pid, "VmHWM")
    procs.stop(server)
    return mem


def memory_section(mem: Memory) -> str:
    if mem.error:
        return f"Memory test failed: {mem.error}\n"

    def run_text(run: Run | None) -> str:
        if run is None:
            return "not run"
        if run.error:
            return run.error
        return (
            f"{run.completed}/{run.sent} answered, {run.lost} lost, {kqps(run.qps)} QPS, "
            f"{fmt(run.cpu_us_per_query, 1)} server CPU µs/query"
            + (f", {run.not_noerror} not NOERROR" if run.not_noerror else "")
        )

    grown = mem.after_kib - mem.idle_kib
    lines = [
        "| horizon-dns, cache variant with `max_entries: 200000` | VmRSS MiB |",
        "|---|---:|",
        f"| idle (after start and one query) | {mib(mem.idle_kib)} |",
        f"| after {mem.count:,} distinct names (one pass) | {mib(mem.after_kib)} |",
        f"| after a second pass over them (all hits) | {mib(mem.after_second_kib)} |",
        f"| peak (VmHWM) | {mib(mem.hwm_kib)} |",
        "",
        f"Growth for {mem.count:,} cached names: {grown / 1024:.1f} MiB, about "
        f"{grown * 1024 / mem.count:.0f} bytes per cached name (key, entry, its bytes, dict slot, "
        "the 1-second reply memo, allocator slack).",
        "",
        "- first pass (every name a miss: template render, dnslib parse of the new text, pack, store): "
        + run_text(mem.first),
        f"- second pass (every name a hot-path hit): {run_text(mem.second)}",
        "",
        "The default `max_entries` is 10000, so a default cache stays near a tenth of this growth.",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    path: Path,
    info: list[tuple[str, str]],
    args: argparse.Namespace,
    cells: dict[str, Cell],
    mem: Memory | None,
    problems: list[str],
    servers: list[Server],
) -> str:
    main_table = results_table(cells)
    kind = (
        "quick run (`python -m bench --quick`)" if args.quick else f"`python -m bench --rounds {args.rounds}`"
    )
    parts = [
        "# horizon-dns benchmark: against dnsmasq and unbound",
        "",
        f"Written by {kind}. Regenerate with `python -m bench` from the repository root "
        "(about 9 minutes; `--quick`: one short round and 10k names in the memory test, about 1.5 "
        "minutes).",
        "",
        "## Machine",
        "",
        table(["", ""], [[k, v] for k, v in info], "ll"),
        "",
        "## Results",
        "",
        f"Closed loop `dnsperf -l {args.seconds:g} -c {CLIENTS} -q {OUTSTANDING} -t {TIMEOUT}` (UDP unless "
        f"noted) after a 1 s warm-up of the same command, {args.rounds} interleaved round(s), medians; "
        "ratios are taken within a round, then the median. Every server answers every name "
        "`hN.svc.mydomain.test A` with `100.64.0.7`.",
        "",
        main_table,
        "",
        "Columns: **QPS** what dnsperf completed per second; **server CPU %** the server's CPU time "
        "over the run time (100 = the server's core is saturated; below that dnsperf, on the other core, "
        "is the limit); **CPU µs/query** and **queries per CPU-s** the server's utime+stime per answered "
        "query (the fair comparison once dnsperf saturates its core, about 150-170k QPS here); "
        "**lost** over all closed-loop runs; **p50/p99** from open-loop runs after each closed-loop "
        "one (`-v` per-query latencies; **light**: 2 s (1 s with `--quick`) at 2,000 QPS, or a tenth "
        "of the closed loop's QPS if less; **@50%**: as long as the closed loop, at half its QPS), "
        "median over rounds; "
        "**peak RSS** VmHWM at the end of the run (the peers' row is shown once).",
        "",
        "Scenarios: **hit** horizon-dns with `cache` first and a template behind it (after the first "
        "query per name, answered from the hot path), dnsmasq `address=/mydomain.test/100.64.0.7`, "
        "unbound `local-zone: redirect`; **hot** the same with the 10-name hot set; **tcp** the same "
        "over TCP (10 connections); **miss** horizon-dns without cache: every query decoded, resolved "
        "by the template stage (Jinja render each time; the stage's own cache of parsed records, 4096 "
        "rendered texts, holds all 1,000) and encoded; ratios against the peers' hit-scenario cells of "
        "the same round (they have no cached/uncached distinction); **fwd** horizon-dns zone `.` "
        "`forward` to the unbound instance (both pinned to the same core), no cache; compare with unbound "
        "queried directly (`× unbound`); the CPU column adds the upstream's CPU per query in brackets.",
        "",
        "### Per round",
        "",
        rounds_table(cells, args.rounds),
        "",
        "## Against the targets of issue #7",
        "",
        "Ratios are medians of per-round ratios (rounds interleave the servers; this 2-core VM's "
        "speed drifts by ±15% from minute to minute). What bounds each figure, and how runs of "
        "different days compare: [NOTES.md](NOTES.md).",
        "",
        targets_section(cells, mem, args.quick),
        "",
        "## Memory",
        "",
        memory_section(mem) if mem is not None else "Skipped (`--skip-memory`).\n",
        "## Idle and peak RSS of every server",
        "",
        table(
            ["server", "VmRSS idle MiB", "VmHWM at end MiB", "exit code at stop"],
            [[s.label, mib(s.idle_rss_kib), mib(s.peak_rss_kib), str(s.exit_code)] for s in servers],
            "lrrr",
        ),
        "",
        "## Problems seen",
        "",
        "\n".join(f"- {p}" for p in problems)
        if problems
        else "None: no crash, no lost query, every reply NOERROR.",
        "",
    ]
    text = "\n".join(parts)
    path.write_text(text)
    return main_table


def run(args: argparse.Namespace) -> int:
    tools = {name: find_tool(name) for name in ("dnsperf", "dnsmasq", "unbound")}
    missing = [name for name, where in tools.items() if where is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}; install with:\n  {APT_LINE}", file=sys.stderr)
        return 2
    found = {name: str(where) for name, where in tools.items()}
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2 and find_tool("taskset") is not None
    server_pin = ["taskset", "-c", str(cpus[1])] if pinned else []
    client_pin = ["taskset", "-c", str(cpus[0])] if pinned else []
    if not pinned:
        say("bench: fewer than 2 usable CPUs (or no taskset): nothing is pinned; numbers will be noisier")

    procs = Processes()
    problems: list[str] = []
    cells: dict[str, Cell] = {}
    mem: Memory | None = None
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="horizon-bench-")
    tmp = Path(tmpdir)
    try:
        queries = {n: write_queries(tmp, n) for n in (1000, 10)}
        perf = Dnsperf(found["dnsperf"], client_pin, tmp)

        # The servers.
        dnsmasq_port = free_port()
        dnsmasq = Server(
            "dnsmasq", "dnsmasq", dnsmasq_port,
            [found["dnsmasq"], "-C", str(CONFIGS / "dnsmasq.conf"), "-k", "-p", str(dnsmasq_port)],
            tmp / "dnsmasq.log",
        )  # fmt: skip
        unbound_port = free_port()
        unbound_conf = tmp / "unbound.conf"
        unbound_conf.write_text(
            (CONFIGS / "unbound.conf.in").read_text().replace("@PORT@", str(unbound_port))
        )
        unbound = Server(
            "unbound", "unbound (1 thread)", unbound_port, [found["unbound"], "-d", "-c", str(unbound_conf)],
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
        servers = {s.key: s for s in (dnsmasq, unbound, hz_cache, hz_nocache, hz_forward)}
        for server in servers.values():
            say(f"starting {server.label} on 127.0.0.1:{server.port}")
            procs.start(server, server_pin)
        time.sleep(1.0)
        for server in servers.values():
            server.idle_rss_kib = proc_status_kib(server.pid, "VmRSS")

        chosen = set(args.scenarios or [sc.key for sc in SCENARIOS])
        chosen |= {sc.references for sc in SCENARIOS if sc.key in chosen}  # the cells ratios need
        for scenario in SCENARIOS:
            if scenario.key not in chosen:
                continue
            for key in scenario.servers:
                cell = Cell(scenario.key, servers[key], queries[scenario.queries], scenario.tcp)
                cells[cell.name] = cell
        order = list(cells.values())

        for round_no in range(args.rounds):
            shift = round_no * max(1, len(order) // max(1, args.rounds))
            for cell in order[shift % len(order) :] + order[: shift % len(order)]:
                server = cell.server
                if not server.alive():
                    cell.skipped = f"{server.label} {server.crashed or 'not running'}"
                    cell.runs.append(Run(error=cell.skipped))
                    continue
                say(f"round {round_no + 1}/{args.rounds}: {cell.name}{' tcp' if cell.tcp else ''}")
                perf.run(server, cell.qfile, 1, tcp=cell.tcp)  # warm-up
                result = perf.run(server, cell.qfile, args.seconds, tcp=cell.tcp)
                cell.runs.append(result)
                if result.error:
                    problems.append(f"{cell.name} round {round_no + 1}: dnsperf failed: {result.error}")
                elif result.lost or result.not_noerror:
                    problems.append(
                        f"{cell.name} round {round_no + 1}: {result.lost} of {result.sent} queries lost"
                        + (f", response codes {result.rcodes}" if result.not_noerror else "")
                    )
                if not result.error and check_after(server, problems, f"{cell.name} round {round_no + 1}"):
                    # Open loop at half of what this round's closed loop reached, then at a
                    # light load no server is near its limit at: latency.
                    half = max(100, int(result.qps / 2))
                    light = min(LIGHT_QPS, max(100, int(result.qps / 10)))
                    for rate, seconds, runs, what in (
                        (half, args.seconds, cell.latency, "half-load"),
                        (light, min(args.seconds / 2, LIGHT_SECONDS), cell.light, "light-load"),
                    ):
                        latency = perf.run(server, cell.qfile, seconds, tcp=cell.tcp, rate=rate, verbose=True)
                        runs.append(latency)
                        if latency.error:
                            problems.append(f"{cell.name} round {round_no + 1} {what} run: {latency.error}")
                        elif latency.lost or latency.not_noerror:
                            problems.append(
                                f"{cell.name} round {round_no + 1} {what} run at {rate} QPS: {latency.lost} "
                                f"of {latency.sent} lost"
                                + (f", response codes {latency.rcodes}" if latency.not_noerror else "")
                            )
                check_after(server, problems, f"{cell.name} round {round_no + 1}")
                if server.upstream is not None:
                    check_after(server.upstream, problems, f"{cell.name} round {round_no + 1}")
            # Kept in their round order: the cell order is the same in every table.
            say(f"  round {round_no + 1} done at {time.monotonic() - started:.0f} s")

        for server in servers.values():
            if server.alive():
                server.peak_rss_kib = proc_status_kib(server.pid, "VmHWM")
        # Stop the load's servers now (exit codes are reported), then the memory test alone.
        for server in (hz_forward, hz_nocache, hz_cache, unbound, dnsmasq):
            procs.stop(server)
        for server in (hz_cache, hz_nocache, hz_forward):
            if not server.crashed and server.exit_code != 0:
                problems.append(f"{server.label} exited with {server.exit_code} on SIGTERM (expected 0)")
        for server in servers.values():
            log = server.log.read_text(errors="replace") if server.log.exists() else ""
            if server.key.startswith("hz") and re.search(r"Traceback|ERROR|CRITICAL", log):
                problems.append(f"{server.label} logged errors:\n\n```\n{server.log_tail(40)}\n```")

        if not args.skip_memory:
            try:
                mem = memory_test(procs, perf, tmp, server_pin, problems, 10_000 if args.quick else 100_000)
            except RuntimeError as exc:
                mem = Memory(error=str(exc))
            for run_ in (mem.first, mem.second):
                if run_ is not None and (run_.error or run_.lost or run_.not_noerror):
                    what = run_.error or f"{run_.lost} of {run_.sent} lost, rcodes {run_.rcodes}"
                    problems.append(f"memory test: {what}")

        info = machine_info(found, pinned, cpus)
        all_servers = list(servers.values()) + [s for s in procs.servers if s.key == "hz-cache-100k"]
        table_text = write_report(args.output, info, args, cells, mem, problems, all_servers)
        print(table_text)
        print()
        print(targets_section(cells, mem, args.quick))
        print()
        if mem is not None and not mem.error:
            print(memory_section(mem))
        for problem in problems:
            print(f"problem: {problem}")
        say(f"wrote {args.output} in {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        say("bench: interrupted; stopping every process it started")
        return 130
    finally:
        procs.stop_all()
        if args.keep_tmp:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 2 s runs, 10k names in the memory test (under 2 minutes)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=5, help="dnsperf -l per measured run (default 5)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="markdown report path")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 100k-name memory test")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument(
        "--scenarios",
        type=lambda text: text.split(","),
        help=f"comma-separated subset of {','.join(sc.key for sc in SCENARIOS)} (and the cells their "
        "ratios need); default all",
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios or []) - {sc.key for sc in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds, args.seconds = 1, 2
    if args.rounds < 1 or not 0.5 <= args.seconds <= 60:
        parser.error("--rounds must be >= 1 and --seconds within 0.5..60")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
