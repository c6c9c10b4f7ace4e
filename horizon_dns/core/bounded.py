"""Tables of things that can be recomputed, kept to a size by forgetting them all.

Contract: ``remember(table, key, value, limit)`` stores ``value`` and returns it;
a table already holding ``limit`` entries is emptied first. No per-entry
bookkeeping (no LRU links), so a lookup stays one dict access: what is forgotten
-- a parsed name, a packed reply, an ACL verdict -- is cheap to make again, and a
flood of distinct keys cannot grow the table without bound.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, limit: int) -> V:
    """``table[key] = value``, emptying ``table`` first when it holds ``limit`` entries."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value
