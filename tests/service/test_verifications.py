"""The proof that a checkpoint recovered the application, recorded on the
target node (``POST /v1/groups/{group}/verifications``, posted by a drill):
the group's last verified recoverable checkpoint and its age in the status
and as a metric, audited, kept across a restart; refused where it makes no
sense, with the reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from nodes import MiB, app_group, make_token, start_pair, wait_caught_up
from waiting import wait_until

from havend.nbd.client import NBDClient


def _api(node: Any, scope: str) -> httpx.Client:
    token = make_token(node, f"t-{scope}-{os.urandom(3).hex()}", scope)
    return httpx.Client(
        base_url=node.address("api"), headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def test_a_drill_result_makes_the_last_verified_checkpoint(tmp_path: Path) -> None:
    pair = start_pair(tmp_path, [app_group(tmp_path, {"db": 2 * MiB})], api=True, caught_up=60)
    try:
        src, tgt, reader = (
            _api(pair.source, "operate"),
            _api(pair.target, "operate"),
            _api(pair.target, "read"),
        )
        taken = []
        for label in ("before", "after"):
            with NBDClient.open(f"{pair.source.address('nbd')}/db") as nbd:
                nbd.write(0, os.urandom(4096))
                nbd.flush()
            made = src.post("/v1/groups/app/checkpoints", json={"label": label})
            assert made.status_code == 201, made.text
            taken.append(made.json())
            time.sleep(0.05)  # two checkpoint times apart
        wait_caught_up(pair.source, pair.target, timeout=60)
        wait_until(
            lambda: len(tgt.get("/v1/groups/app/checkpoints").json()) == 2,
            30,
            "the target to retain both checkpoints",
        )
        assert tgt.get("/v1/groups/app").json()["last_verified"] is None

        # A failed drill of the newer one proves nothing; a passed one of the older does.
        failed = tgt.post(
            "/v1/groups/app/verifications",
            json={"checkpoint": taken[1]["id"], "passed": False, "plan": "shop"},
        )
        assert failed.status_code == 201, failed.text
        assert failed.json()["passed"] is False
        assert tgt.get("/v1/groups/app").json()["last_verified"] is None
        passed = tgt.post(
            "/v1/groups/app/verifications",
            json={
                "checkpoint": taken[0]["id"][:8],
                "passed": True,
                "plan": "shop",
                "rto_seconds": 42.5,
                "report": {"servers": ["db1", "app1"], "checks": 2},
            },
        )
        assert passed.status_code == 201, passed.text
        body = passed.json()
        assert body["checkpoint"]["id"] == taken[0]["id"] and body["rto_seconds"] == 42.5
        assert body["report"] == {"servers": ["db1", "app1"], "checks": 2}
        status = reader.get("/v1/groups/app").json()["last_verified"]
        assert status["checkpoint"]["id"] == taken[0]["id"] and status["plan"] == "shop"
        assert status["age_seconds"] >= 0
        metrics = reader.get("/metrics").text
        assert 'havend_group_last_verified_age_seconds{group="app"}' in metrics
        # The newer checkpoint passing moves it on.
        assert (
            tgt.post(
                "/v1/groups/app/verifications",
                json={"checkpoint": "latest", "passed": True, "plan": "shop"},
            ).status_code
            == 201
        )
        newest = reader.get("/v1/groups/app").json()["last_verified"]
        assert newest["checkpoint"]["id"] == taken[1]["id"]
        listed = reader.get("/v1/groups/app/verifications").json()
        assert [v["passed"] for v in listed] == [True, True, False]

        # Refusals, each with its reason.
        unknown = tgt.post(
            "/v1/groups/app/verifications", json={"checkpoint": "f" * 32, "passed": True}
        )
        assert unknown.status_code == 404 and "not retained" in unknown.json()["detail"]
        assert (
            tgt.post(
                "/v1/groups/nope/verifications", json={"checkpoint": "latest", "passed": True}
            ).status_code
            == 404
        )
        on_source = src.post(
            "/v1/groups/app/verifications", json={"checkpoint": "latest", "passed": True}
        )
        assert on_source.status_code == 409 and "target node" in on_source.json()["detail"]
        assert src.get("/v1/groups/app/verifications").status_code == 409
        missing = tgt.post("/v1/groups/app/verifications", json={"checkpoint": "latest"})
        assert missing.status_code == 422
        huge = tgt.post(
            "/v1/groups/app/verifications",
            json={"checkpoint": "latest", "passed": True, "report": {"x": "y" * (70 << 10)}},
        )
        assert huge.status_code == 422 and "64 KiB" in huge.text
        assert (
            reader.post(
                "/v1/groups/app/verifications", json={"checkpoint": "latest", "passed": True}
            ).status_code
            == 403
        )
        with _api(pair.target, "admin") as admin:
            audit = admin.get("/v1/audit").json()
        verify_entries = [e for e in audit if e["action"] == "verify"]
        assert len(verify_entries) >= 5 and {e["status"] for e in verify_entries} >= {201, 404}

        # Kept across a restart of the target.
        pair.target.stop()
        pair.target.start()
        with _api(pair.target, "read") as again:
            kept = again.get("/v1/groups/app").json()["last_verified"]
            assert kept["checkpoint"]["id"] == taken[1]["id"]
        for client in (src, tgt, reader):
            client.close()
    finally:
        pair.stop()
