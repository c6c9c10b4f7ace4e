"""The benchmark itself: ``run(args)`` is ``python -m bench`` once its options are parsed.

It checks for dnsperf, dnsmasq and unbound (exit 2 and the apt-get line if one is
missing), pins servers and dnsperf to separate CPUs when it can, starts the servers,
measures every chosen (scenario, server) cell in interleaved rounds, stops them, runs
the memory test, writes the report to ``args.output`` and prints its tables. Every
process it started is stopped and the temp dir removed (unless ``args.keep_tmp``) in a
``finally``; Ctrl-C (KeyboardInterrupt) returns 130.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.dnsperf import Dnsperf, Run
from bench.machine import machine_info
from bench.memory import Memory, memory_test
from bench.procfs import proc_status_kib
from bench.queries import write_queries
from bench.report import memory_section, targets_section, write_report
from bench.scenarios import SCENARIOS, Cell
from bench.servers import Processes, check_after, find_tool, say, servers_under_test

APT_LINE = "apt-get install -y dnsperf dnsmasq unbound"

# Light load: a rate every server takes in its stride (a tenth of its maximum at most),
# for long enough that p99 rests on ~40 queries (~20 in a --quick run, 1 s long).
LIGHT_QPS, LIGHT_SECONDS = 2000, 2.0


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
        servers = servers_under_test(found, tmp)
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
        for key in ("hz-forward", "hz-nocache", "hz-cache", "unbound", "dnsmasq"):
            procs.stop(servers[key])
        for key in ("hz-cache", "hz-nocache", "hz-forward"):
            server = servers[key]
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
