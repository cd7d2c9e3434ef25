"""havend against real NBD clients: qemu-img, qemu-io, nbdcopy, nbdinfo, nbdsh, fio."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Havend, require_tool, start_havend

MiB = 1 << 20


def run(
    *cmd: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [require_tool(cmd[0]), *cmd[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr}")
    return result


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[Havend, Path]]:
    """An empty 256 MiB export and a 256 MiB random source image."""
    volume = tmp_path / "vol.img"
    with open(volume, "wb") as f:
        f.truncate(256 * MiB)
    src = random_file(tmp_path / "src.img", 256 * MiB)
    server = start_havend(volume, name="vol")
    yield server, src
    assert server.stop() == 0


def test_qemu_img_convert_to_and_from_nbd_is_identical(big: tuple[Havend, Path]) -> None:
    server, src = big
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.uri)
    result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri)
    assert "Images are identical" in result.stdout
    back = src.with_name("back.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", server.uri, str(back))
    assert "identical" in run("qemu-img", "compare", str(back), str(src)).stdout


def test_nbdcopy_multi_conn_both_ways(big: tuple[Havend, Path]) -> None:
    server, src = big
    run("nbdcopy", "--connections=4", "--flush", str(src), server.uri)
    assert server.path.read_bytes() == src.read_bytes()
    out = src.with_name("out.img")
    run("nbdcopy", "--connections=4", server.uri, str(out))
    assert out.read_bytes() == src.read_bytes()


def test_qemu_io_patterns_zeroes_discard_and_fua(havend: Havend) -> None:
    commands = [
        "write -P 0xab 0 64k",
        "write -P 0xcd -f 64k 64k",  # -f: FUA
        "flush",
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 64k",
        "write -z 128k 64k",
        "read -P 0 128k 64k",
        "discard 192k 64k",
        "read -P 0 192k 64k",
        "aio_write -P 0x11 1M 4k",
        "aio_write -P 0x22 2M 4k",
        "aio_flush",
        "read -P 0x11 1M 4k",
        "read -P 0x22 2M 4k",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    result = run(*args, havend.uri)
    assert "Pattern verification failed" not in result.stdout + result.stderr
    assert havend.path.read_bytes()[: 64 * 1024] == b"\xab" * 64 * 1024


def test_qemu_sees_a_read_only_export_as_read_only(havend_ro: Havend, tmp_path: Path) -> None:
    before = havend_ro.path.read_bytes()
    result = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", havend_ro.uri, check=False)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    src = random_file(tmp_path / "src.img", MiB)
    result = run("qemu-img", "convert", "-n", "-O", "raw", str(src), havend_ro.uri, check=False)
    assert result.returncode != 0
    run("qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", havend_ro.uri)
    assert havend_ro.path.read_bytes() == before


def test_nbdinfo_list_and_json(volume: Path) -> None:
    server = start_havend(volume, "--description", "tier-1 database", name="db0")
    try:
        listing = run("nbdinfo", "--list", server.uri.rsplit("/", 1)[0]).stdout
        assert 'export="db0"' in listing and "tier-1 database" in listing
        info = json.loads(run("nbdinfo", "--json", server.uri).stdout)
        [export] = info["exports"]
        assert export["export-size"] == volume.stat().st_size
        assert export["can_multi_conn"] and export["can_fua"] and export["can_trim"]
        assert export["can_zero"] and export["can_flush"] and not export["is_read_only"]
        assert export["block_size_minimum"] == 1
        assert export["block_size_preferred"] == 4096
        assert export["block_size_maximum"] == 32 * MiB
    finally:
        assert server.stop() == 0


NBDSH_SCRIPT = """
import errno, nbd
assert h.can_multi_conn() and h.can_fua() and h.can_zero() and h.can_trim()
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
size = h.get_size()
h.pwrite(b"nbdsh!" * 1000, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(6000, 4096) == b"nbdsh!" * 1000
h.zero(8192, 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 65536) == bytes(8192)
h.set_strict_mode(0)  # let bad requests reach the server: it must answer them
try:
    h.pread(10, size - 5)
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
else:
    raise AssertionError("read past the end succeeded")
try:
    h.pwrite(b"x" * 10, size - 5)
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
else:
    raise AssertionError("write past the end succeeded")
h.flush()
print("NBDSH-OK")
"""


def nbdsh(uri: str, script: str) -> subprocess.CompletedProcess[str]:
    # nbdsh runs `python3 -m nbd`, and Debian builds that module for
    # /usr/bin/python3 only: a venv's or pyenv's python3 first in PATH lacks it.
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    return run("nbdsh", "-u", uri, "-c", script, env=env)


def test_nbdsh_script(havend: Havend) -> None:
    result = nbdsh(havend.uri, NBDSH_SCRIPT)
    assert "NBDSH-OK" in result.stdout
    data = havend.path.read_bytes()
    assert data[4096 : 4096 + 6000] == b"nbdsh!" * 1000


def test_nbdsh_read_only_refuses_with_eperm(havend_ro: Havend) -> None:
    script = (
        "import errno, nbd\n"
        "assert h.is_read_only()\n"
        "h.set_strict_mode(0)  # send the write: the server must refuse it\n"
        "try:\n    h.pwrite(b'x' * 512, 0)\n"
        "except nbd.Error as e:\n    print('ERRNO', e.errnum == errno.EPERM)\n"
    )
    result = nbdsh(havend_ro.uri, script)
    assert "ERRNO True" in result.stdout


def test_fio_nbd_engine_random_writes_verify(havend: Havend) -> None:
    result = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={havend.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",  # fio would leave a state file in the cwd
        "--output-format=json",
    )
    report = json.loads(result.stdout[result.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB
    assert job["read"]["io_bytes"] == 8 * MiB  # the verify pass read everything back
