"""start_eagerly: a query coroutine runs at once and becomes a task only when it must wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from horizon_dns.net.eager import start_eagerly

LOOPS = pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


def run(new_loop: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, Any]) -> Any:
    loop = new_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


@LOOPS
def test_a_coroutine_that_never_waits_finishes_inside_the_call(new_loop: Any) -> None:
    async def main() -> tuple[object, list[str]]:
        done: list[str] = []

        async def answer() -> None:
            done.append("answered")

        task = start_eagerly(answer())
        return task, list(done)  # read before any loop turn

    assert run(new_loop, main()) == (None, ["answered"])


@LOOPS
def test_waiters_on_one_future_each_get_its_result(new_loop: Any) -> None:
    """Two queries waiting on one lookup (the overlay stage shares lookups in flight)."""

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        lookup: asyncio.Future[str] = loop.create_future()
        got: list[object] = []

        async def query(i: int) -> None:
            got.append((i, await lookup))

        tasks = [start_eagerly(query(i)) for i in range(3)]
        assert all(t is not None for t in tasks) and not got
        loop.call_soon(lookup.set_result, "100.64.0.2")
        await asyncio.gather(*[t for t in tasks if t is not None])
        return got

    assert sorted(run(new_loop, main())) == [(0, "100.64.0.2"), (1, "100.64.0.2"), (2, "100.64.0.2")]


@LOOPS
def test_a_failed_future_raises_inside_the_coroutine(new_loop: Any) -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        upstream: asyncio.Future[str] = loop.create_future()
        seen: list[str] = []

        async def query() -> None:
            try:
                await upstream
            except TimeoutError:
                seen.append("timeout handled")

        task = start_eagerly(query())
        assert task is not None
        upstream.set_exception(TimeoutError())
        await task
        return seen[0]

    assert run(new_loop, main()) == "timeout handled"


@LOOPS
def test_cancelling_the_task_cancels_the_coroutine(new_loop: Any) -> None:
    async def main() -> tuple[bool, list[str]]:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        seen: list[str] = []

        async def query() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled inside")
                raise

        task = start_eagerly(query())
        assert task is not None
        await asyncio.sleep(0)  # let it reach its wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled(), seen

    assert run(new_loop, main()) == (True, ["cancelled inside"])


@LOOPS
def test_sleeps_wait_for_and_several_suspensions(new_loop: Any) -> None:
    async def main() -> list[int]:
        steps: list[int] = []

        async def slow() -> int:
            await asyncio.sleep(0.001)
            return 7

        async def query() -> None:
            await asyncio.sleep(0)  # a bare yield
            steps.append(await asyncio.wait_for(slow(), 5))
            await asyncio.sleep(0.001)
            steps.append(8)

        task = start_eagerly(query())
        assert task is not None
        await task
        return steps

    assert run(new_loop, main()) == [7, 8]
