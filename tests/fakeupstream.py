"""A scriptable misbehaving DNS upstream on loopback, for what no real server will do.

Runs UDP and TCP on one ephemeral 127.0.0.1 port in a thread with its own event
loop. The behaviour for a query is looked up by name in ``behaviours`` (exact
lowercase name with trailing dot), else ``default``:

``answer``        A 192.0.2.1, TTL ``ttl`` (60)
``nxdomain``      NXDOMAIN with SOA (TTL 60, MINIMUM ``soa_minimum``)
``nodata``        NOERROR, no answer, SOA in authority
``drop``          no reply
``delay``         answer after ``delay`` seconds
``servfail``/``refused``/``garbage``
``wrong-id``      first a reply with another ID, then the right one
``wrong-question`` first a reply for another name, then the right one
``wrong-port``    first the reply from another socket, then from the right one
``truncate``      UDP: TC=1 and no records; TCP: the full answer
``big``           30 TXT records (too big for 1232-byte UDP)

Every query is logged in ``log`` as (name, qtype, transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

_LENGTH = struct.Struct("!H")


class FakeUpstream:
    def __init__(self) -> None:
        self.behaviours: dict[str, str] = {}
        self.default = "answer"
        self.ttl = 60
        self.soa_minimum = 5
        self.delay = 2.0
        self.log: list[tuple[str, str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._ready = threading.Event()
        self._udp: asyncio.DatagramTransport | None = None
        self._other: socket.socket | None = None

    # Lifecycle -------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind(("127.0.0.1", port))
                break
            except OSError:
                udp.close()
                tcp.close()
        self.port = port
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._udp = transport  # type: ignore[assignment]
        self._server = await asyncio.start_server(self._tcp_client, sock=tcp)
        self._other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._other.bind(("127.0.0.1", 0))

    def stop(self) -> None:
        async def close() -> None:
            if self._udp is not None:
                self._udp.close()
            self._server.close()
            await self._server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        if self._other is not None:
            self._other.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def names(self) -> list[str]:
        return [name for name, _t, _tr in self.log]

    # Answers ---------------------------------------------------------------

    def behaviour(self, name: str) -> str:
        return self.behaviours.get(name, self.default)

    def _reply(self, request: DNSRecord, behaviour: str, transport: str) -> DNSRecord:
        reply = request.reply()
        reply.header.ra = 1
        qname = request.q.qname
        if behaviour in ("servfail", "refused"):
            reply.header.rcode = getattr(RCODE, behaviour.upper())
        elif behaviour in ("nxdomain", "nodata"):
            if behaviour == "nxdomain":
                reply.header.rcode = RCODE.NXDOMAIN
            soa = f"test. 60 IN SOA ns.test. host.test. 1 3600 600 86400 {self.soa_minimum}"
            reply.add_auth(*RR.fromZone(soa))
        elif behaviour == "truncate" and transport == "udp":
            reply.header.tc = 1
        elif behaviour == "big":
            for i in range(30):
                reply.add_answer(*RR.fromZone(f'{qname} 60 IN TXT "record {i} {"x" * 40}"'))
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, ttl=self.ttl, rdata=A("192.0.2.1")))
        return reply

    async def answer(self, data: bytes, transport: str) -> list[bytes]:
        """The datagrams to send back, in order; [] for silence."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return []
        name = str(request.q.qname).lower()
        self.log.append((name, QTYPE.get(request.q.qtype), transport))
        behaviour = self.behaviour(name)
        if behaviour == "drop":
            return []
        if behaviour == "delay":
            await asyncio.sleep(self.delay)
        if behaviour == "garbage":
            return [b"\x13\x37garbage"]
        good = self._reply(request, behaviour, transport).pack()
        if behaviour == "wrong-id":
            return [struct.pack("!H", (request.header.id + 1) & 0xFFFF) + good[2:], good]
        if behaviour == "wrong-question":
            other = DNSRecord.question("evil.example.", "A")
            other.header.id = request.header.id
            bad = other.reply()
            bad.add_answer(RR("evil.example.", QTYPE.A, ttl=60, rdata=A("203.0.113.66")))
            return [bad.pack(), good]
        return [good]

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(2))
                data = await reader.readexactly(length)
                for reply in await self.answer(data, "tcp"):
                    writer.write(_LENGTH.pack(len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.get_running_loop().create_task(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        replies = await self.fake.answer(data, "udp")
        try:
            name = str(DNSRecord.parse(data).q.qname).lower()
        except Exception:
            name = ""
        if self.fake.behaviour(name) == "wrong-port" and replies and self.fake._other is not None:
            self.fake._other.sendto(replies[0], addr)  # same bytes, wrong source port
        assert self.transport is not None
        for reply in replies:
            self.transport.sendto(reply, addr)


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()
