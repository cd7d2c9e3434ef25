"""A source group's volumes added and removed while it replicates (see
``havend.members`` for the slots and the VOLUME records).

A volume added to a live group is captured at once (its writes journaled in
the group's one write order like the others'), and its contents are copied
to the target *through the journal*: :meth:`Membership.copy_some` reads a
piece under the group lock, so the piece and the journal agree on every
write before it, and appends it as an ordinary record (a ZERO record for a
piece of zeroes). The shipper, the target's apply, its CDP and the
checkpoints need nothing new for it; the other volumes keep replicating
meanwhile, and the copy waits while the journal is half full so that it
never overflows it. When a journal overflow interrupts the copy, the rest of
the volume becomes dirty regions and travels with the overflow's resync.

A removed volume is no longer captured; its slot stays (``removed``), and
its records already journaled still ship, before the ``removed`` marker.

Writes ``members.json`` in the group's state directory (its slots).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from typing import TYPE_CHECKING

from havend.errors import Conflict, Invalid
from havend.fsutil import write_atomic
from havend.journal import JournalFull, Kind
from havend.members import PROTECTED, REMOVED, SYNCING, Slot, VolumeEvent, dump_slots, load_slots
from havend.ship.capture import ReplicatedVolume
from havend.volume import DiscardVolume, FileVolume

if TYPE_CHECKING:
    from havend.ship.source import SourceGroup

log = logging.getLogger("havend.source")

# The copy of an added volume pauses while the journal is fuller than this,
COPY_JOURNAL_FILL = 0.5
# or while this many bytes are not acknowledged by the target: the other
# volumes' writes, in the same journal, wait behind no more than this.
COPY_WINDOW = 4 << 20
# A hole of the file (never written: SEEK_DATA) is copied as one ZERO record
# of up to this many bytes, read by neither side.
COPY_HOLE_MAX = 64 << 20
# members.json is rewritten at least every this many copied bytes (a crash
# copies again from there: harmless, the pieces are read afresh).
COPY_SAVE_BYTES = 64 << 20


def slots_path(state_dir: str) -> str:
    return os.path.join(state_dir, "members.json")


def read_slots(state_dir: str) -> list[Slot] | None:
    """The slots a group's state directory keeps (None: none kept yet, a
    group older than live volume changes: its volumes are its slots)."""
    try:
        with open(slots_path(state_dir)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        return load_slots(text)
    except Invalid as exc:
        raise Invalid(f"{slots_path(state_dir)}: {exc}") from None


def _hole_at(volume: FileVolume, offset: int, most: int) -> int:
    """Bytes of the hole of a regular file at ``offset`` (at most ``most``;
    0: data there, or a block device, or no way to tell). Lock held: no
    write can fill it meanwhile, and the page cache's data counts as data."""
    if volume.fd < 0 or volume.is_block_device or most <= 0:
        return 0
    try:
        data = os.lseek(volume.fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data after offset, all hole
            return 0
        data = offset + most
    return min(max(0, data - offset), most)


def open_slot_volume(slot: Slot) -> FileVolume:
    """A slot's local copy: its file (a removed volume's may be gone)."""
    if slot.state == REMOVED and not os.path.exists(slot.path):
        return DiscardVolume(slot.path, slot.size)
    return FileVolume(slot.path)


class Membership:
    """SourceGroup's part: its slots, volumes added and removed live."""

    def save_slots(self: SourceGroup) -> None:
        """Write ``members.json`` (any thread; the newest slots win)."""
        if self.state_dir:
            with self._slots_saving:
                write_atomic(slots_path(self.state_dir), dump_slots(list(self.slots)))

    def live_volumes(self: SourceGroup) -> list[ReplicatedVolume]:
        """The volumes captured now (not removed), in slot order."""
        return [m for m in self.volumes if not m.removed]

    def region_sizes(self: SourceGroup) -> list[int]:
        """Per slot, the bytes that region tracking and resyncs cover (a
        removed volume's: none)."""
        return [0 if m.removed else m.size for m in self.volumes]

    def slot(self: SourceGroup, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name and slot.state != REMOVED:
                return slot
        raise Invalid(f"group {self.name} has no volume {name!r}", field="volume")

    def refuse_volume_changes(self: SourceGroup) -> None:
        """Conflict while the group's volumes cannot change (fenced)."""
        if self.fence is not None:
            raise Conflict(
                f"group {self.name} is fenced ({self.fence.reason}): its volumes change "
                "once it protects again"
            )

    def _mark(self: SourceGroup, index: int, event: VolumeEvent) -> None:
        """Append a VOLUME record (lock held). A full journal loses it to the
        overflow's resync, and the next HELLO says the same."""
        if self.overflow is not None:
            return
        try:
            seq = self.journal.append(Kind.VOLUME, index, 0, event.payload(), owned=True)
            self._appended(seq, 0)
        except (JournalFull, OSError):
            self.enter_overflow()

    def add_volume(
        self: SourceGroup, name: str, volume: FileVolume, server: str | None = None
    ) -> ReplicatedVolume:
        """A new volume of the live group: captured from now on, copied by
        :meth:`copy_some` (the caller runs the copy)."""
        with self.lock:
            self.refuse_volume_changes()
            if any(s.name == name and s.state != REMOVED for s in self.slots):
                raise Conflict(f"group {self.name} has a volume {name!r} already")
            index = len(self.slots)
            slot = Slot(index, name, volume.path, volume.size, SYNCING, 0, server)
            member = ReplicatedVolume(self, index, name, volume)
            self.slots.append(slot)
            self.volumes.append(member)
            if self.overflow is not None:  # copied whole by the overflow's resync
                self.overflow.add_volume(volume.size)
                self.slots[index] = slot.but(copied=slot.size)
            self.save_slots()
            self._mark(index, VolumeEvent("added", name, volume.size, server=server))
        log.warning(
            "group %s: volume %s (%d bytes) added; its initial copy begins",
            self.name,
            name,
            volume.size,
        )
        return member

    def remove_volume(self: SourceGroup, name: str, purge: bool = False) -> Slot:
        """Stop replicating a volume (the caller stopped serving it first):
        its slot is kept, removed; the target keeps its replica unless
        ``purge``. The local file is the user's and stays."""
        with self.lock:
            self.refuse_volume_changes()
            slot = self.slot(name)
            if len([s for s in self.slots if s.state != REMOVED]) == 1:
                raise Conflict(
                    f"volume {name} is the last of group {self.name}: delete the group instead"
                )
            self.volumes[slot.index].removed = True
            removed = slot.but(state=REMOVED, purge=purge)
            self.slots[slot.index] = removed
            self.save_slots()
            self._mark(slot.index, VolumeEvent("removed", purge=purge))
        log.warning(
            "group %s: volume %s removed (its replica is %s)",
            self.name,
            name,
            "purged" if purge else "kept",
        )
        return removed

    def copying(self: SourceGroup) -> Slot | None:
        """The first volume whose initial copy is not finished."""
        return next((s for s in self.slots if s.state == SYNCING), None)

    def copy_may_go_on(self: SourceGroup) -> bool:
        """Whether the copy may append now: not fenced, the journal less than
        half full (the copy never overflows it), and little unacknowledged
        (the copy yields to the application's writes)."""
        journal = self.journal
        return (
            self.fence is None
            and journal.used_bytes < journal.capacity_bytes * COPY_JOURNAL_FILL
            and self._unacked_bytes < COPY_WINDOW
        )

    def copy_progress(self: SourceGroup, index: int) -> tuple[str, int]:
        """(state, bytes of it the target holds) of slot ``index``: an added
        volume is ``syncing`` until the target acknowledged its copy's end."""
        slot = self.slots[index]
        marks = self._copy_marks.get(index)
        if not marks:
            return slot.state, slot.size if slot.state == PROTECTED else 0
        while len(marks) > 1 and marks[1][0] <= self.acked_seq:
            marks.popleft()
        seq, copied = marks[0]
        if seq > self.acked_seq:
            return SYNCING, 0
        if slot.state == PROTECTED and len(marks) == 1:
            del self._copy_marks[index]  # the marker is acknowledged: done
            return PROTECTED, slot.size
        return SYNCING, copied

    def _copy_piece(self: SourceGroup, slot: Slot) -> int:
        """Journal the next piece of ``slot``'s copy (lock held): what the
        volume holds there now, as a WRITE (a ZERO for zeroes); its length
        (0: the journal filled up, regions are tracked from here)."""
        member = self.volumes[slot.index]
        hole = _hole_at(member.volume, slot.copied, min(COPY_HOLE_MAX, slot.size - slot.copied))
        length = hole or min(self.record_chunk, slot.size - slot.copied)
        data = b"" if hole else member.volume.read(slot.copied, length)
        try:
            if hole or data.count(0) == length:
                seq = self.journal.append(Kind.ZERO, slot.index, slot.copied, length=length)
                self._appended(seq, 0)
            else:
                seq = self.journal.append(Kind.WRITE, slot.index, slot.copied, data, owned=True)
                self._appended(seq, length)
        except (JournalFull, OSError):  # as a write would: regions from here
            self.enter_overflow()
            return 0
        copied = slot.copied + length
        self.slots[slot.index] = slot.but(copied=copied)
        marks = self._copy_marks.setdefault(slot.index, collections.deque())
        if not marks or copied - marks[-1][1] >= COPY_SAVE_BYTES // 8:
            marks.append((seq, copied))
        return length

    def copy_some(self: SourceGroup, budget: int) -> str:
        """Copy up to ``budget`` bytes of the first syncing volume into the
        journal (a worker thread; the lock is taken per piece). ``done``:
        no volume is copying any more; ``wait``: the copy cannot go on now
        (the journal half full, fenced, an overflow's resync to wait for);
        ``more``: call again."""
        done = 0
        while done < budget:
            save = False  # members.json is written after the lock is let go
            with self.lock:
                slot = self.copying()
                if slot is None:
                    return "done"
                if not self.copy_may_go_on():
                    return "wait"
                length = 0
                if slot.copied >= slot.size:
                    if self.overflow is not None:
                        return "wait"  # the marker follows the overflow's resync
                    self._mark(slot.index, VolumeEvent("synced"))
                    self._copy_marks.setdefault(slot.index, collections.deque()).append(
                        (self.journal.last_seq, slot.size)
                    )
                    self.slots[slot.index] = slot.but(state=PROTECTED)
                    save = True
                    log.warning("group %s: volume %s copied: protected", self.name, slot.name)
                elif self.overflow is not None:  # the rest goes with the overflow's resync
                    self.overflow.mark(slot.index, slot.copied, slot.size - slot.copied)
                    self.slots[slot.index] = slot.but(copied=slot.size)
                    save = True
                else:
                    length = self._copy_piece(slot)
                    copied = slot.copied + length
                    save = copied // COPY_SAVE_BYTES != slot.copied // COPY_SAVE_BYTES
            if save:
                self.save_slots()
            done += length
        return "more"
