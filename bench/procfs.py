"""What /proc says about a running process: its CPU seconds and its memory figures.

``proc_cpu_seconds`` is what CPU per query is computed from (sampled before and after
each dnsperf run); ``proc_status_kib`` reads VmRSS/VmHWM for the memory figures. Linux
only; PID must be alive.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
