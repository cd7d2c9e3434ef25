"""Reading whole frames of ``ship.wire`` from an asyncio stream."""

from __future__ import annotations

import asyncio

from havend.ship import wire

# StreamReader buffer limit for replication links: big enough that a BATCH
# arrives without pausing and resuming the transport at every TLS record.
STREAM_LIMIT = 8 << 20


async def read_frame(
    reader: asyncio.StreamReader, decoder: wire.FrameDecoder, timeout: float | None
) -> wire.Frame:
    """The next frame; IncompleteReadError when the peer closes, TimeoutError
    when it does not arrive whole within ``timeout`` seconds. The payload is
    read in one piece and decoded without further copies."""
    async with asyncio.timeout(timeout):
        header = await reader.readexactly(wire.FRAME_HEADER_SIZE)
        length, kind = decoder.parse_header(header)
        payload = await reader.readexactly(length) if length else b""
    return decoder.decode(kind, payload, wire.FRAME_HEADER_SIZE + length)
