"""wait_until, the one way the tests wait: what it returns, and how it fails."""

from __future__ import annotations

import time

import pytest
from waiting import WaitTimeout, wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([0, [], None, "ready", "later"])
    assert wait_until(lambda: next(values), 5, "a value", interval=0) == "ready"


def test_until_decides_and_the_value_is_returned() -> None:
    values = iter([3, 2, 1, 0, -1])
    assert wait_until(lambda: next(values), 5, "zero", until=lambda v: v == 0, interval=0) == 0


def test_a_timeout_says_what_was_awaited_the_last_value_and_the_detail() -> None:
    calls = []
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timeout:
        wait_until(
            lambda: calls.append(1) or len(calls) * -1,
            0.3,
            "the moon",
            until=lambda v: v > 0,
            detail=lambda: "--- log tail",
            interval=0.1,
        )
    elapsed = time.monotonic() - started
    assert isinstance(timeout.value, AssertionError)
    assert (
        str(timeout.value) == f"waited 0.3 s for the moon; last seen: {-len(calls)}\n--- log tail"
    )
    assert 0.3 <= elapsed < 2
    assert 3 <= len(calls) <= 5  # at the start, every 0.1 s, and at the deadline


def test_an_exception_of_the_predicate_ends_the_wait_at_once() -> None:
    def exited() -> bool:
        raise AssertionError("the process exited")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the process exited"):
        wait_until(exited, 30, "a process to start")
    assert time.monotonic() - started < 1
