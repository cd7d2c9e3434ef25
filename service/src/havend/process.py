"""Process lifetime: running until the operator says stop."""

from __future__ import annotations

import asyncio
import signal


async def until_stopped() -> None:
    """Return at the first SIGINT or SIGTERM (then the caller shuts down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def human_bytes(size: float) -> str:
    """``1.5 GiB``: sizes in logs and progress lines."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
