"""The markdown report: results and per-round tables, issue #7's targets, memory.

``write_report`` writes the whole RESULTS.md and returns the main table (which
``python -m bench`` also prints); ``targets_section`` and ``memory_section`` are printed
on their own too. Formatting only: every figure comes from the cells, runs and memory
test passed in; a figure not measured shows as "–".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.dnsperf import CLIENTS, OUTSTANDING, TIMEOUT, Run, percentile
from bench.memory import Memory
from bench.scenarios import SCENARIOS, Cell, latency_ratio, ratio_median
from bench.servers import Server


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
