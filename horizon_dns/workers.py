"""``workers: N``: N server processes sharing the listen addresses (SO_REUSEPORT).

Contract: :func:`run_workers` forks N children, each running the whole server on
the same addresses with its own cache (the kernel spreads queries among them);
worker 0 alone also runs the LLMNR responder, the mDNS announcer and metrics.
The parent supervises: a worker that dies is restarted (after a back-off when it
keeps dying); SIGHUP is passed to every worker (each reloads, as one would);
SIGTERM/SIGINT is passed on, and the parent exits 0 once every worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from horizon_dns.config.schema import Config

log = logging.getLogger("horizon_dns.workers")

RESTART_BACKOFF_MAX = 30.0


class _WorkerName(logging.Filter):
    """Puts the worker's index before the logger name: N processes share one journal."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index} "

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            record.name = self.prefix + record.name
        return True


def _child(config: Config, index: int) -> None:
    from horizon_dns.runtime import serve

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerName(index))
    code = 1
    try:
        code = asyncio.run(serve(config, worker=index))
    except Exception:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def run_workers(config: Config) -> int:
    """Start ``config.workers`` processes and supervise them until told to stop."""
    from horizon_dns.net.systemd import notify

    workers: dict[int, int] = {}  # pid -> index
    started: dict[int, float] = {}  # index -> last start time
    backoff: dict[int, float] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            _child(config, index)
        workers[pid] = index
        started[index] = time.monotonic()

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            notify("STOPPING=1")
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(config.workers):
        spawn(index)
    log.info("started %d workers: %s", config.workers, ", ".join(str(p) for p in workers))
    notify("READY=1", f"STATUS={config.workers} workers")
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in workers:
            continue
        index = workers.pop(pid)
        if stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        quick = time.monotonic() - started[index] < 5
        delay = min(backoff.get(index, 0.5) * 2, RESTART_BACKOFF_MAX) if quick else 0.0
        backoff[index] = delay or 0.5
        log.error("worker %d (pid %d) exited with %d; restarting%s", index, pid, code,
                  f" in {delay:.1f} s" if delay else "")  # fmt: skip
        if delay:
            time.sleep(delay)  # a crash loop must not spin the CPU
        if not stopping:
            spawn(index)
    sys.stderr.flush()
    return 0
