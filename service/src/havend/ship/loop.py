"""Event loops and threads: the shipper runs in a loop of its own, in a
thread of its own, beside the node's loop that serves NBD (see
:meth:`havend.ship.shipper.Shipper.start_thread` for why); these helpers
call from one into the other."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop the caller runs in, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def call_in(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` in ``loop``: at once if the caller runs in it (or there is
    no loop), else soon, from any thread; nothing once that loop is closed."""
    if loop is None or running_loop() is loop:
        fn(*args)
    else:
        with contextlib.suppress(RuntimeError):  # closed: the node is stopping
            loop.call_soon_threadsafe(fn, *args)


def start_loop_thread(
    name: str, main: Coroutine[Any, Any, None]
) -> tuple[asyncio.AbstractEventLoop, threading.Thread, asyncio.Future[None]]:
    """Run ``main`` in a new event loop (of the caller's loop's kind: uvloop or
    asyncio's) in a new daemon thread; (that loop, the thread, a future in
    the caller's loop that ends with ``main``). The loop stops and closes
    once ``main`` is over; cancelling the future cancels ``main``."""
    caller = asyncio.get_running_loop()
    own = type(caller)()

    def loop_thread() -> None:
        asyncio.set_event_loop(own)
        try:
            own.run_forever()
            own.run_until_complete(own.shutdown_default_executor())
        finally:
            own.close()

    thread = threading.Thread(target=loop_thread, name=name, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(main, own)
    running.add_done_callback(lambda _: own.call_soon_threadsafe(own.stop))
    return own, thread, asyncio.wrap_future(running, loop=caller)


async def run_in(loop: asyncio.AbstractEventLoop | None, work: Awaitable[T]) -> T:
    """Await ``work`` (a coroutine) in ``loop``: here if the caller runs in it
    (or there is none)."""
    if loop is None or running_loop() is loop:
        return await work
    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(work, loop)  # type: ignore[arg-type]
    )
