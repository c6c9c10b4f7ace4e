"""Start a coroutine at once; make it a task only if it has to wait.

Contract: ``start_eagerly(coro)`` runs ``coro`` up to its first real suspension
inside the caller. If it finishes there (a template answer, a cache entry, a
REFUSED), no task is ever made and None is returned; otherwise the returned task
carries it on from where it stopped, with the usual semantics: it resumes when
the awaited future completes, sees that future's result or exception, and is
cancelled by ``task.cancel()``.

Why: most full-path answers need no I/O, and a task costs ~6 µs to create and
schedule on uvloop (measured here), as much as rendering the answer. Python 3.12
has this built in (``asyncio.eager_task_factory``) and it is used there; on 3.11
a small driver does the same. During the first, synchronous step
``asyncio.current_task()`` is None on 3.11, so code on the query path must not
need it (``asyncio.wait_for`` does not, on 3.11).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

_EAGER_FACTORY = getattr(asyncio, "eager_task_factory", None) if sys.version_info >= (3, 12) else None


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now; None when it finished, else the task that finishes it."""
    if _EAGER_FACTORY is not None:
        task: asyncio.Task[None] = _EAGER_FACTORY(asyncio.get_running_loop(), coro)
        return None if task.done() else task
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_carry_on(coro, _taken(yielded)))


def _taken(yielded: Any) -> Any:
    """What asyncio.Task does with a yielded future: clear its "awaited by a task" mark.

    Left set, the next coroutine to await the same future (two queries waiting on
    one lookup) fails with "await wasn't used with future".
    """
    if getattr(yielded, "_asyncio_future_blocking", False):
        yielded._asyncio_future_blocking = False
    return yielded


async def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive ``coro`` on from a suspension, as the asyncio.Task running it would have."""
    try:
        while True:
            if yielded is None:
                await asyncio.sleep(0)  # a bare yield: give the loop one turn
            elif asyncio.isfuture(yielded):
                try:
                    await yielded  # the coroutine reads the outcome itself when resumed
                except asyncio.CancelledError:
                    if not yielded.cancelled():
                        # This task was cancelled, not what it waits on: deliver it inside.
                        yielded = _taken(coro.throw(asyncio.CancelledError()))
                        continue
                except BaseException:  # the future's own failure: coro reads it again
                    pass
            else:
                yielded = _taken(coro.throw(RuntimeError(f"coroutine yielded {yielded!r}, not a future")))
                continue
            yielded = _taken(coro.send(None))
    except StopIteration:
        return
