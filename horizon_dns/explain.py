"""``explain``: run one query through the real pipeline and show every step.

Contract: ``await explain(config, name, qtype, client)`` returns the trace text
(zone chosen, each stage visited, the regex and groups that matched, the
rendered lines, each overlay lookup with its method and timing, upstream tries,
CNAME chasing, the fallback and why it fired, the cache state) followed by the
reply in dig-like form, and the reply's rcode. ``offline_only`` drops the stages
that use the network; ``repeat`` runs the query again on the same pipeline, so
the second run shows what the caches hold.
"""

from __future__ import annotations

import time

from dnslib import QTYPE, DNSRecord

from horizon_dns.config.schema import Config
from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.message import Query
from horizon_dns.core.names import text_to_name
from horizon_dns.core.pipeline import Pipeline, Zone


def parse_qtype(text: str) -> int:
    """``A``, ``aaaa``, ``TYPE65`` or a number; ValueError otherwise."""
    upper = text.upper()
    if upper.isdigit() or (upper.startswith("TYPE") and upper[4:].isdigit()):
        code = int(upper.removeprefix("TYPE"))
    else:
        found = QTYPE.reverse.get(upper)
        if found is None:
            raise ValueError(f"unknown query type {text!r}")
        code = int(found)
    if not 0 <= code <= 65535:
        raise ValueError(f"query type {text!r} is out of range")
    return code


def offline(pipeline: Pipeline) -> Pipeline:
    """The same zones without the stages that use the network (forward, overlay)."""
    zones = []
    for zone in pipeline.zones.values():
        stages = [stage for stage in zone.stages if not getattr(stage, "network", False)]
        zones.append(Zone(zone.name, stages, zone.soa))
    by_name = {zone.name: zone for zone in zones}
    for zone in pipeline.zones.values():
        if zone.fallback_zone is not None:
            by_name[zone.name].fallback_zone = by_name[zone.fallback_zone.name]
            by_name[zone.name].fallback_rcodes = zone.fallback_rcodes
    return Pipeline(zones, pipeline.max_cname_depth, pipeline.guard)


async def explain_query(pipeline: Pipeline, name: str, qtype: str, client: str) -> tuple[str, int]:
    """Run one query with tracing on through a started pipeline; the trace text and rcode."""
    type_code = parse_qtype(qtype)
    wire = text_to_name(name)
    query = Query(0, 0x0100, wire, type_code, 1, question=wire + type_code.to_bytes(2, "big") + b"\x00\x01")
    query.client = (client, 0)
    query.transport = "explain"
    query.trace = []
    started = time.perf_counter()
    reply, zone = await pipeline.resolve(query)
    elapsed = (time.perf_counter() - started) * 1000
    ra = zone is not None and zone.recursion_available
    packed = encode_reply(query, reply, TCP_LIMIT, ra)
    lines = [f"query: {query.name} {query.type_name} from {client}"]
    lines += [f"  {step}" for step in query.trace]
    lines.append(
        f"answered by: {reply.stage} ({reply.outcome.value}, reason {reply.reason}) in {elapsed:.1f} ms"
    )
    if reply.ede:
        lines.append(f"extended error: {reply.ede[0]} {reply.ede[1]}")
    lines.append("")
    lines.append(str(DNSRecord.parse(packed)))
    return "\n".join(lines), reply.rcode


async def explain(
    config: Config, name: str, qtype: str, client: str, offline_only: bool = False, repeat: int = 1
) -> tuple[str, int]:
    """Explain a query ``repeat`` times on one pipeline (the second run shows the caches)."""
    pipeline = config.pipeline()
    if offline_only:
        pipeline = offline(pipeline)
    await pipeline.start()
    texts: list[str] = []
    rcode = 0
    try:
        for run in range(repeat):
            text, rcode = await explain_query(pipeline, name, qtype, client)
            texts.append(text if repeat == 1 else f"--- run {run + 1} ---\n{text}")
    finally:
        await pipeline.stop()
    return "\n\n".join(texts), rcode
