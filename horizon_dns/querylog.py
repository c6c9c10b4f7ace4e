"""The query log: one structured line per query, to the ``horizon_dns.querylog`` logger.

Off by default. Contract: a :class:`QueryLog` is a handler observer; with
``sample`` < 1 only that fraction of queries is logged. While it is on, every
query takes the full path (the hot path would not see it), which is the price
of seeing everything.
"""

from __future__ import annotations

import logging
import random

from horizon_dns.core.message import Query, Reply
from horizon_dns.core.wire import rcode_name

log = logging.getLogger("horizon_dns.querylog")


class QueryLog:
    """Writes ``client=... name=... type=... rcode=... stage=... reason=... ms=...`` lines."""

    def __init__(self, sample: float = 1.0) -> None:
        self.sample = sample
        self.written = 0

    def __call__(self, query: Query, reply: Reply, zone: str, seconds: float) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        self.written += 1
        client = query.client[0] if query.client else "-"
        log.info(
            'client=%s transport=%s name=%s type=%s zone=%s rcode=%s stage=%s outcome=%s reason="%s" ms=%.2f',
            client, query.transport, query.name, query.type_name, zone,
            rcode_name(reply.rcode), reply.stage, reply.outcome.value, reply.reason,
            seconds * 1000,
        )  # fmt: skip
