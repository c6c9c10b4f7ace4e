"""The memory test: one more horizon-dns, with room for 100k cache entries, alone.

``memory_test`` starts it (the caller has stopped the load's servers first), reads
VmRSS idle, after one pass of COUNT distinct names and after a second (all-hit) pass,
and VmHWM at the end; then stops it. A server's death is noted in PROBLEMS, not raised; a server
that does not start raises RuntimeError (as ``Processes.start`` does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.dnsperf import Dnsperf, Run
from bench.procfs import proc_status_kib
from bench.queries import write_queries
from bench.servers import CONFIGS, Processes, check_after, horizon_server, say


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
