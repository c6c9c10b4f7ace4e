"""In-process CPU per query: the hit path and the full pipeline, no sockets, no dnsperf.

``python -m bench.micro [--rounds 15] [--calls 100000]`` prints the median and the
spread of nanoseconds per call over interleaved rounds for

* ``hot``: ``QueryHandler.fast_answer`` on 1,000 cached names (the reply memo);
* ``hit``: the same with the reply memo emptied every round of 1,000 (the leading
  cache's own hit path, which renews the memo);
* ``full``: ``QueryHandler.handle`` on the no-cache template zone (decode, pipeline,
  template rendered, encoded) -- the full-pipeline answer.

DECISIONS.md 5 asks that a change to these paths cost at most 3% CPU: run this on
the old and the new tree (``PYTHONPATH=<tree> python -m bench.micro``) and compare
the medians; the spread says whether 3% is resolved. Configurations are the
benchmark's own (``bench/configs``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import dns.message

from horizon_dns.config.load import load_config
from horizon_dns.core.handler import QueryHandler

CONFIGS = Path(__file__).resolve().parent / "configs"
NAMES = 1000


def _handler(rules: str, tmp: Path) -> QueryHandler:
    (tmp / "rules").mkdir(parents=True, exist_ok=True)
    (tmp / "rules" / "10-bench.yaml").write_text((CONFIGS / rules).read_text())
    (tmp / "horizon.yaml").write_text("rules: rules\n")
    config = load_config(tmp / "horizon.yaml")
    return QueryHandler(config.pipeline())


def _queries() -> list[bytes]:
    return [dns.message.make_query(f"h{i}.svc.mydomain.test.", "A").to_wire() for i in range(NAMES)]


def _hot(handler: QueryHandler) -> Callable[[bytes], bytes | None]:
    """The hot path's entry, under its name in this tree or in an older one (for before/after)."""
    return getattr(handler, "hot_answer", None) or handler.fast_answer  # type: ignore[attr-defined]


def _forget(handler: QueryHandler) -> None:
    """Empty the hot path's replies, under this tree's name or an older one's."""
    forget = getattr(handler, "forget_hot_replies", None) or handler.forget_remembered  # type: ignore[attr-defined]
    forget()


def measure(calls: int, rounds: int, tmp: Path) -> dict[str, list[float]]:
    """ns per call of each path, one figure per round, the paths interleaved."""
    loop = asyncio.new_event_loop()
    queries = _queries()
    cached = _handler("rules-cache.yaml", tmp / "cache")
    full = _handler("rules-nocache.yaml", tmp / "nocache")
    for data in queries:
        loop.run_until_complete(cached.handle(data, ("127.0.0.1", 9), "udp"))
        assert _hot(cached)(data) is not None
    results: dict[str, list[float]] = {"hot": [], "hit": [], "full": []}
    fast = _hot(cached)
    clock = time.process_time_ns
    per_round = max(1, calls // NAMES)

    async def full_batch() -> None:
        handle = full.handle
        for _ in range(max(1, per_round // 10)):
            for data in queries:
                await handle(data, ("127.0.0.1", 9), "udp")

    gc.disable()
    try:
        for _ in range(rounds):
            started = clock()
            for _ in range(per_round):
                for data in queries:
                    fast(data)
            results["hot"].append((clock() - started) / (per_round * NAMES))
            started = clock()
            for _ in range(per_round):
                _forget(cached)
                for data in queries:
                    fast(data)
            results["hit"].append((clock() - started) / (per_round * NAMES))
            started = clock()
            loop.run_until_complete(full_batch())
            results["full"].append((clock() - started) / (max(1, per_round // 10) * NAMES))
    finally:
        gc.enable()
        loop.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100_000, help="hit-path calls per round")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.calls, args.rounds, Path(tmp))
    for path, figures in results.items():
        median = statistics.median(figures)
        spread = (statistics.quantiles(figures, n=4)[2] - statistics.quantiles(figures, n=4)[0]) / median
        print(f"{path:5} {median:9.1f} ns/query  (interquartile spread {spread:.1%}, {len(figures)} rounds)")


if __name__ == "__main__":
    main()
