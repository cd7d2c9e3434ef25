"""Volumes added to and removed from a live group (``POST`` and ``DELETE
/v1/groups/{group}/volumes``): an added volume is copied to the target
through the group's journal while the other volumes keep replicating, and
its replica ends equal to the source; a removed one stops replicating, its
replica kept unless purged; a promotion while a copy runs is refused,
naming the volume; bad requests say what is wrong and change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nodes import MiB, Pair, app_group, make_token, start_pair, wait_caught_up
from waiting import wait_until

from havend.errors import Invalid, NBDClientError
from havend.link.hello import Hello
from havend.members import Slot, VolumeEvent, load_slots
from havend.nbd.client import NBDClient


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _api(node: Any, scope: str = "admin") -> httpx.Client:
    token = make_token(node, f"t-{scope}-{os.urandom(3).hex()}", scope)
    return httpx.Client(
        base_url=node.address("api"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def _volumes(api: httpx.Client, group: str = "app") -> dict[str, dict[str, Any]]:
    got = api.get("/v1/volumes", params={"group": group})
    assert got.status_code == 200, got.text
    return {v["name"]: v for v in got.json()}


def _replica(pair: Pair, name: str) -> Path:
    return pair.target.state_dir / "rep" / "app" / f"{name}.img"


def _api_pair(tmp: Path, *, bandwidth: int = 0, api: bool | str = "source") -> Pair:
    """A pair whose group ``app`` (volumes ``db``, 4 MiB, and ``log``, 1 MiB)
    is made through the source's API, caught up."""
    pair = start_pair(tmp, [], api=api)
    try:
        with _api(pair.source) as api_client:
            made = api_client.post(
                "/v1/groups",
                json={
                    "name": "app",
                    "bandwidth_limit": bandwidth,
                    "journal": {"segment_size": MiB, "max_segments": 64},
                    "volumes": [
                        {
                            "name": "db",
                            "path": "db.img",
                            "size": 4 * MiB,
                            "server": "db1",
                        },
                        {
                            "name": "log",
                            "path": "log.img",
                            "size": MiB,
                            "server": "db1",
                        },
                    ],
                },
            )
            assert made.status_code == 201, made.text
        wait_caught_up(pair.source, pair.target, timeout=60)
        return pair
    except BaseException:
        pair.stop()
        raise


def _wait_whole(pair: Pair, api: httpx.Client, name: str, source: Path, why: str) -> None:
    """Until volume ``name`` is protected and caught up; then its replica
    equals ``source``, and db's replica equals db."""
    wait_until(lambda: _volumes(api)[name]["state"] == "protected", 120, why)
    wait_caught_up(pair.source, pair.target, timeout=120)
    assert _digest(_replica(pair, name)) == _digest(source)
    assert _digest(_replica(pair, "db")) == _digest(pair.source.config_path.parent / "db.img")


def _write(pair: Pair, volume: str, offset: int, data: bytes) -> None:
    with NBDClient.open(f"{pair.source.address('nbd')}/{volume}") as nbd:
        nbd.write(offset, data)
        nbd.flush()


def test_a_volume_added_to_a_live_group_reaches_the_target_while_the_others_replicate(
    tmp_path: Path,
) -> None:
    # 2 MiB/s on the wire: the new volume's 24 MiB of incompressible data take
    # seconds to copy, long enough to see the other volumes replicate meanwhile.
    pair = _api_pair(tmp_path, bandwidth=2 * MiB)
    try:
        new = tmp_path / "data.img"
        new.write_bytes(os.urandom(24 * MiB))  # data before it joins: copied
        with _api(pair.source) as api:
            added = api.post(
                "/v1/groups/app/volumes",
                json={"name": "data", "path": "data.img", "server": "db1"},
            )
            assert added.status_code == 201, added.text
            body = added.json()
            assert body["name"] == "data" and body["index"] == 2 and body["server"] == "db1"
            assert body["state"] == "syncing" and body["sync"]["total_bytes"] == 24 * MiB
            # While it copies: a write to db reaches db's replica, and data is
            # still copying when it has.
            stamp = os.urandom(4096)
            _write(pair, "db", 8192, stamp)

            def db_replicated() -> bool:
                with open(_replica(pair, "db"), "rb") as f:
                    f.seek(8192)
                    return f.read(4096) == stamp

            wait_until(db_replicated, 60, "db's write to reach its replica during the copy")
            assert _volumes(api)["data"]["state"] == "syncing", "the copy ended first"
            status = api.get("/v1/groups/app").json()
            assert status["lag_bytes"] > 0  # the bytes not copied yet are lag
            # A write to the new volume during its copy, in the one write order.
            late = os.urandom(8192)
            _write(pair, "data", 5 * MiB, late)
            _wait_whole(pair, api, "data", new, "the added volume's copy to finish")
            assert _volumes(api)["data"]["sync"] is None
            assert [v["name"] for v in api.get("/v1/servers").json()[0]["volumes"]] == [
                "db",
                "log",
                "data",
            ]
        # Kept across a restart of both: the slot, the replica, protection.
        pair.source.stop()
        pair.target.stop()
        pair.target.start()
        pair.source.start()
        _write(pair, "data", 0, b"\x07" * 4096)
        wait_caught_up(pair.source, pair.target, timeout=60)
        assert _digest(_replica(pair, "data")) == _digest(new)
        assert "volumes differ" not in pair.source.log()
        meta = json.loads(next((pair.target.state_dir / "groups").glob("*/group.json")).read_text())
        assert [v["name"] for v in meta["volumes"]] == ["db", "log", "data"]
        assert "state" not in meta["volumes"][2] and meta["volumes"][2]["synced_seq"] > 0
    finally:
        pair.stop()


def test_a_removed_volume_stops_replicating_and_its_replica_is_kept_unless_purged(
    tmp_path: Path,
) -> None:
    pair = _api_pair(tmp_path)
    try:
        with _api(pair.source) as api:
            for name in ("a", "b"):
                made = api.post(
                    "/v1/groups/app/volumes",
                    json={"name": name, "path": f"{name}.img", "size": MiB},
                )
                assert made.status_code == 201, made.text
            _write(pair, "a", 0, b"\x01" * 4096)
            wait_until(
                lambda: {_volumes(api)[n]["state"] for n in ("a", "b")} == {"protected"},
                60,
                "the copies of a and b",
            )
            wait_caught_up(pair.source, pair.target, timeout=60)
            kept = _digest(_replica(pair, "a"))
            gone = api.delete("/v1/groups/app/volumes/a")
            assert gone.status_code == 200, gone.text
            assert gone.json() == {
                "group": "app",
                "volume": "a",
                "removed": True,
                "purged": False,
            }
            purged = api.delete("/v1/groups/app/volumes/b", params={"purge": "true"})
            assert purged.status_code == 200 and purged.json()["purged"] is True
            assert set(_volumes(api)) == {"db", "log"}
            with pytest.raises(NBDClientError):  # no export of that name any more
                NBDClient.open(f"{pair.source.address('nbd')}/a").close()
            _write(pair, "db", 0, b"\x02" * 4096)
            wait_caught_up(pair.source, pair.target, timeout=60)
            assert _replica(pair, "a").exists() and _digest(_replica(pair, "a")) == kept
            wait_until(lambda: not _replica(pair, "b").exists(), 30, "b's replica to be purged")
            assert _digest(_replica(pair, "db")) == _digest(tmp_path / "db.img")
            # The same name can come back: a new slot, a new replica file.
            again = api.post("/v1/groups/app/volumes", json={"name": "a", "path": "a.img"})
            assert again.status_code == 201 and again.json()["index"] == 4
            wait_until(lambda: _volumes(api)["a"]["state"] == "protected", 60, "a's new copy")
            wait_caught_up(pair.source, pair.target, timeout=60)
        meta = json.loads(next((pair.target.state_dir / "groups").glob("*/group.json")).read_text())
        states = [
            (v["name"], v.get("state", "protected"), v.get("purged", False))
            for v in meta["volumes"]
        ]
        assert states == [
            ("db", "protected", False),
            ("log", "protected", False),
            ("a", "removed", False),
            ("b", "removed", True),
            ("a", "protected", False),
        ]
        assert meta["volumes"][4]["path"].endswith("a.4.img")
        # The source keeps its slots across a restart.
        pair.source.stop()
        pair.source.start()
        slots = load_slots(
            next((pair.source.state_dir / "groups").glob("*/members.json")).read_text()
        )
        assert [(s.name, s.state) for s in slots] == [
            ("db", "protected"),
            ("log", "protected"),
            ("a", "removed"),
            ("b", "removed"),
            ("a", "protected"),
        ]
        _write(pair, "log", 0, b"\x03" * 4096)
        wait_caught_up(pair.source, pair.target, timeout=60)
    finally:
        pair.stop()


def test_bad_volume_changes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    pair = _api_pair(tmp_path)
    try:
        with _api(pair.source) as api:
            before = _volumes(api)
            taken = api.post(
                "/v1/groups/app/volumes",
                json={"name": "db", "path": "x.img", "size": MiB},
            )
            assert taken.status_code == 409 and "db" in taken.json()["detail"]
            outside = api.post("/v1/groups/app/volumes", json={"name": "x", "path": "/etc/passwd"})
            assert outside.status_code == 422 and "outside" in str(outside.json()["detail"])
            unsized = api.post("/v1/groups/app/volumes", json={"name": "x", "path": "none.img"})
            assert unsized.status_code == 422 and "size" in str(unsized.json()["detail"])
            assert not (tmp_path / "none.img").exists()
            bad_name = api.post("/v1/groups/app/volumes", json={"name": "a b", "path": "y.img"})
            assert bad_name.status_code == 422
            assert (
                api.post(
                    "/v1/groups/nope/volumes",
                    json={"name": "x", "path": "x.img", "size": MiB},
                ).status_code
                == 404
            )
            assert api.delete("/v1/groups/app/volumes/nope").status_code == 404
            assert api.delete("/v1/groups/nope/volumes/db").status_code == 404
            assert api.delete("/v1/groups/app/volumes/log").status_code == 200
            last = api.delete("/v1/groups/app/volumes/db")
            assert last.status_code == 409 and "delete the group" in last.json()["detail"]
            assert set(_volumes(api)) == set(before) - {"log"}
        with _api(pair.source, "operate") as weak:
            refused = weak.post(
                "/v1/groups/app/volumes",
                json={"name": "z", "path": "z.img", "size": MiB},
            )
            assert refused.status_code == 403
    finally:
        pair.stop()


def test_volumes_added_at_once_are_refused_as_busy_with_retry_after_then_added(
    tmp_path: Path,
) -> None:
    """Several servers of one group protected at the same time: an add that
    comes while another runs is refused before anything is done (409 with
    Retry-After, the answer haven.dr's client sends again after); asked
    again, every volume is added. (How many adds meet another one varies
    from run to run; test_operations checks the answer itself, by class.)"""
    pair = _api_pair(tmp_path)
    try:
        names = [f"v{i}" for i in range(6)]
        answers: dict[str, list[httpx.Response]] = {n: [] for n in names}

        def add(name: str) -> None:
            with _api(pair.source) as api:
                for _ in range(60):
                    got = api.post(
                        "/v1/groups/app/volumes",
                        json={"name": name, "path": f"{name}.img", "size": MiB},
                    )
                    answers[name].append(got)
                    if got.status_code != 409:
                        return
                    time.sleep(float(got.headers["Retry-After"]) / 10)

        threads = [threading.Thread(target=add, args=(n,)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        busy = [r for rs in answers.values() for r in rs if r.status_code == 409]
        for refused in busy:
            assert refused.headers.get("Retry-After") == "1", refused.headers
            assert "is running on app" in refused.json()["detail"], refused.text
        assert all(rs and rs[-1].status_code == 201 for rs in answers.values()), {
            n: [(r.status_code, r.text) for r in rs] for n, rs in answers.items()
        }
        with _api(pair.source) as api:
            assert set(names) <= set(_volumes(api))
            other = api.post(
                "/v1/groups/app/volumes", json={"name": "db", "path": "x.img", "size": MiB}
            )
            assert (
                other.status_code == 409 and "Retry-After" not in other.headers
            )  # not busy: taken
    finally:
        pair.stop()


def test_a_promotion_while_a_volume_copies_is_refused_naming_it(tmp_path: Path) -> None:
    pair = _api_pair(tmp_path, bandwidth=MiB, api=True)
    try:
        (tmp_path / "big.img").write_bytes(os.urandom(16 * MiB))
        with _api(pair.source) as api:
            assert (
                api.post(
                    "/v1/groups/app/volumes",
                    json={"name": "big", "path": "big.img", "server": "db1"},
                ).status_code
                == 201
            )
        with _api(pair.target) as target:
            wait_until(
                lambda: "big" in _volumes(target),
                30,
                "the target to make the added volume's replica",
            )
            assert _volumes(target)["big"]["state"] == "syncing"
            # The source's server labels reach the recovery site with the HELLO.
            assert _volumes(target)["db"]["server"] == "db1"
            assert _volumes(target)["big"]["server"] == "db1"  # with its "added" marker
            refused = target.post("/v1/groups/app/operations/promote", json={})
            assert refused.status_code in (202, 409), refused.text
            if refused.status_code == 202:  # a background operation: its outcome says it
                op = refused.json()["id"]
                wait_until(
                    lambda: target.get(f"/v1/operations/{op}").json()["state"] != "running",
                    60,
                    "the promotion to end",
                )
                outcome = target.get(f"/v1/operations/{op}").json()
                assert outcome["state"] == "failed", outcome
                reason = str(outcome["error"])
            else:
                reason = refused.json()["detail"]
            assert "big" in reason and "not complete" in reason
            assert target.get("/v1/groups/app").json()["promoted"] is None
    finally:
        pair.stop()


# The records themselves ---------------------------------------------------------


def test_volume_events_and_slots_round_trip_and_refuse_garbage() -> None:
    for event in (
        VolumeEvent("added", "db", 4096, server="db1"),
        VolumeEvent("synced"),
        VolumeEvent("removed", purge=True),
    ):
        assert VolumeEvent.from_payload(event.payload()) == event
    for bad in (
        b"{",
        b"[]",
        b'{"event": "exploded"}',
        b'{"event": "added", "name": "x"}',
    ):
        with pytest.raises(Invalid):
            VolumeEvent.from_payload(bad)
    slot = Slot(0, "db", "/v/db.img", 8192, "syncing", 4096, "db1")
    assert Slot.from_dict(slot.to_dict()) == slot
    assert load_slots(json.dumps([slot.to_dict()])) == [slot]
    with pytest.raises(Invalid, match="slot 0 says it is slot 3"):
        load_slots(json.dumps([slot.but(index=3).to_dict()]))
    with pytest.raises(Invalid, match="'size'"):
        Slot.from_dict({"index": 0, "name": "db", "path": "/x", "size": -1})
    with pytest.raises(Invalid, match="state"):
        Slot.from_dict(slot.to_dict() | {"state": "lost"})
    with pytest.raises(Invalid, match="twice"):
        load_slots(json.dumps([slot.to_dict(), slot.but(index=1).to_dict()]))


def test_a_hello_carries_the_slot_states() -> None:
    body = {
        "version": 1,
        "node": "s",
        "group": "5f0c0b46-8f57-4c5e-9c55-2a4a1b3c4d5e",
        "name": "app",
        "mode": "async",
        "volumes": [
            {"name": "db", "size": 4096},
            {"name": "new", "size": 8192, "state": "syncing"},
            {"name": "old", "size": 4096, "state": "removed", "purge": True},
        ],
    }
    hello = Hello.from_body(body)
    assert [(v.name, v.state, v.purge) for v in hello.volumes] == [
        ("db", "protected", False),
        ("new", "syncing", False),
        ("old", "removed", True),
    ]
    assert hello.to_body()["volumes"] == body["volumes"]
    body["volumes"][1]["state"] = "exploded"
    with pytest.raises(Exception, match="state 'exploded'"):
        Hello.from_body(body)


def test_a_journal_overflow_during_the_copy_sends_the_rest_with_its_resync(
    tmp_path: Path,
) -> None:
    """Shipping paused, the copy stops at its window; writes to db then
    overflow the 8 MiB journal: the rest of the new volume becomes dirty
    regions, and after the resume the resync brings it whole."""
    pair = start_pair(tmp_path, [], api="source")
    try:
        with _api(pair.source) as api:
            made = api.post(
                "/v1/groups",
                json={
                    "name": "app",
                    "journal": {"segment_size": MiB, "max_segments": 8},
                    "volumes": [{"name": "db", "path": "db.img", "size": 16 * MiB}],
                },
            )
            assert made.status_code == 201, made.text
            wait_caught_up(pair.source, pair.target, timeout=60)
            assert api.post("/v1/groups/app/pause").status_code == 200
            new = tmp_path / "data.img"
            new.write_bytes(os.urandom(12 * MiB))
            added = api.post("/v1/groups/app/volumes", json={"name": "data", "path": "data.img"})
            assert added.status_code == 201, added.text
            with NBDClient.open(f"{pair.source.address('nbd')}/db") as nbd:
                for i in range(12):
                    nbd.write(i * MiB, os.urandom(MiB))
                nbd.flush()
            wait_until(
                lambda: (
                    api.get("/v1/groups/app").json()["resync"] is not None
                    or "journal full" in pair.source.log()
                ),
                30,
                "the journal to overflow",
            )
            assert "journal full" in pair.source.log()
            assert api.post("/v1/groups/app/resume").status_code == 200
            _wait_whole(pair, api, "data", new, "the added volume after the resync")
    finally:
        pair.stop()


def test_a_config_file_group_takes_its_changed_volume_list_at_start(
    tmp_path: Path,
) -> None:
    """A config file's group whose volumes changed while havend was down:
    the new volume is added and copied, the dropped one removed (its replica
    kept)."""
    group = app_group(tmp_path, {"db": 2 * MiB, "log": MiB})
    pair = start_pair(tmp_path, [group], caught_up=60)
    try:
        pair.source.stop()
        extra = tmp_path / "extra.img"
        extra.write_bytes(os.urandom(3 * MiB))
        config = yaml.safe_load(pair.source.config_path.read_text())
        volumes = config["source"]["groups"][0]["volumes"]
        config["source"]["groups"][0]["volumes"] = [
            volumes[0],
            {"name": "extra", "path": str(extra)},
        ]
        pair.source.config_path.write_text(yaml.safe_dump(config))
        pair.source.start()
        wait_caught_up(pair.source, pair.target, timeout=60)
        slots = load_slots(
            next((pair.source.state_dir / "groups").glob("*/members.json")).read_text()
        )
        assert [(s.name, s.state) for s in slots] == [
            ("db", "protected"),
            ("log", "removed"),
            ("extra", "protected"),
        ]
        assert _digest(_replica(pair, "extra")) == _digest(extra)
        assert _replica(pair, "log").exists()
        meta = json.loads(next((pair.target.state_dir / "groups").glob("*/group.json")).read_text())
        assert [v.get("state", "protected") for v in meta["volumes"]] == [
            "protected",
            "removed",
            "protected",
        ]
    finally:
        pair.stop()


def test_the_last_checkpoint_is_known_after_a_restart(tmp_path: Path) -> None:
    """A play takes one checkpoint per label (haven.dr.checkpoint reads the
    group's last one): a restart of the source must not forget it."""
    pair = _api_pair(tmp_path)
    try:
        with _api(pair.source) as api:
            taken = api.post("/v1/groups/app/checkpoints", json={"label": "before-upgrade"})
            assert taken.status_code in (200, 201), taken.text
            before = api.get("/v1/groups/app").json()["last_checkpoint"]
            assert before["label"] == "before-upgrade"
        pair.source.stop()
        pair.source.start()
        with _api(pair.source) as api:
            assert api.get("/v1/groups/app").json()["last_checkpoint"] == before
    finally:
        pair.stop()


def test_a_sparse_volume_is_copied_by_its_holes_and_its_data(tmp_path: Path) -> None:
    """Holes go as ZERO records (SEEK_DATA), data as WRITEs: a file of holes
    with data here and there, some of it unaligned, ends equal on the target."""
    pair = _api_pair(tmp_path)
    try:
        new = tmp_path / "sparse.img"
        with open(new, "wb") as f:
            f.truncate(96 * MiB)
            for offset, size in (
                (0, 4096),
                (MiB + 512, 1000),
                (70 * MiB - 7, 3 * MiB),
                (96 * MiB - 4096, 4096),
            ):
                f.seek(offset)
                f.write(os.urandom(size))
        with _api(pair.source) as api:
            added = api.post(
                "/v1/groups/app/volumes", json={"name": "sparse", "path": "sparse.img"}
            )
            assert added.status_code == 201, added.text
            _wait_whole(pair, api, "sparse", new, "the sparse volume's copy")
    finally:
        pair.stop()
