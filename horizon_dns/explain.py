"""``explain``: run one query through the real pipeline and show every step.

Contract: ``await explain(config, name, qtype, client)`` returns the trace text
(zone chosen, each stage visited, the regex and groups that matched, the
rendered lines, CNAME chasing, the end of the chain) followed by the reply in
dig-like form, and the reply's rcode.
"""

from __future__ import annotations

from dnslib import QTYPE, DNSRecord

from horizon_dns.config.model import Config
from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.message import Query
from horizon_dns.core.names import text_to_name


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


async def explain(config: Config, name: str, qtype: str, client: str) -> tuple[str, int]:
    """Run one query with tracing on; return the printable trace and the rcode."""
    type_code = parse_qtype(qtype)
    wire = text_to_name(name)
    query = Query(0, 0x0100, wire, type_code, 1, question=wire + type_code.to_bytes(2, "big") + b"\x00\x01")
    query.client = (client, 0)
    query.transport = "explain"
    query.trace = []
    pipeline = config.pipeline()
    await pipeline.start()
    try:
        reply, zone = await pipeline.resolve(query)
    finally:
        await pipeline.stop()
    ra = zone is not None and zone.recursion_available
    packed = encode_reply(query, reply, TCP_LIMIT, ra)
    lines = [f"query: {query.name} {query.type_name} from {client}"]
    lines += [f"  {step}" for step in query.trace]
    lines.append(f"answered by: {reply.stage} ({reply.outcome.value}, reason {reply.reason})")
    if reply.ede:
        lines.append(f"extended error: {reply.ede[0]} {reply.ede[1]}")
    lines.append("")
    lines.append(str(DNSRecord.parse(packed)))
    return "\n".join(lines), reply.rcode
