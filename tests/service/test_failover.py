"""Failover at the block level, with real source and target processes and a
stamped-block writer through real NBD clients: a planned failover loses no
acknowledged write; an unplanned one reports exactly the writes it lost."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import wait_caught_up
from sites import EPERM, SIZES, VOLUMES, WAIT, MiB, Sites
from waiting import wait_until

from havend import admin
from havend.errors import NBDClientError
from havend.nbd.client import NBDClient
from havend.stamp import check_prefix


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_planned_failover_loses_no_acknowledged_write(sites: Sites) -> None:
    sites.write(300)  # acknowledged, most not even flushed
    result = sites.op(sites.source, "failover", group="app")
    # RPO 0, by the sequence numbers: the target applied the last acknowledged write.
    assert result["final_seq"] == result["last_acknowledged_seq"] == result["target_applied_seq"]
    assert result["lost_writes"] == 0
    # The source refuses writes now (its clients get EPERM), reads still work.
    with pytest.raises(NBDClientError) as refused:
        sites.clients[0].write(0, b"x" * 4096)
    assert refused.value.error == EPERM
    sites.clients[1].read(0, 4096)
    # The promoted replica holds every acknowledged write, and takes new ones.
    group = wait_until(
        lambda: sites.target.status()["groups"][0],
        10,
        "the target's group promoted",
        until=lambda group: group["promoted"],
    )
    assert group["promoted"]["planned"] and group["promoted"]["applied_seq"] == result["final_seq"]
    views = sites.target.address("views")
    images = sites.promoted_images(views)
    report = check_prefix(sites.log, images)
    assert report.ok and report.seq == sites.log.last_seq, report
    with NBDClient.open(f"{views}/app/db") as client:
        client.write(8192, b"recovery site" * 300)
        client.flush()
    wait_until(
        lambda: sites.target.status()["groups"][0]["changed_bytes"],
        10,
        "4096 changed bytes on the promoted target",
        until=lambda changed: changed >= 4096,
        interval=0.1,
    )
    # A restart keeps both sides where they are.
    sites.source.stop()
    sites.source.start()
    [fenced] = sites.source.status()["groups"]
    assert fenced["fence"]["promoted"]["generation"] == result["generation"]
    sites.target.stop()
    sites.target.start()
    with NBDClient.open(f"{sites.target.address('views')}/app/db") as client:
        assert client.read(8192, 13 * 300) == b"recovery site" * 300
    with pytest.raises(admin.AdminError, match="fenced already"):
        sites.op(sites.source, "failover", group="app")


def test_unplanned_failover_reports_exactly_the_writes_lost(sites: Sites) -> None:
    sites.write(200)
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    cut = time.time()
    sites.proxy.partition()  # the protected site is cut off...
    sites.write(77)  # ...while it goes on writing: these never reach the target
    promoted = sites.op(sites.target, "promote", group="app")
    assert not promoted["planned"] and promoted["exports"]
    # The target's view of the loss: after its last applied write, up to when it
    # last heard the source (before the cut: the 77 writes came after).
    window = promoted["loss_window"]
    assert window["from_seq"] == promoted["applied_seq"]
    assert window["from_time"] == promoted["applied_time"]
    assert window["last_heard"] is not None and window["last_heard"] <= cut + 0.5
    assert window["seconds"] == pytest.approx(window["last_heard"] - window["from_time"], abs=1e-5)
    images = sites.promoted_images(sites.target.address("views"))
    report = check_prefix(sites.log, images)
    assert report.ok, report
    on_target = report.seq
    assert report.min_seq <= 200 <= on_target
    missing = sites.log.last_seq - on_target
    assert missing >= 77
    # The old source comes back: the target refuses it, and it says what was lost.
    sites.proxy.heal()
    sites.wait_fenced(True)
    fence = sites.source.status()["groups"][0]["fence"]
    lost = fence["lost"]
    assert lost["records"] == missing and lost["bytes"] == missing * 4096, (lost, missing)
    assert lost["last_time"] >= lost["first_time"]
    assert fence["promoted"]["applied_seq"] == promoted["applied_seq"]
    assert f"{missing} writes ({missing * 4096} bytes" in sites.source.log()
    with pytest.raises(NBDClientError) as refused:
        sites.clients[0].write(0, b"x" * 4096)
    assert refused.value.error == EPERM


def test_promotion_at_a_checkpoint_and_refusals(sites: Sites) -> None:
    sites.write(50)
    cp = sites.op(sites.source, "checkpoint", group="app", label="before")
    at_checkpoint = sites.log.last_seq
    sites.write(50)
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    with pytest.raises(admin.AdminError, match="is not retained"):
        sites.op(sites.target, "promote", group="app", checkpoint="f" * 32)
    promoted = sites.op(sites.target, "promote", group="app", checkpoint=cp["id"])
    assert promoted["checkpoint"]["id"] == cp["id"] and promoted["rewritten_bytes"] > 0
    report = check_prefix(sites.log, sites.promoted_images(sites.target.address("views")))
    assert report.ok and report.min_seq <= at_checkpoint <= report.seq, report
    with pytest.raises(admin.AdminError, match="promoted already"):
        sites.op(sites.target, "promote", group="app")
    with pytest.raises(admin.AdminError, match="is promoted: its volumes are live"):
        sites.op(sites.target, "rollback", group="app", checkpoint=cp["id"])


@pytest.mark.parametrize("seed", range(6))
def test_target_killed_during_a_promotion_finishes_it_when_run_again(
    sites: Sites, seed: int
) -> None:
    """kill -9 of the target at a random moment of a promotion (at the latest
    point, or at a checkpoint, which rewrites the replica first): after the
    restart the group is either promoted or on hold (the old source refused);
    running the promotion again finishes it, at the same point, exact."""
    rng = random.Random(seed)
    sites.write(100)
    cp = sites.op(sites.source, "checkpoint", group="app")
    at_checkpoint = sites.log.last_seq
    sites.write(rng.randrange(50, 400))
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    everything = sites.log.last_seq
    use_checkpoint = seed % 2 == 1
    sites.proxy.partition()
    args = {"group": "app"} | ({"checkpoint": cp["id"]} if use_checkpoint else {})
    sites.kill_during(sites.target, sites.target, "promote", rng.uniform(0, 0.08), **args)
    [group] = sites.target.status()["groups"]
    if not group["promoted"]:  # killed before the promotion was recorded: run it again
        again = sites.op(sites.target, "promote", **args)
        assert (again["checkpoint"] or {}).get("id") == (cp["id"] if use_checkpoint else None)
    images = sites.promoted_images(sites.target.address("views"))
    report = check_prefix(sites.log, images)
    expected = at_checkpoint if use_checkpoint else everything
    assert report.ok and report.min_seq <= expected <= report.seq, (report, expected)


def test_failback_ships_only_the_changes_and_keeps_the_lost_writes(sites: Sites) -> None:
    """Unplanned failover with writes lost on the source, writes on the promoted
    side, then failback: only blocks changed on either side travel, both copies
    end byte-identical, the source's lost writes are kept in a snapshot, and
    replication resumes in the original direction without a full resync."""
    sites.write(300)
    promoted, expected = sites.failed_over_with_losses(lost=40, recovery=60, seed=9)
    with pytest.raises(admin.AdminError, match="is failed over"):
        sites.op(sites.source, "snapshots", group="app")
    before = sites.volume_images()  # with the 40 writes the target never got
    result = sites.op(sites.source, "failback", group="app")
    changed = result["changed_on_target_bytes"] + result["unshipped_here_bytes"]
    assert result["unshipped_here_bytes"] == 40 * 4096
    # 60 stamped writes, some to the same blocks: at most 60 blocks changed there.
    assert 0 < result["changed_on_target_bytes"] <= 60 * 4096
    assert result["pulled_bytes"] <= 1.1 * changed, result
    assert result["snapshot"]["bytes"] > 0
    assert sites.volume_images() == expected
    # Its progress was in the status (bytes done of the delta, ETA), as for a resync.
    progress = sites.op(sites.source, "status")["groups"][0]["resync"]
    assert progress["reason"] == "failback" and not progress["running"]
    assert progress["done_bytes"] == progress["total_bytes"] == result["compared_bytes"]
    assert progress["sent_bytes"] == result["pulled_bytes"]
    # The snapshot gives the replaced production back, read-only over NBD.
    [snapshot] = sites.op(sites.source, "snapshots", group="app")
    assert snapshot["name"] == f"failback-{promoted['generation']}"
    assert snapshot["checkpoint"]["label"] == "before failback"
    for i, name in enumerate(VOLUMES):
        view = sites.op(
            sites.source, "snapshot_open", group="app", volume=name, snapshot=snapshot["name"]
        )
        with NBDClient.open(view["uri"]) as client:
            assert client.read_only
            assert client.read(0, client.size) == before[i]
        sites.op(sites.source, "snapshot_close", export=view["export"])
    with pytest.raises(admin.AdminError, match="no snapshot 'nope'"):
        sites.op(sites.source, "snapshot_open", group="app", volume="db", snapshot="nope")
    sites.back_to_normal(seed=11, writes=30)
    [group] = sites.target.status()["groups"]
    assert not group["promoted"] and not group["hold"]
    assert group["generation"] != promoted["generation"]


@pytest.mark.parametrize(
    ("victim", "seed"), [(v, s) for v in ("source", "target") for s in (1, 2, 3, 4, 5)]
)
def test_failback_killed_at_random_moments_converges_when_run_again(
    sites: Sites, victim: str, seed: int
) -> None:
    """kill -9 of either side at a random moment of a failback (delta being
    pulled, switch back half done...): after restarting it, running the
    failback again ends with byte-identical copies, nothing lost, and
    replication in the original direction."""
    rng = random.Random(seed)
    sites.write(200)
    _, expected = sites.failed_over_with_losses(
        lost=rng.randrange(10, 60), recovery=rng.randrange(100, 400), seed=seed
    )
    node = sites.source if victim == "source" else sites.target
    sites.kill_during(node, sites.source, "failback", rng.uniform(0, 0.25), group="app")
    for attempt in range(5):  # the source may need a moment to see the target again
        try:
            sites.op(sites.source, "failback", group="app")
            break
        except admin.AdminError as exc:
            if "nothing to fail back" in str(exc):  # the first run had finished
                break
            assert attempt < 4, exc
            time.sleep(1)
    assert sites.volume_images() == expected
    sites.back_to_normal(seed=seed + 100, writes=20)


@pytest.mark.parametrize(
    ("victim", "seed"), [(v, s) for v in ("source", "target") for s in (1, 2, 3, 4, 5)]
)
def test_planned_failover_killed_at_random_moments_never_loses_a_write(
    sites: Sites, victim: str, seed: int
) -> None:
    """kill -9 of either side at a random moment of a planned failover (drain,
    final checkpoint, promotion): after the restart the group is either failed
    over with every acknowledged write on the target, or protecting again on
    the source (the interrupted failover called off); running it again then
    completes it with RPO 0."""
    rng = random.Random(seed)
    sites.write(rng.randrange(100, 600))
    node = sites.source if victim == "source" else sites.target
    sites.kill_during(node, sites.source, "failover", rng.uniform(0, 0.2), group="app")

    def source_group() -> dict:
        [src] = sites.source.status()["groups"]
        return src

    src = wait_until(  # settled: failed over (fence with the promotion) or protecting
        source_group,
        WAIT,
        "the source failed over or protecting again",
        until=lambda src: (
            (src["fence"] and src["fence"].get("promoted"))
            or (not src["fence"] and src["connected"])
        ),
        detail=lambda: sites.source.log()[-1500:],
        interval=0.1,
    )
    fence = src["fence"]
    if not fence:
        result = sites.op(sites.source, "failover", group="app")
        assert result["final_seq"] == result["target_applied_seq"] and not result["lost_writes"]
    images = sites.promoted_images(sites.target.address("views"))
    report = check_prefix(sites.log, images)
    assert report.ok and report.seq == sites.log.last_seq, report  # every acknowledged write


@pytest.mark.parametrize(
    ("before", "after", "how"),
    [(0, 25, ""), (30, 12, ""), (20, 7, "restart"), (5, 0, "overflow")],
)
def test_split_brain_is_detected_and_fences_both_sides(
    sites: Sites, before: int, after: int, how: str
) -> None:
    """The target promoted while the source kept taking writes (a partition):
    when the link comes back both sides refuse writes to the group, each
    reports what both wrote, and neither failback nor replication goes on."""
    sites.write(100)
    promoted = sites.split_brain(before, after, seed=5, how=how)
    fence = sites.source.status()["groups"][0]["fence"]
    split = fence["split_brain"]
    assert split["generation"] == promoted["generation"]
    here = split["production"]
    if how == "overflow":  # written while the journal was full: counted by region
        assert here["regions_bytes"] >= 4 * MiB
    else:  # exactly the writes made after the promotion, and all the unshipped ones
        assert here["records"] == after and here["bytes"] == after * 4096, here
        assert here["first_time"] >= promoted["time"] - 0.1
        assert fence["lost"]["records"] == before + after
    # What the promoted side wrote: 30 stamped writes since the promotion.
    [group] = sites.target.status()["groups"]
    assert group["split_brain"]["generation"] == promoted["generation"]
    recovery = group["split_brain"]["recovery"]
    assert 0 < recovery["changed_bytes"] <= 30 * 4096
    assert recovery["since"] == promoted["time"] <= recovery["last_write_time"]
    assert split["recovery"] == recovery
    assert group["split_brain"]["production"]["records"] == here["records"]
    # Both sides fenced: writes refused on either, nothing merged.
    with pytest.raises(NBDClientError) as refused:
        sites.clients[0].write(0, b"x" * 4096)
    assert refused.value.error == EPERM
    with NBDClient.open(f"{sites.target.address('views')}/app/db") as client:
        client.read(0, 4096)
        with pytest.raises(NBDClientError):
            client.write(0, b"y" * 4096)
    with pytest.raises(admin.AdminError, match="split brain: choose the surviving side"):
        sites.op(sites.source, "failback", group="app")
    assert "SPLIT BRAIN" in sites.source.log() and "SPLIT BRAIN" in sites.target.log()
    # It survives restarts of both.
    sites.target.stop()
    sites.target.start()
    sites.source.stop()
    sites.source.start()
    assert sites.source.status()["groups"][0]["fence"]["split_brain"]
    assert sites.target.status()["groups"][0]["split_brain"]


def test_split_brain_resolved_for_the_recovery_side(sites: Sites) -> None:
    """The operator keeps the promoted copy: it takes writes again, the source
    stays failed over, and a failback later brings that copy home (the
    source's own writes after the promotion kept in its snapshot)."""
    sites.write(100)
    promoted = sites.split_brain(10, 15, seed=6)
    with pytest.raises(admin.AdminError, match="survivor must be recovery or production"):
        sites.op(sites.source, "resolve", group="app", survivor="both")
    result = sites.op(sites.source, "resolve", group="app", survivor="recovery")
    assert result["survivor"] == "recovery" and result["generation"] == promoted["generation"]
    with pytest.raises(admin.AdminError, match="not in a split brain"):
        sites.op(sites.source, "resolve", group="app", survivor="recovery")
    [group] = sites.op(sites.target, "status")["groups"]
    assert group["split_brain"] is None and group["promoted"]
    fence = sites.op(sites.source, "status")["groups"][0]["fence"]
    assert fence["split_brain_resolved"]["survivor"] == "recovery"
    assert fence["promoted"]["generation"] == promoted["generation"]
    with pytest.raises(NBDClientError):  # still failed over here
        sites.clients[0].write(0, b"x" * 4096)
    views = sites.target.address("views")
    with NBDClient.open(f"{views}/app/log") as client:  # live again there
        client.write(4096, b"after the choice" * 256)
        client.flush()
    expected = sites.promoted_images(views)
    back = sites.op(sites.source, "failback", group="app")
    assert back["unshipped_here_bytes"] == 25 * 4096 and back["snapshot"]["bytes"] > 0
    assert sites.volume_images() == expected
    sites.back_to_normal(seed=12, writes=20)


def test_split_brain_resolved_for_the_production_side(sites: Sites) -> None:
    """The operator keeps the old source's copy: the target saves what it
    changed in a snapshot, becomes a replica again, and only the blocks either
    side changed are resynced; every write of the source is on the replica."""
    sites.write(100)
    promoted = sites.split_brain(10, 15, seed=7)
    recovery_side = sites.promoted_images(sites.target.address("views"))
    result = sites.op(sites.source, "resolve", group="app", survivor="production")
    assert result["survivor"] == "production" and result["snapshot"]["bytes"] > 0
    assert os.path.isdir(result["snapshot"]["directory"])
    assert sites.op(sites.source, "status")["groups"][0]["fence"] is None
    [group] = sites.op(sites.target, "status")["groups"]
    assert not group["promoted"] and group["split_brain"] is None
    assert group["generation"] not in (promoted["generation"], promoted["previous_generation"])
    with pytest.raises(NBDClientError):  # the promoted exports are gone
        NBDClient.open(f"{sites.target.address('views')}/app/db")
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    report = check_prefix(sites.log, sites.replica_images())
    assert report.ok and report.seq == sites.log.last_seq, report
    assert sites.replica_images() == sites.volume_images()
    # What the recovery side wrote is kept: a snapshot on the target, over NBD.
    [snapshot] = sites.op(sites.target, "snapshots", group="app")
    assert snapshot["kind"] == "split" and snapshot["bytes"] > 0
    view = sites.op(
        sites.target, "snapshot_open", group="app", volume="db", snapshot=snapshot["name"]
    )
    with NBDClient.open(view["uri"]) as client:
        assert client.read(0, client.size) == recovery_side[0]
    with pytest.raises(admin.AdminError, match="has open views"):
        sites.op(sites.target, "snapshot_delete", group="app", snapshot=snapshot["name"])
    sites.op(sites.target, "snapshot_close", export=view["export"])
    freed = sites.op(sites.target, "snapshot_delete", group="app", snapshot=snapshot["name"])
    assert freed["freed_bytes"] > 0
    assert sites.op(sites.target, "snapshots", group="app") == []
    resync = sites.op(sites.source, "status")["groups"][0]["resync"]
    assert resync["reason"] == "split brain resolved for production"
    assert resync["total_bytes"] < sum(SIZES) // 2  # the changed regions, not everything
    sites.back_to_normal(seed=13, writes=20)


@pytest.mark.parametrize(("victim", "seed"), [(v, s) for v in ("source", "target") for s in (1, 2)])
def test_split_brain_resolution_killed_at_random_moments_converges(
    sites: Sites, victim: str, seed: int
) -> None:
    """kill -9 of either side at a random moment of a resolution for the
    production side: running it again (or finding it done) ends with the
    replica equal to the source, holding every write the source made."""
    rng = random.Random(seed)
    sites.write(100)
    sites.split_brain(rng.randrange(0, 20), rng.randrange(5, 30), seed=seed)
    node = sites.source if victim == "source" else sites.target
    sites.kill_during(
        node, sites.source, "resolve", rng.uniform(0, 0.15), group="app", survivor="production"
    )
    for attempt in range(10):  # the source may need a moment to see the target again
        try:
            sites.op(sites.source, "resolve", group="app", survivor="production")
            break
        except admin.AdminError as exc:
            if "not in a split brain" in str(exc):  # the first run had finished
                break
            assert attempt < 9, exc
            time.sleep(1)
    sites.wait_fenced(False)
    sites.writer = sites._writer(seed=seed + 200)  # the source may be a new process
    sites.write(10)
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    report = check_prefix(sites.log, sites.replica_images())
    assert report.ok and report.seq == sites.log.last_seq, report
    assert sites.replica_images() == sites.volume_images()
