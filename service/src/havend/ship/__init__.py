"""The source side of replication: capture writes into the group journal,
commit them in groups, and ship them to the target in the frames of
``havend.link.wire``.

Modules: ``source`` (the group: journal, acknowledgements, releases,
durability, status), ``capture`` (the volumes the NBD server serves, every
change journaled), ``overflow`` (region tracking while the journal is full),
``fence`` (fencing, failover, split brain on this side), ``records`` (the
fence as a typed record: ``Fence`` and its parts), ``reverse`` (reverse
protection's staging), ``shipper`` (the steady shipping session and its
reconnects), ``resync`` (the hash-compare engine, push and pull),
``failback`` and ``splitbrain`` (the sessions of their own), ``members``
(volumes added and removed live), ``loop`` (the
shipper's own event loop and thread).

On disk, under ``<state_dir>/groups/<group uuid>/`` (every small file
replaced atomically: write, fdatasync, rename, directory fsync):

``journal/``
    The group's journal (see ``havend.journal``).
``members.json``
    The group's volume slots (``havend.members.Slot``, in slot order): a
    volume added live is ``syncing`` until its copy is journaled whole.
``last_checkpoint.json``
    The last checkpoint taken here (its id, seq, time, label), shown after
    a restart too.
``volumes_synced``
    The last seq known to be on stable storage in the volumes themselves:
    replay at start begins after it.
``overflowed``
    Present from a journal overflow until its resync is done (the region map
    is in memory only: a restart meanwhile compares every block).
``running``
    The boot id while havend runs, removed at a clean stop: another boot id
    at start means the machine went down under havend (every block compared).
``fence.json``
    Why writes are refused (a failover in progress or done, a split brain),
    with the target's promotion record and what never reached it; absent
    while writes are accepted. ``Fence.to_dict()`` (``ship.records``): a
    planned failover's ``reason``, ``pid``, ``stage`` and ``final_seq``; a
    promoted target's ``reason``, ``promoted``, ``lost``, and ``reverse``,
    ``split_brain`` or ``split_brain_resolved`` when there are any.
``reclaimed.json``
    Production resumed here while failed over (the recovery side was lost).
``reverse.staging``
    A reverse round's blocks (``havend.staging`` format), while it is pulled.
``reverse.staged``
    Present once a round is staged whole (its record, JSON): applied at start
    if a crash came first.
``failback-<generation>/``
    An undo log with one checkpoint (``havend.cdp.undo``): what only this side
    held in the ranges a failback or a first reverse round replaced.
"""

from havend.ship.records import Fence
from havend.ship.shipper import FailoverRefused, Shipper, ShipperSettings
from havend.ship.source import SourceGroup, group_dir

__all__ = ["FailoverRefused", "Fence", "Shipper", "ShipperSettings", "SourceGroup", "group_dir"]
