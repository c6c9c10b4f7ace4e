"""The benchmark's arithmetic (dnsperf parsing, in-round ratios, the target
verdicts) and the listener harness, `python -m bench.listener`.

The load itself needs dnsperf, dnsmasq and unbound and minutes of two cores, so it
is run by hand (`python -m bench`); what it concludes from the numbers is tested here.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from conftest import tools_required

from horizon_dns.net import mmsg

# The repository root, where bench/ lives, is not otherwise on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.dnsperf import Run, parse_dnsperf, percentile
from bench.memory import Memory
from bench.report import targets_section, verdict
from bench.scenarios import Cell, latency_ratio, ratio_median
from bench.servers import Server

DNSPERF_OUTPUT = """
Statistics:

  Queries sent:         500000
  Queries completed:    499990 (100.00%)
  Queries lost:         10 (0.00%)

  Response codes:       NOERROR 499980 (100.00%), SERVFAIL 10 (0.00%)
  Average packet size:  request 38, response 54
  Run time (s):         5.000123
  Queries per second:   99995.5
"""


def test_dnsperf_statistics_are_parsed() -> None:
    run = parse_dnsperf(DNSPERF_OUTPUT)
    assert (run.sent, run.completed, run.lost) == (500000, 499990, 10)
    assert run.qps == pytest.approx(99995.5)
    assert run.rcodes == {"NOERROR": 499980, "SERVFAIL": 10} and run.not_noerror == 10


def test_output_without_statistics_is_an_error() -> None:
    with pytest.raises(ValueError, match="printed no 'sent'"):
        parse_dnsperf("dnsperf: could not connect\n")


def cell(key: str, qps: list[float], p99_us: list[float], cpu_s: float = 1.0) -> Cell:
    scenario, server = key.split("/")
    made = Cell(scenario, Server(server, server, 0, [], Path("/dev/null")), Path("/dev/null"), False)
    for value, p99 in zip(qps, p99_us, strict=True):
        made.runs.append(Run(sent=int(value), completed=int(value), qps=value, cpu_s=cpu_s, runtime=1.0))
        # 100 latencies of 10 µs and the rest at the p99 figure: percentile 99 is p99.
        latencies = [10e-6] * 98 + [p99 * 1e-6] * 2
        made.latency.append(Run(sent=100, completed=100, latencies=latencies))
    return made


def test_ratios_are_taken_within_a_round_then_the_median() -> None:
    # Round speeds differ 2x; the in-round ratio is 1.1 every time.
    ours = cell("hit/hz-cache", [110, 220, 55], [100, 100, 100])
    theirs = cell("hit/dnsmasq", [100, 200, 50], [100, 100, 100])
    assert ratio_median(ours, theirs, lambda r: r.qps) == pytest.approx(1.1)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_latency_ratio_is_per_round() -> None:
    ours = cell("hit/hz-cache", [1, 1, 1], [300, 100, 900])
    theirs = cell("hit/dnsmasq", [1, 1, 1], [200, 100, 600])
    assert latency_ratio(ours, theirs, 99) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("value", "bound", "at_least", "expected"),
    [
        (1.0, 1.0, True, "met"),
        (0.9, 1.0, True, "**missed by 10%**"),
        (1.5, 1.2, False, "**missed by 25%**"),
        (1.1, 1.2, False, "met"),
        (float("nan"), 1.0, True, "not measured"),
    ],
)
def test_verdict_says_by_how_much_a_target_is_missed(
    value: float, bound: float, at_least: bool, expected: str
) -> None:
    assert verdict(value, bound, at_least) == expected


def test_targets_section_names_every_target_and_its_verdict() -> None:
    cells = {
        c.name: c
        for c in (
            cell("hit/dnsmasq", [100, 100], [200, 200]),
            cell("hit/unbound", [120, 120], [200, 200]),
            cell("hit/hz-cache", [110, 110], [300, 300], cpu_s=1.1),
            cell("tcp/unbound", [40, 40], [500, 500]),
            cell("tcp/hz-cache", [100, 100], [400, 400]),
            cell("tcp/dnsmasq", [20, 20], [3000, 3000]),
            cell("miss/hz-nocache", [30, 30], [400, 400]),
        )
    }
    mem = Memory(idle_kib=34 * 1024, hwm_kib=70 * 1024)
    text = targets_section(cells, mem, quick=False)
    rows = {line.split(" | ")[1]: line for line in text.splitlines()[2:]}
    assert "met" in rows["hit × dnsmasq"]
    assert "missed by 8%" in rows["hit × unbound"]  # 110 / 120 = 0.92
    assert "met" in rows["hit per CPU-s × dnsmasq"]  # 100 per CPU-s against 100
    assert "met" in rows["miss × dnsmasq (hit cell)"] and "0.30" in rows["miss × dnsmasq (hit cell)"]
    assert "met" in rows["tcp × unbound"]
    assert "missed by 25%" in rows["hit: p99 ÷ dnsmasq's p99"]  # 300 / 200 = 1.5 against 1.2
    assert "met" in rows["tcp: p99 ÷ dnsmasq's p99"]
    assert "met" in rows["horizon-dns: 0 of 1080 lost"]  # closed and open loop, every hz cell
    assert "met" in rows["idle VmRSS, MiB"]
    assert "missed by 9%" in rows["VmHWM after 100k names, MiB"]  # 70 against 64
    assert "hot" not in text  # a scenario not run is not judged


def test_a_lost_query_misses_the_target() -> None:
    lossy = cell("hit/hz-cache", [100], [100])
    lossy.runs[0].lost = 3
    text = targets_section({lossy.name: lossy}, None, quick=True)
    assert "**missed: 3 lost**" in text


def test_the_listener_harness_answers_every_datagram_of_its_batches() -> None:
    # bench.listener checks each reply's ID and address itself (SystemExit on a wrong
    # one); here, that it runs through batches larger than one read and reports sane
    # figures. 600 datagrams a batch take two calls of _readable (8 x 64 each).
    from bench.listener import measure

    if not mmsg.available():
        if tools_required():
            pytest.fail("recvmmsg/sendmmsg are not available -- CI forbids skipping", pytrace=False)
        pytest.skip("recvmmsg/sendmmsg need Linux with glibc")
    result = asyncio.run(measure(rounds=2, batch=600))
    assert 0 < result["best"] <= result["median"]
    assert result["user"] >= 0 and result["system"] >= 0


def test_light_and_half_load_latencies_are_kept_apart() -> None:
    made = cell("hit/hz-cache", [100, 100, 100], [300, 500, 400])
    made.light = [Run(latencies=[50e-6] * 98 + [p * 1e-6] * 2) for p in (90, 70, 80)]
    assert made.latency_us(99) == pytest.approx(400)  # half load: median of 300, 500, 400
    assert made.latency_us(99, light=True) == pytest.approx(80)
    assert made.latency_us(50, light=True) == pytest.approx(50)
