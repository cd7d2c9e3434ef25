"""Continuous data protection: checkpoints, the target's undo log, point-in-time views.

A checkpoint is a marker record in a group's journal: the group's volumes as
they were after every write with a smaller seq. The target keeps, for each
retained checkpoint, the old contents of the blocks first overwritten after
it (the undo log), so the replica stays at the latest point and any retained
checkpoint can be read back (a view) or made the latest again (a rollback).
See docs/cdp.md.
"""

from havend.cdp.checkpoint import Checkpoint
from havend.cdp.undo import UndoLog

__all__ = ["Checkpoint", "UndoLog"]
