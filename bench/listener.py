"""python -m bench.listener: the batched UDP listener's own cost per datagram.

No dnsperf and no other server: a client socket on loopback queues ``--batch``
queries for 1,000 cached names, then ``BatchedUdpListener._readable`` is called by
hand to read, answer and send them (recvmmsg and sendmmsg included) and the client
drains the replies. Prints the best and the median wall time per datagram over
``--rounds`` batches, and the process's user and system CPU per datagram. Every
reply is checked. Bounded: ``--rounds`` batches, nothing sent off 127.0.0.1.

What it isolates: the listener and the hot path, without the machine's other
process (dnsperf) or the event loop's wakeups -- the figure to compare when
changing ``horizon_dns/net`` or ``QueryHandler.hot_answer_known``/``hot_answer``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.queries import ANSWER, dns_query, names
from bench.servers import CONFIGS, horizon_dir
from horizon_dns.config.load import load_config
from horizon_dns.core.handler import QueryHandler
from horizon_dns.net import mmsg
from horizon_dns.net.udp import BatchedUdpListener, InFlight

QUERIES = names(1000)  # what the benchmark's 1,000-name scenario asks


def handler_for_bench(tmp: Path) -> QueryHandler:
    """The handler of the benchmark's cache scenario (a cache, then the template)."""
    config = horizon_dir(tmp, "listener", 0, (CONFIGS / "rules-cache.yaml").read_text())
    return QueryHandler(load_config(config).pipeline())


async def measure(rounds: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="horizon-listener-") as tmp:
        handler = handler_for_bench(Path(tmp))
        for name in QUERIES:  # cache every name, then remember every reply
            await handler.handle(dns_query(name, 0), ("127.0.0.1", 1), "udp")
            handler.hot_answer(dns_query(name, 0))
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (server, client):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        listener = BatchedUdpListener(handler, InFlight())
        transport = listener.attach(server)
        asyncio.get_running_loop().remove_reader(server.fileno())  # driven by hand
        senders: dict[bytes, tuple[tuple[str, int], bool]] = {}
        destination = server.getsockname()
        per_datagram: list[float] = []
        user = system = 0.0
        for round_no in range(rounds):
            first = round_no * batch
            for k in range(batch):
                client.sendto(dns_query(QUERIES[(first + k) % len(QUERIES)], k), destination)
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            listener._readable(transport, senders)  # up to ROUNDS x SLOTS datagrams a call
            while _pending(server):
                listener._readable(transport, senders)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            user += after.ru_utime - before.ru_utime
            system += after.ru_stime - before.ru_stime
            per_datagram.append(elapsed / batch)
            for k in range(batch):
                reply = client.recv(512)
                if reply[:2] != k.to_bytes(2, "big") or not reply.endswith(ANSWER):
                    raise SystemExit(f"round {round_no}: reply {k} is wrong: {reply!r}")
        total = rounds * batch
        return {
            "best": min(per_datagram) * 1e6,
            "median": statistics.median(per_datagram) * 1e6,
            "user": user / total * 1e6,
            "system": system / total * 1e6,
        }
    finally:
        server.close()
        client.close()


def _pending(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listener", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="batches to time (default 400)")
    parser.add_argument("--batch", type=int, default=512, help="datagrams per batch (default 512)")
    args = parser.parse_args(argv)
    if not mmsg.available():
        print("bench.listener: recvmmsg/sendmmsg are not available here (Linux, glibc)", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= BatchedUdpListener.SLOTS * BatchedUdpListener.ROUNDS * 4:
        parser.error(f"--batch must be 1-{BatchedUdpListener.SLOTS * BatchedUdpListener.ROUNDS * 4}")
    result = asyncio.run(measure(args.rounds, args.batch))
    print(
        f"{args.rounds} batches of {args.batch}: per datagram best {result['best']:.2f} µs, "
        f"median {result['median']:.2f} µs wall; CPU {result['user']:.2f} µs user + "
        f"{result['system']:.2f} µs system"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
