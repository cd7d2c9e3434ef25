"""The durable records of a failover as typed records: the source's fence
(``fence.json``) and the target's promotion records (``group.json``). Each
reads back from the JSON havend has always written, writes the same bytes,
and a malformed one is a MalformedRecord naming its key."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import pytest

from havend.errors import HavendError, MalformedRecord
from havend.link.promotion import LossWindow, Promoted, RecoverySide
from havend.ship.records import Fence, ReverseRound, SourceSplitBrain
from havend.target.records import (
    Failback,
    HistoryEvent,
    PromotionMeta,
    Resolution,
    Rollback,
    TargetSplitBrain,
)

# As the target writes it in group.json and sends it in a REFUSED frame.
PROMOTED = {
    "time": 1700000000.25,
    "planned": False,
    "applied_seq": 41,
    "applied_time": 1699999999.5,
    "checkpoint": None,
    "previous_generation": "gen-0",
    "generation": "gen-1",
}
# The PROMOTED frame's body (a planned failover): the record and two figures.
PROMOTED_FRAME = PROMOTED | {
    "planned": True,
    "checkpoint": {"id": "c" * 32, "seq": 40, "time": 1.5, "label": "", "consistency": "crash"},
    "rewritten_bytes": 0,
    "seconds": 0.012,
}
LOST = {
    "records": 3,
    "bytes": 12288,
    "first_seq": 42,
    "last_seq": 44,
    "first_time": 1700000001.0,
    "last_time": 1700000002.0,
    "regions_bytes": 0,
}
NOTHING_LOST = LOST | {
    "records": 0,
    "bytes": 0,
    "first_seq": None,
    "last_seq": None,
    "first_time": None,
    "last_time": None,
}
RECOVERY = {
    "since": 1700000000.25,
    "last_write_time": 1700000003.0,
    "changed_bytes": 8192,
    "changed_blocks": 2,
    "ranges": 1,
}
SPLIT_HERE = {
    "detected": 1700000010.0,
    "generation": "gen-1",
    "since": 1700000000.3,
    "clock_offset_s": -0.05,
    "round_trip_s": 0.001,
    "production": LOST | {"blocks": 3},
    "recovery": None,
}
REVERSE = {
    "checkpoint": "r" * 32,
    "checkpoint_time": 1700000020.0,
    "incremental": True,
    "compared_bytes": 4096,
    "pulled_bytes": 4096,
    "wire_bytes": 130,
    "time": 1700000021.0,
    "seconds": 0.2,
    "rounds": 2,
}

# Every shape of fence.json the source writes, as it wrote them before the
# fence was a record (same keys, same order).
FENCES = {
    "draining": {"reason": "planned failover in progress", "pid": 4242, "stage": "draining"},
    "promoting": {
        "reason": "planned failover in progress",
        "pid": 4242,
        "stage": "promoting",
        "final_seq": 41,
    },
    "failed over": {
        "reason": "the target was promoted at seq 41 (generation gen-1): failed over",
        "promoted": PROMOTED_FRAME,
        "lost": NOTHING_LOST,
    },
    "reverse": {
        "reason": "the target was promoted at seq 41 (generation gen-1): failed over",
        "promoted": PROMOTED,
        "lost": LOST,
        "reverse": REVERSE,
    },
    "split brain": {"reason": "SPLIT BRAIN: ...", "promoted": PROMOTED, "lost": LOST}
    | {"split_brain": SPLIT_HERE},
    "split brain recorded": {"reason": "SPLIT BRAIN: ...", "promoted": PROMOTED, "lost": LOST}
    | {"split_brain": SPLIT_HERE | {"recovery": RECOVERY}},
    "resolved for recovery": {
        "reason": "failed over to generation gen-1 (a split brain resolved ...)",
        "promoted": PROMOTED,
        "lost": LOST,
        "split_brain_resolved": SPLIT_HERE | {"recovery": RECOVERY, "survivor": "recovery"},
        "reverse": REVERSE | {"rounds": 1},
    },
}


@pytest.mark.parametrize("shape", list(FENCES))
def test_a_fence_reads_back_from_its_json_and_writes_the_same_bytes(shape: str) -> None:
    body = FENCES[shape]
    fence = Fence.from_dict(json.loads(json.dumps(body)))
    assert json.dumps(fence.to_dict(), indent=1) == json.dumps(body, indent=1)
    assert Fence.from_dict(fence.to_dict()) == fence


def test_a_fence_is_typed_to_its_parts() -> None:
    fence = Fence.from_dict(FENCES["split brain recorded"])
    assert fence.promoted == Promoted.from_dict(PROMOTED)
    assert fence.generation == "gen-1" and fence.promoted.applied_seq == 41
    assert fence.lost == LossWindow(3, 12288, 42, 44, 1700000001.0, 1700000002.0, 0)
    split = fence.split_brain
    assert isinstance(split, SourceSplitBrain) and split.production.blocks == 3
    assert split.recovery == RecoverySide(1700000000.25, 1700000003.0, 8192, 2, 1)
    assert fence.pid is None and fence.stage is None and fence.reverse is None
    planned = Fence.from_dict(FENCES["promoting"])
    assert (planned.pid, planned.stage, planned.final_seq, planned.promoted) == (
        4242,
        "promoting",
        41,
        None,
    )
    reverse = Fence.from_dict(FENCES["reverse"]).reverse
    assert isinstance(reverse, ReverseRound) and reverse.rounds == 2 and reverse.incremental


def test_the_planned_failover_s_fence_steps_write_what_they_always_wrote() -> None:
    """What the node writes along a planned failover, from records."""
    draining = Fence("planned failover in progress", pid=4242, stage="draining")
    assert draining.to_dict() == FENCES["draining"]
    promoting = replace(draining, stage="promoting", final_seq=41)
    assert list(promoting.to_dict()) == list(FENCES["promoting"])
    assert promoting.to_dict() == FENCES["promoting"]


def test_a_promotion_record_keeps_the_promoted_frame_s_figures() -> None:
    promoted = Promoted.from_dict(PROMOTED_FRAME, record="PROMOTED")
    assert (promoted.rewritten_bytes, promoted.seconds) == (0, 0.012)
    assert promoted.to_dict() == PROMOTED_FRAME
    assert list(Promoted.from_dict(PROMOTED).to_dict()) == list(PROMOTED)


def test_a_reverse_round_as_staged_has_no_count() -> None:
    staged = {k: v for k, v in REVERSE.items() if k != "rounds"}
    round_ = ReverseRound.from_dict(staged)
    assert round_.rounds is None and round_.to_dict() == staged
    assert replace(round_, rounds=2).to_dict() == REVERSE


def test_numbers_are_kept_as_they_were_written() -> None:
    """An integer time stays an integer (the bytes written back are the same)."""
    body = PROMOTED | {"time": 1700000000, "applied_time": 0}
    assert json.dumps(Promoted.from_dict(body).to_dict()) == json.dumps(body)


def _without(body: dict, path: str) -> dict:
    broken = copy.deepcopy(body)
    *parts, last = path.split(".")
    inner = broken
    for part in parts:
        inner = inner[part]
    del inner[last]
    return broken


def _with(body: dict, path: str, value: object) -> dict:
    broken = copy.deepcopy(body)
    *parts, last = path.split(".")
    inner = broken
    for part in parts:
        inner = inner[part]
    inner[last] = value
    return broken


@pytest.mark.parametrize(
    ("shape", "key"),
    [
        ("draining", "reason"),
        ("failed over", "promoted.generation"),
        ("failed over", "promoted.applied_seq"),
        ("failed over", "lost.records"),
        ("split brain", "split_brain.production"),
        ("split brain recorded", "split_brain.recovery.changed_bytes"),
        ("reverse", "reverse.checkpoint"),
    ],
)
def test_a_fence_without_a_key_is_an_error_naming_it(shape: str, key: str) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"'{key}' is missing")) as caught:
        Fence.from_dict(_without(FENCES[shape], key), record="fence.json")
    assert caught.value.key == key and caught.value.record == "fence.json"
    assert isinstance(caught.value, HavendError)


@pytest.mark.parametrize(
    ("shape", "key", "value"),
    [
        ("draining", "pid", "4242"),
        ("draining", "reason", None),
        ("promoting", "final_seq", 41.0),
        ("failed over", "promoted", "gen-1"),
        ("failed over", "promoted.planned", 1),
        ("failed over", "promoted.applied_seq", True),
        ("failed over", "lost.first_seq", "42"),
        ("split brain", "split_brain.since", "then"),
        ("reverse", "reverse.incremental", "yes"),
    ],
)
def test_a_fence_with_a_key_of_the_wrong_type_is_an_error_naming_it(
    shape: str, key: str, value: object
) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"'{key}'")) as caught:
        Fence.from_dict(_with(FENCES[shape], key, value))
    assert caught.value.key == key


def test_a_fence_that_is_not_an_object_is_an_error() -> None:
    with pytest.raises(MalformedRecord, match=r"fence\.json is a list"):
        Fence.from_dict([], record="fence.json")


# The target's group.json ------------------------------------------------------

_BASE = {
    "group": "6f1c1f7e-3b1c-4b7e-9a55-2b1f3c4d5e6f",
    "name": "app",
    "volumes": [{"name": "a", "size": 1 << 20, "path": "/r/app/a.img"}],
    "generation": "gen-1",
    "retention": {"count": 0, "max_age_seconds": 0.0},
}
SPLIT_THERE = {
    "detected": 1700000010.5,
    "generation": "gen-1",
    "production": {"node": "src"} | LOST | {"blocks": 3},
    "recovery": RECOVERY,
}
RESOLVED_RECOVERY = {
    "time": 1700000030.0,
    "survivor": "recovery",
    "generation": "gen-1",
    "split_brain": SPLIT_THERE,
}
RESOLVED_PRODUCTION = {
    "time": 1700000030.0,
    "survivor": "production",
    "generation": "gen-1",
    "split_brain": SPLIT_THERE,
    "snapshot": {"directory": "/s/split-brain-gen-1", "checkpoint": {"id": "g"}},
    "replica_generation": "gen-2",
}
FAILBACK = {
    "time": 1700000040.0,
    "resume_seq": 50,
    "promoted": PROMOTED,
    "replica_generation": "g2",
}
ROLLBACK = {
    "rollback_to": {"id": "c" * 32, "seq": 7, "time": 1.0, "label": "", "consistency": "crash"},
    "previous_generation": "gen-0",
}
# Every shape of group.json's promotion records, as the target wrote them
# (keys in the order they came: the history before the hold of a second
# promotion, for one).
METAS = {
    "a replica": _BASE,
    "promoting": _BASE
    | {
        "promoting": {"checkpoint": None, "previous_generation": "gen-0", "planned": True},
        "hold": "a promotion of app was interrupted: run it again",
    },
    "promoted": _BASE
    | {
        "hold": "promoted at seq 41 (generation gen-1): ...",
        "promoted": PROMOTED,
        "history": [{"promoted": PROMOTED}],
    },
    "in a split brain": _BASE
    | {
        "hold": "promoted at seq 41 (generation gen-1): ...",
        "promoted": PROMOTED,
        "history": [{"promoted": PROMOTED}, {"split_brain": SPLIT_THERE}],
        "split_brain": SPLIT_THERE,
    },
    "resolved for recovery": _BASE
    | {
        "hold": "promoted at seq 41 (generation gen-1): ...",
        "promoted": PROMOTED,
        "history": [
            {"promoted": PROMOTED},
            {"split_brain": SPLIT_THERE},
            {"split_brain_resolved": RESOLVED_RECOVERY},
        ],
        "split_brain_resolved": RESOLVED_RECOVERY,
    },
    "after failbacks and a rollback": _BASE
    | {
        "history": [
            {"promoted": PROMOTED},
            {"failback": FAILBACK},
            ROLLBACK,
            {"split_brain_resolved": RESOLVED_PRODUCTION},
            {"something": "from another version"},
        ],
        "hold": "rolled back to checkpoint ...",
    },
}


@pytest.mark.parametrize("shape", list(METAS))
def test_group_json_s_promotion_records_read_back_and_write_the_same_bytes(shape: str) -> None:
    body = json.loads(json.dumps(METAS[shape]))
    records = PromotionMeta.from_meta(body)
    meta = copy.deepcopy(body)
    records.into_meta(meta)
    assert json.dumps(meta, indent=2) == json.dumps(METAS[shape], indent=2)


def test_group_json_s_records_are_typed() -> None:
    records = PromotionMeta.from_meta(METAS["after failbacks and a rollback"])
    assert records.promoted is None and records.promoting is None
    assert records.hold == "rolled back to checkpoint ..."
    kinds = [e.kind for e in records.history]
    assert kinds == ["promoted", "failback", "rollback_to", "split_brain_resolved", ""]
    failback = records.history[1].record
    assert isinstance(failback, Failback) and failback.promoted == Promoted.from_dict(PROMOTED)
    assert records.history[2].record == Rollback(ROLLBACK["rollback_to"], "gen-0")
    resolved = records.events("split_brain_resolved")[0]
    assert isinstance(resolved, Resolution) and resolved.replica_generation == "gen-2"
    assert isinstance(resolved.split_brain, TargetSplitBrain)
    assert resolved.split_brain.production.node == "src"
    assert records.history[4] == HistoryEvent("", None, {"something": "from another version"})
    split = PromotionMeta.from_meta(METAS["in a split brain"]).split_brain
    assert split is not None and split.recovery.changed_bytes == 8192


def test_a_promotion_in_group_json_goes_where_the_target_always_put_it() -> None:
    """The records change as a promotion goes on: each key is kept where it
    was, a new one goes last, and one without a record goes."""
    meta = copy.deepcopy(_BASE)
    records = PromotionMeta.from_meta(meta)
    promoting = PromotionMeta.from_meta(METAS["promoting"])
    records.promoting, records.hold = promoting.promoting, promoting.hold
    records.into_meta(meta)
    assert json.dumps(meta) == json.dumps(METAS["promoting"])
    records.promoting = None
    records.promoted = Promoted.from_dict(PROMOTED)
    records.hold = "promoted at seq 41 (generation gen-1): ..."
    records.record("promoted", records.promoted)
    records.into_meta(meta)
    assert json.dumps(meta) == json.dumps(METAS["promoted"])
    records.promoted, records.hold = None, ""
    records.into_meta(meta)
    assert json.dumps(meta) == json.dumps(_BASE | {"history": [{"promoted": PROMOTED}]})


@pytest.mark.parametrize(
    ("shape", "change", "key"),
    [
        ("promoted", {"promoted": PROMOTED | {"generation": None}}, "promoted.generation"),
        ("promoted", {"promoted": PROMOTED | {"time": "now"}}, "promoted.time"),
        ("promoting", {"promoting": {"checkpoint": None}}, "promoting.planned"),
        ("promoted", {"hold": 7}, "hold"),
        ("promoted", {"history": {"promoted": PROMOTED}}, "history"),
        ("promoted", {"history": [{"promoted": {"time": 1.0}}]}, "history[0].promoted.planned"),
        ("promoted", {"history": [{"failback": {"time": 1.0}}]}, "history[0].failback.resume_seq"),
        ("promoted", {"history": ["promoted"]}, "history[0]"),
        (
            "in a split brain",
            {"split_brain": SPLIT_THERE | {"production": LOST | {"records": "3"}}},
            "split_brain.production.records",
        ),
        (
            "resolved for recovery",
            {"split_brain_resolved": RESOLVED_RECOVERY | {"survivor": None}},
            "split_brain_resolved.survivor",
        ),
        ("a replica", {"history": [{"rollback_to": {}}]}, "history[0].previous_generation"),
    ],
)
def test_malformed_promotion_records_are_an_error_naming_the_key(
    shape: str, change: dict, key: str
) -> None:
    with pytest.raises(MalformedRecord, match=re.escape(f"group.json: '{key}'")) as caught:
        PromotionMeta.from_meta(METAS[shape] | change, record="group.json")
    assert caught.value.key == key
