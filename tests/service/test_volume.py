"""FileVolume: positional I/O, durability calls, hole punching and its fallbacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from havend.errors import VolumeError
from havend.volume import FileVolume

MiB = 1 << 20


@pytest.fixture
def vol(tmp_path: Path) -> FileVolume:
    path = tmp_path / "v.img"
    path.write_bytes(b"\x5a" * (4 * MiB))
    with FileVolume(path) as volume:
        yield volume


def test_size_read_write(vol: FileVolume) -> None:
    assert vol.size == 4 * MiB
    vol.write(10, b"hello")
    vol.write_fua(MiB, b"durable" * 100)
    vol.flush()
    assert vol.read(8, 9) == b"\x5a\x5ahello\x5a\x5a"
    assert vol.read(MiB, 700) == b"durable" * 100


def test_trim_and_write_zeroes_read_as_zeroes(vol: FileVolume) -> None:
    vol.trim(0, 65536)
    vol.write_zeroes(MiB, 65536, may_trim=True)
    vol.write_zeroes(2 * MiB + 100, 5000, may_trim=False)
    assert vol.read(0, 65536) == bytes(65536)
    assert vol.read(MiB, 65536) == bytes(65536)
    assert vol.read(2 * MiB + 99, 5002) == b"\x5a" + bytes(5000) + b"\x5a"
    assert os.path.getsize(vol.path) == 4 * MiB  # KEEP_SIZE


def test_punching_a_hole_frees_blocks(tmp_path: Path) -> None:
    path = tmp_path / "dense.img"
    path.write_bytes(os.urandom(8 * MiB))
    with FileVolume(path) as volume:
        before = os.stat(path).st_blocks
        volume.trim(0, 8 * MiB)
        volume.flush()
        assert os.stat(path).st_blocks < before


def test_zeroing_falls_back_to_writing_when_fallocate_cannot(
    vol: FileVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("havend.volume._fallocate", lambda *args: False)
    vol.write_zeroes(0, 3 * MiB + 7, may_trim=True)
    assert vol.read(0, 3 * MiB + 8) == bytes(3 * MiB + 7) + b"\x5a"
    vol.trim(3 * MiB + 8, 100)  # a no-op where unsupported, never an error
    assert vol.read(3 * MiB + 8, 100) == b"\x5a" * 100


def test_read_only_volume_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    with FileVolume(path, read_only=True) as volume, pytest.raises(OSError):
        volume.write(0, b"x")


def test_unusable_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="cannot open volume"):
        FileVolume(tmp_path / "missing.img")
    with pytest.raises(VolumeError, match="neither a regular file nor a block device"):
        FileVolume(tmp_path, read_only=True)
