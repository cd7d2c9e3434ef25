"""The target side: receive a group's records, make them durable, apply them in order.

A batch from the source is appended to the group's own journal on the target
(same seqs, same records) and acknowledged once that journal is synced: the
acknowledgement means "durable here", which is what ``sync`` mode waits for.
An applier then carries the records out on the replica volumes, strictly in
seq order, syncs the replicas and records the applied seq. After a crash the
records between the applied seq and the journal's end are applied again
(applying a record twice gives the same bytes), so a replica that is read is
always the source's state at some seq: a write-order prefix.

Modules: ``server`` (the listener: one link per group), ``group`` (receive,
apply, views and rollback, status), ``resync`` (resync states and staging,
the kept consistent point), ``promotion`` (failover, reverse protection,
split brain, failback), ``records`` (the promotion records of
``group.json`` as typed records), ``promoted`` (the writable volumes of a
promoted group), ``changes`` (what a promoted group changed), ``members``
(volumes added and removed by the source).

On disk, under ``<state_dir>/groups/<group uuid>/`` (small files replaced
atomically):

``group.json``
    Name, volumes (name, size, replica path; ``state``, ``synced_seq`` and
    ``purged`` for those added or removed live, see ``target.members``),
    generation, retention policy
    (``RetentionPolicy.to_dict()``), the source node's name, and the
    promotion records once there are any (``target.records``, each key's
    object its record's ``to_dict()``): ``promoting`` (a promotion under way),
    ``promoted`` (``link.promotion.Promoted``), ``hold`` (why the old
    source's records are refused), ``split_brain``, ``split_brain_resolved``
    and the ``history`` (promotions, split brains, resolutions, failbacks,
    rollbacks).
``journal/``
    The group's journal, same seqs as the source's (see ``havend.journal``);
    ``journal.new/`` and ``journal.old/`` only during its replacement.
``applied``
    The applied seq and that record's time (ns).
``sync.json``
    The resync state (``syncing``, ``staging``, ``applying``,
    ``catching_up``, ``consistent``) with ``until`` and ``resume``.
``staging.log``
    A staged resync's blocks (``havend.staging`` format), during one only.
``resync-base/``
    The last consistent point while a resync has the replica away from it
    (an undo log with one checkpoint, and ``base.json``: its seq and time).
``cdp/``
    The undo log of retained checkpoints (see ``havend.cdp``).
``changes/``
    What a promoted group wrote since its promotion (``changes.bitmap``,
    ``changes.active``).
``reverse/``
    Reverse protection's round checkpoints (an undo log).
``split-brain-<generation>/``
    What this side held where a split brain's resolution for the old source
    replaced it (an undo log with one checkpoint).

Beside them ``<state_dir>/groups/.<uuid>.new/`` (a creation cut short,
redone), and the replicas, ``<replica_dir>/<group>/<volume>.img``.
"""

from havend.target.server import TargetNode

__all__ = ["TargetNode"]
