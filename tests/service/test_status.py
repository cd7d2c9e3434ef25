"""The node's status report loop (``status.json`` every ``status_period``)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from havend.node.status import StatusMixin


class _FlakyNode(StatusMixin):
    """Just what the report loop reads; its first status (made while a group
    changes, say) raises, as does its first listener call."""

    def __init__(self, state_dir: Path) -> None:  # no NodeBase: only the loop's parts
        self.config = SimpleNamespace(
            state_dir=str(state_dir), status_period=0.01, status_interval=3600.0
        )
        self.status_listeners = [self._listener]
        self.made = 0
        self.heard: list[int] = []

    def status(self) -> dict[str, Any]:
        self.made += 1
        if self.made == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return {"node": "n", "tick": self.made, "groups": []}

    def _listener(self, status: dict[str, Any]) -> None:
        self.heard.append(status["tick"])
        if len(self.heard) == 1:
            raise KeyError("groups")


def test_the_status_report_survives_a_failed_tick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick whose status raises is logged and the next tick writes
    status.json: one failure never silences the node for good."""
    node = _FlakyNode(tmp_path)
    path = tmp_path / "status.json"

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(node._report())
        try:
            for _ in range(1000):  # bounded: about 10 s at most
                if len(node.heard) >= 3 or task.done():
                    break
                await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.ERROR, logger="havend"):
        asyncio.run(scenario())
    assert len(node.heard) >= 3, node.heard
    assert json.loads(path.read_text())["tick"] >= 3
    failed = [r for r in caplog.records if "status report failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert any("cannot record group states" in r.getMessage() for r in caplog.records)
