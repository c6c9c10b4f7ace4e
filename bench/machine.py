"""What the report says about the machine: CPU, kernel, pinning and program versions.

``machine_info`` returns (label, value) rows; anything it cannot find is "?" or
"not installed", never an exception.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from bench.servers import ROOT


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
