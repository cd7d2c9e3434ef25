"""Deleting a retained checkpoint on the target (``DELETE
/v1/groups/{group}/checkpoints/{checkpoint}``): by id prefix, no longer
listed nor exportable, the checkpoints before and after it read back as they
were, kept deleted across a restart; refused on the source, under an open
view, with a read token; 404 for one not retained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import MiB, Pair, app_group, make_token, start_pair, wait_caught_up

from havend.nbd.client import NBDClient

SIZE = 4 * MiB


def _api(node: Any, scope: str) -> httpx.Client:
    token = make_token(node, f"t-{scope}-{os.urandom(3).hex()}", scope)
    return httpx.Client(
        base_url=node.address("api"), headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _write(pair: Pair, offset: int, data: bytes) -> None:
    with NBDClient.open(f"{pair.source.address('nbd')}/db") as nbd:
        nbd.write(offset, data)
        nbd.flush()


def _view(tgt: httpx.Client, checkpoint: str) -> bytes:
    opened = tgt.post(
        "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": checkpoint}
    )
    assert opened.status_code == 201, opened.text
    try:
        with NBDClient.open(opened.json()["uri"]) as view:
            return view.read(0, view.size)
    finally:
        assert tgt.delete(f"/v1/exports/{opened.json()['export']}").status_code == 200


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = start_pair(tmp_path, [app_group(tmp_path, {"db": SIZE})], api=True, caught_up=60)
    try:
        yield made
    finally:
        made.stop()


def test_a_deleted_checkpoint_is_gone_and_the_others_read_as_they_were(pair: Pair) -> None:
    src, tgt, reader = _api(pair.source, "operate"), _api(pair.target, "operate"), None
    try:
        images, taken = [], []
        image = bytearray(SIZE)
        for i in range(3):
            data = os.urandom(256 * 1024)
            offset = i * 128 * 1024  # overlapping: each epoch saves some of the last's blocks
            _write(pair, offset, data)
            image[offset : offset + len(data)] = data
            made = src.post("/v1/groups/app/checkpoints", json={"label": f"c{i}"})
            assert made.status_code == 201, made.text
            taken.append(made.json()["id"])
            images.append(bytes(image))
        _write(pair, 0, os.urandom(SIZE // 2))
        wait_caught_up(pair.source, pair.target, timeout=60)
        listed = tgt.get("/v1/groups/app/checkpoints").json()
        assert [c["id"] for c in listed] == taken

        # Where it is refused, and why.
        on_source = src.delete(f"/v1/groups/app/checkpoints/{taken[1]}")
        assert on_source.status_code == 409, on_source.text
        assert "kept on the target node" in on_source.json()["detail"]
        reader = _api(pair.target, "read")
        assert reader.delete(f"/v1/groups/app/checkpoints/{taken[1]}").status_code == 403
        assert tgt.delete("/v1/groups/app/checkpoints/" + "f" * 32).status_code == 404
        assert tgt.delete(f"/v1/groups/nope/checkpoints/{taken[1]}").status_code == 404
        opened = tgt.post(
            "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": taken[1]}
        )
        assert opened.status_code == 201, opened.text
        pinned = tgt.delete(f"/v1/groups/app/checkpoints/{taken[1]}")
        assert pinned.status_code == 409 and "open views" in pinned.json()["detail"], pinned.text
        assert tgt.delete(f"/v1/exports/{opened.json()['export']}").status_code == 200

        # The middle one by an id prefix: the one before and the one after are exact.
        deleted = tgt.delete(f"/v1/groups/app/checkpoints/{taken[1][:8]}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["id"] == taken[1] and deleted.json()["label"] == "c1"
        listed = tgt.get("/v1/groups/app/checkpoints").json()
        assert [c["id"] for c in listed] == [taken[0], taken[2]]
        assert tgt.delete(f"/v1/groups/app/checkpoints/{taken[1]}").status_code == 404
        gone = tgt.post(
            "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": taken[1]}
        )
        assert gone.status_code == 404, gone.text
        assert _view(tgt, taken[0]) == images[0]
        assert _view(tgt, taken[2]) == images[2]
        audit = _api(pair.target, "admin").get("/v1/audit").json()
        assert ("checkpoint_delete", 200) in [(e["action"], e["status"]) for e in audit]

        # Replication goes on; a restart keeps it deleted.
        _write(pair, SIZE // 2, os.urandom(MiB))
        wait_caught_up(pair.source, pair.target, timeout=60)
        pair.target.stop()
        pair.target.start()
        wait_caught_up(pair.source, pair.target, timeout=60)
        tgt.close()
        tgt = _api(pair.target, "operate")
        listed = tgt.get("/v1/groups/app/checkpoints").json()
        assert [c["id"] for c in listed] == [taken[0], taken[2]]
        assert _view(tgt, taken[0]) == images[0]
        # The oldest by name, through the admin socket (the same operation).
        cli = [sys.executable, "-m", "havend", "checkpoint", "delete", "--group", "app"]
        config = ["--config", str(pair.target.config_path)]
        done = subprocess.run(
            [*cli, "--checkpoint", "oldest", *config], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and json.loads(done.stdout)["id"] == taken[0], done.stderr
        refused = subprocess.run(
            [*cli, "--checkpoint", taken[0], *config], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "not retained" in refused.stderr + refused.stdout
        assert [c["id"] for c in tgt.get("/v1/groups/app/checkpoints").json()] == [taken[2]]
        assert _view(tgt, taken[2]) == images[2]
    finally:
        for client in (src, tgt, reader):
            if client is not None:
                client.close()
    for node in (pair.source, pair.target):
        assert "Traceback" not in node.log(), node.log()[-3000:]
