"""DNS over TLS to upstreams (RFC 7858): one reused, pipelined connection per upstream.

Contract: ``await DotPool.exchange(upstream, message, question_end, timeout)``
sends ``message`` on the upstream's connection (opened, with certificate and
name verification against ``upstream.tls_name``, on first use and again after
it closes) and returns the matching reply. Many queries share the connection
and are matched by ID (RFC 7858 §3.3, RFC 7766 §6.2.1.1); the pool rewrites IDs
so that concurrent queries on one connection never collide. A certificate that
fails verification raises ``ssl.SSLCertVerificationError`` naming the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import struct

from horizon_dns.core.wire import TCP_LENGTH, tcp_frame
from horizon_dns.net.upstream import Upstream, reply_matches

log = logging.getLogger("horizon_dns.net.dot")


class DotConnection:
    """A TLS connection to one upstream with its queries in flight."""

    def __init__(self, upstream: Upstream, context: ssl.SSLContext) -> None:
        self.upstream = upstream
        self.context = context
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.pending: dict[int, tuple[bytes, int, asyncio.Future[bytes]]] = {}
        self.connecting: asyncio.Lock = asyncio.Lock()

    async def _ensure(self, timeout: float) -> asyncio.StreamWriter:
        async with self.connecting:
            if self.writer is not None and not self.writer.is_closing():
                return self.writer
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.upstream.host,
                    self.upstream.port,
                    ssl=self.context,
                    server_hostname=self.upstream.tls_name,
                ),
                timeout,
            )
            self.writer = writer
            self.reader_task = asyncio.get_running_loop().create_task(self._read(reader))
            return writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: BaseException = ConnectionError(f"{self.upstream} closed the connection")
        try:
            while True:
                (length,) = TCP_LENGTH.unpack(await reader.readexactly(2))
                data = await reader.readexactly(length)
                if len(data) < 2:
                    continue
                entry = self.pending.get(struct.unpack_from("!H", data)[0])
                if entry is None:
                    continue
                message, question_end, future = entry
                if reply_matches(data, message, question_end) and not future.done():
                    future.set_result(data)
        except (asyncio.IncompleteReadError, OSError) as exc:
            error = ConnectionError(f"{self.upstream}: {exc}")
        finally:
            for _message, _end, future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            if self.writer is not None:
                self.writer.close()
            self.writer = None

    async def exchange(self, message: bytes, question_end: int, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        writer = await self._ensure(timeout)
        msg_id = secrets.randbits(16)
        while msg_id in self.pending:
            msg_id = secrets.randbits(16)
        message = struct.pack("!H", msg_id) + message[2:]
        future: asyncio.Future[bytes] = loop.create_future()
        self.pending[msg_id] = (message, question_end, future)
        try:
            writer.write(tcp_frame(message))
            return await asyncio.wait_for(future, max(deadline - loop.time(), 0.001))
        finally:
            self.pending.pop(msg_id, None)

    async def close(self) -> None:
        writer = self.writer
        if writer is not None:
            writer.close()
        if self.reader_task is not None:
            self.reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self.reader_task
        if writer is not None:
            # TLS closes with a handshake: wait for it, briefly, so no socket outlives us.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


class DotPool:
    """One DotConnection per upstream."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.connections: dict[Upstream, DotConnection] = {}

    async def exchange(self, upstream: Upstream, message: bytes, question_end: int, timeout: float) -> bytes:
        conn = self.connections.get(upstream)
        if conn is None:
            conn = self.connections[upstream] = DotConnection(upstream, self.context)
        try:
            return await conn.exchange(message, question_end, timeout)
        except ssl.SSLCertVerificationError as exc:
            log.error("%s: TLS certificate verification failed: %s", upstream, exc.verify_message)
            raise

    async def close(self) -> None:
        for conn in self.connections.values():
            await conn.close()
        self.connections.clear()
