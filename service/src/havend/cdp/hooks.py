"""Application-consistent checkpoints: a freeze hook, the checkpoint, a thaw hook.

Hooks are commands run on the source node (argv lists, no shell): ``ssh db1
fsfreeze -f /srv``, ``virsh domfsfreeze vm1``, a script. Each has a timeout;
the thaw runs whatever happened to the freeze or the checkpoint, so a
protected server is never left frozen by havend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from havend.cdp.checkpoint import Checkpoint
from havend.errors import CheckpointError

log = logging.getLogger("havend.cdp")


@dataclass(frozen=True, slots=True)
class HookResult:
    checkpoint: Checkpoint | None
    freeze_seconds: float  # from the freeze starting to the thaw ending
    thaw_error: str = ""


async def run_hook(argv: Sequence[str], timeout: float, what: str) -> None:
    """Run one hook; CheckpointError if it fails, cannot start or times out (killed)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise CheckpointError(f"{what} hook {argv[0]!r} cannot run: {exc.strerror}") from None
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CheckpointError(f"{what} hook timed out after {timeout:g} s (killed)") from None
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip()[-500:]
        raise CheckpointError(f"{what} hook exited with {proc.returncode}: {tail}")


async def app_consistent(
    pre: Sequence[str],
    post: Sequence[str],
    timeout: float,
    take: Callable[[], Checkpoint],
) -> HookResult:
    """Freeze, take the checkpoint (``take`` runs in a worker thread), thaw.
    A failed freeze takes no checkpoint (CheckpointError) after thawing; a
    failed thaw is reported with the checkpoint, which stands."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    checkpoint = None
    try:
        await run_hook(pre, timeout, "freeze")
        checkpoint = await loop.run_in_executor(None, take)
    finally:
        thaw_error = ""
        try:
            await run_hook(post, timeout, "thaw")
        except CheckpointError as exc:
            thaw_error = str(exc)
            log.error("%s: the protected server may still be frozen", exc)
    return HookResult(checkpoint, time.monotonic() - started, thaw_error)
