"""Continuous data protection: checkpoints, the target's undo log, point-in-time views.

A checkpoint is a marker record in a group's journal: the group's volumes as
they were after every write with a smaller seq. The target keeps, for each
retained checkpoint, the old contents of the blocks first overwritten after
it (the undo log), so the replica stays at the latest point and any retained
checkpoint can be read back (a view) or made the latest again (a rollback).
See docs/cdp.md.

On disk, an undo log is a directory of ``undo-<16 hex digits>.log`` segments
and a ``state.json`` (see ``havend.cdp.undo_format`` for every byte;
``cdp.undo`` is the log, writing and recovery, ``cdp.undo_history`` its
reading back, retention and rollback): the target's
``groups/<uuid>/cdp/``, and the snapshots of ``cdp.snapshot`` (an undo log
with one checkpoint: a failback's ``failback-<generation>/`` on the source, a
split brain's ``split-brain-<generation>/`` on the target). The retention
policy (``cdp.retention``) is kept by the target in its ``group.json``.
Checkpoints themselves travel as journal records (``cdp.checkpoint``).
"""

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo import UndoLog

__all__ = ["Checkpoint", "UndoLog"]
