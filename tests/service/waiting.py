"""The one way havend's tests wait for something: :func:`wait_until`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was awaited did not happen in time (an assertion that failed)."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    until: Callable[[T], Any] | None = None,
    detail: Callable[[], object] | None = None,
    interval: float = 0.05,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy
    value (or, with ``until``, a value ``until`` accepts), and return that value.

    It is called at least once, and once more at the deadline, never after it.
    If ``timeout`` seconds pass first, :class:`WaitTimeout` says ``what`` was
    awaited, the value last returned, and ``detail()`` (a log tail, say)
    computed then. An exception raised by ``predicate`` or ``until`` (a process
    that exited, an assertion on the way) ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if until(value) if until is not None else value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = f"waited {timeout} s for {what}; last seen: {value!r}"
            if detail is not None:
                message += f"\n{detail()}"
            raise WaitTimeout(message)
        time.sleep(min(interval, remaining))
