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
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.benchmark import run
from bench.scenarios import SCENARIOS
from bench.servers import HERE


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
