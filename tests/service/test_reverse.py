"""Reverse protection: while failed over, the old source pulls the recovery
side's changes round after round, each round a consistent point of it, so a
second disaster (the recovery side lost too) loses one round at most."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import wait_caught_up
from sites import VOLUMES, WAIT, Sites
from waiting import wait_until

from havend import admin
from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog, check_prefix


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path)
    try:
        yield s
    finally:
        s.close()


class Recovery:
    """A stamped writer on the promoted side's exports (generation 2)."""

    def __init__(self, sites: Sites, seed: int) -> None:
        views = sites.target.address("views")
        self.clients = {i: NBDClient.open(f"{views}/app/{n}") for i, n in enumerate(VOLUMES)}
        self.initial = {i: c.read(0, c.size) for i, c in self.clients.items()}
        self.log = WriteLog()
        self.writer = StampWriter(
            self.clients, log=self.log, seed=seed, generation=2, flush_every=8
        )

    def write(self, count: int) -> None:
        for _ in range(count):
            self.writer.step()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def test_reverse_rounds_then_a_second_disaster(sites: Sites) -> None:
    """Rounds pull what the recovery side changed (the first one also saves
    this side's unshipped writes); a round taken while the recovery side
    keeps writing is one consistent point of it; when the recovery side is
    lost too, production resumes on the old source at the last round, and
    when it comes back the two copies are a split brain, resolved by choice."""
    sites.write(200)
    sites.failed_over_with_losses(lost=30, recovery=0, seed=3)
    with pytest.raises(admin.AdminError, match="no round of reverse protection"):
        sites.op(sites.source, "reclaim", group="app")
    recovery = Recovery(sites, seed=21)
    try:
        recovery.write(120)
        first = sites.op(sites.source, "reverse", group="app")
        assert not first["incremental"] and first["snapshot"]["bytes"] > 0
        assert sites.volume_images() == sites.promoted_images(sites.target.address("views"))
        # The next round: only the blocks written since, no comparing.
        recovery.write(40)
        second = sites.op(sites.source, "reverse", group="app")
        assert second["incremental"] and 0 < second["pulled_bytes"] <= 40 * 4096
        assert sites.volume_images() == sites.promoted_images(sites.target.address("views"))
        # A round while the recovery side writes: one write-order prefix of it.
        stop = threading.Event()

        def keep_writing() -> None:
            for _ in range(5000):
                if stop.is_set():
                    break
                recovery.writer.step()

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            time.sleep(0.2)
            third = sites.op(sites.source, "reverse", group="app")
        finally:
            stop.set()
            writer.join(60)
        assert third["incremental"]
        report = check_prefix(recovery.log, sites.volume_images(), initial=recovery.initial)
        assert report.ok, report
        at_round = report.seq
        assert 160 <= at_round <= recovery.log.last_seq
        fence = sites.op(sites.source, "status")["groups"][0]["fence"]
        assert fence["reverse"]["rounds"] == 3
        assert fence["reverse"]["checkpoint"] == third["checkpoint"]
    finally:
        recovery.close()
    # The recovery side is lost as well: production resumes here at the last round.
    sites.target.kill()
    reclaimed = sites.op(sites.source, "reclaim", group="app")
    assert reclaimed["reverse"]["checkpoint"] == third["checkpoint"]
    sites.writer = sites._writer(seed=40)
    sites.writer.generation = 3
    sites.write(25)  # accepted here again
    # The recovery side comes back: both took writes, nothing is merged silently.
    sites.target.start()
    wait_until(
        lambda: (sites.source.status()["groups"][0]["fence"] or {}).get("split_brain"),
        WAIT,
        "the source to see the split brain",
        detail=lambda: sites.source.log()[-2000:],
        interval=0.1,
    )
    split = sites.source.status()["groups"][0]["fence"]["split_brain"]
    assert split["production"]["records"] == 25
    sites.op(sites.source, "resolve", group="app", survivor="production")
    sites.wait_fenced(False)
    wait_caught_up(sites.source, sites.target, timeout=WAIT)
    assert sites.replica_images() == sites.volume_images()


def test_failback_after_reverse_rounds_pulls_only_the_last_changes(sites: Sites) -> None:
    sites.write(200)
    sites.failed_over_with_losses(lost=20, recovery=0, seed=4)
    recovery = Recovery(sites, seed=22)
    try:
        recovery.write(200)
        sites.op(sites.source, "reverse", group="app")
        recovery.write(10)
    finally:
        recovery.close()
    expected = sites.promoted_images(sites.target.address("views"))
    result = sites.op(sites.source, "failback", group="app")
    assert 0 < result["pulled_bytes"] <= 10 * 4096, result
    assert sites.volume_images() == expected
    sites.back_to_normal(seed=23, writes=20)
    [group] = sites.target.status()["groups"]
    assert not group["promoted"]


@pytest.mark.parametrize(("victim", "seed"), [(v, s) for v in ("source", "target") for s in (1, 2)])
def test_reverse_round_killed_at_random_moments(sites: Sites, victim: str, seed: int) -> None:
    """kill -9 of either side during a round: the old source's volumes are at
    the previous round or at this one, never in between; the next round
    brings them level."""
    rng = random.Random(seed)
    sites.write(100)
    sites.failed_over_with_losses(lost=rng.randrange(5, 30), recovery=0, seed=seed)
    recovery = Recovery(sites, seed=seed + 30)
    try:
        recovery.write(rng.randrange(100, 300))
        sites.op(sites.source, "reverse", group="app")
        recovery.write(rng.randrange(50, 200))
    finally:
        recovery.close()
    node = sites.source if victim == "source" else sites.target
    sites.kill_during(node, sites.source, "reverse", rng.uniform(0, 0.1), group="app")
    report = check_prefix(recovery.log, sites.volume_images(), initial=recovery.initial)
    assert report.ok, report
    for attempt in range(10):  # the source may need a moment to see the target again
        try:
            sites.op(sites.source, "reverse", group="app")
            break
        except admin.AdminError as exc:
            assert attempt < 9, exc
            time.sleep(1)
    assert sites.volume_images() == sites.promoted_images(sites.target.address("views"))


def test_reverse_rounds_run_by_themselves(tmp_path: Path) -> None:
    sites = Sites(tmp_path, reverse_interval_seconds=1)
    try:
        sites.write(100)
        sites.failed_over_with_losses(lost=5, recovery=50, seed=5)
        wait_until(
            lambda: ((sites.source.status()["groups"][0]["fence"] or {}).get("reverse") or {}).get(
                "rounds", 0
            ),
            WAIT,
            "two reverse rounds run by themselves",
            until=lambda rounds: rounds >= 2,
            detail=lambda: sites.source.log()[-2000:],
            interval=0.2,
        )
        assert sites.volume_images() == sites.promoted_images(sites.target.address("views"))
    finally:
        sites.close()
