"""Application-consistent checkpoints: a freeze hook, the checkpoint, a thaw hook.

Hooks are commands (argv lists): run on the source node (``virsh domfsfreeze
vm1``, a script), or, with an ``ssh`` target, on the protected server itself
through SSH (paramiko; key authentication, host key checked against a
known_hosts file, never accepted blindly). Each has a timeout; the thaw runs
whatever happened to the freeze or the checkpoint, so a protected server is
never left frozen by havend.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
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


@dataclass(frozen=True, slots=True)
class SSHTarget:
    """Where ssh hooks run: the protected server."""

    host: str
    user: str
    key_file: str
    known_hosts: str
    port: int = 22


def _ssh_run(target: SSHTarget, argv: Sequence[str], timeout: float, what: str) -> None:
    """One command on the protected server (blocking: a worker thread)."""
    import paramiko

    client = paramiko.SSHClient()
    try:
        try:
            client.load_host_keys(target.known_hosts)
        except OSError as exc:
            raise CheckpointError(f"{what} hook: known_hosts {target.known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                target.host,
                port=target.port,
                username=target.user,
                key_filename=target.key_file,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
            _, stdout, stderr = client.exec_command(shlex.join(argv), timeout=timeout)
            channel = stdout.channel
            if not channel.status_event.wait(timeout):
                raise TimeoutError
            output = (stdout.read() + stderr.read()).decode(errors="replace").strip()[-500:]
            status = channel.recv_exit_status()
        except TimeoutError:
            raise CheckpointError(
                f"{what} hook timed out after {timeout:g} s on {target.host}"
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            why = str(exc) or type(exc).__name__
            raise CheckpointError(f"{what} hook: ssh {target.user}@{target.host}: {why}") from None
        if status != 0:
            raise CheckpointError(f"{what} hook exited with {status} on {target.host}: {output}")
    finally:
        client.close()


async def run_hook(
    argv: Sequence[str], timeout: float, what: str, ssh: SSHTarget | None = None
) -> None:
    """Run one hook; CheckpointError if it fails, cannot start or times out (killed)."""
    if ssh is not None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _ssh_run, ssh, argv, timeout, what)
        return
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
    ssh: SSHTarget | None = None,
) -> HookResult:
    """Freeze, take the checkpoint (``take`` runs in a worker thread), thaw.
    A failed freeze takes no checkpoint (CheckpointError) after thawing; a
    failed thaw is reported with the checkpoint, which stands."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    checkpoint = None
    try:
        await run_hook(pre, timeout, "freeze", ssh)
        checkpoint = await loop.run_in_executor(None, take)
    finally:
        thaw_error = ""
        try:
            await run_hook(post, timeout, "thaw", ssh)
        except CheckpointError as exc:
            thaw_error = str(exc)
            log.error("%s: the protected server may still be frozen", exc)
    return HookResult(checkpoint, time.monotonic() - started, thaw_error)
