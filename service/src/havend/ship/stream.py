"""Reading whole frames of ``ship.wire`` from an asyncio stream."""

from __future__ import annotations

import asyncio

from havend.ship import wire


async def read_frame(
    reader: asyncio.StreamReader, decoder: wire.FrameDecoder, timeout: float | None
) -> wire.Frame:
    """The next frame; IncompleteReadError when the peer closes, TimeoutError after ``timeout``."""
    while (frame := decoder.next_frame()) is None:
        data = await asyncio.wait_for(reader.read(1 << 20), timeout)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        decoder.feed(data)
    return frame
