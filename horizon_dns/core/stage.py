"""The Stage contract: what every pluggable step of a zone's pipeline implements.

A stage either answers (returns a Reply) or defers by awaiting ``next(query)``
and returning -- possibly after copying and changing -- what comes back. Stages
never hold a pointer to their neighbour: the pipeline builds the ``next``
closures once. Sockets and tasks open in ``start()``, never in ``__init__``, so
``check`` can build every stage without any I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from horizon_dns.core.message import Query, Reply

if TYPE_CHECKING:
    from horizon_dns.core.packed import Packed
    from horizon_dns.core.stats import Sample

Next = Callable[[Query], Awaitable[Reply]]


class Stage(Protocol):
    """One step of a zone's pipeline."""

    #: Short, stable name used in Reply.stage, logs and metrics (``template:hub``).
    name: str
    #: True when the stage may ask other servers, so replies carry RA=1.
    recurses: bool

    async def handle(self, query: Query, next: Next) -> Reply: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Reporting(Protocol):
    """A stage that keeps statistics: the metrics collector asks it at scrape time."""

    def stats(self, zone: str) -> Iterable[Sample]:
        """The stage's numbers now, as Samples (see :class:`horizon_dns.core.stats.Sample`)."""


@runtime_checkable
class OverlayDerived(Protocol):
    """A stage that holds answers derived from the overlay (findings, cached replies)."""

    def forget_overlay(self, why: str) -> int:
        """Drop them all, the horizon having moved (``why``); how many were dropped."""


@runtime_checkable
class HotCache(Protocol):
    """A cache that can lead a zone: it stores final replies and answers from bytes."""

    name: str
    #: Set by the zone when this cache is its first stage: the zone then stores final replies.
    leading: bool

    def serve_fresh(self, key: bytes) -> tuple[Packed, bytes, float, object, int] | None:
        """(shape, aged body, exact until, entry, age in seconds) of a fresh entry, or None.

        The aged body stays exactly what a hit would serve until "exact until": the
        moment the entry's age next changes, or it expires."""

    def current_age(self, key: bytes, entry: object) -> tuple[int, float] | None:
        """(age, until when it holds) while ``entry`` is still the fresh entry of ``key``."""

    def store_final(self, query: Query, reply: Reply) -> None: ...
