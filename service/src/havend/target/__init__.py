"""The target side: receive a group's records, make them durable, apply them in order.

A batch from the source is appended to the group's own journal on the target
(same seqs, same records) and acknowledged once that journal is synced: the
acknowledgement means "durable here", which is what ``sync`` mode waits for.
An applier then carries the records out on the replica volumes, strictly in
seq order, syncs the replicas and records the applied seq. After a crash the
records between the applied seq and the journal's end are applied again
(applying a record twice gives the same bytes), so a replica that is read is
always the source's state at some seq: a write-order prefix.

On disk, under ``<state_dir>/groups/<group uuid>/``: ``group.json`` (name,
volumes, replica paths), ``journal/`` (see ``havend.journal``) and ``applied``
(the applied seq, replaced atomically).
"""

from havend.target.server import TargetNode

__all__ = ["TargetNode"]
