"""A havend node: one process serving a node's role, many groups and volumes.

A *source* node opens each group's journal (replaying it into the local copies
after a crash), serves every member volume as an NBD export named after it,
commits journal records in groups and ships them to the target. A *target*
node listens for sources and keeps their replicas. Both write
``<state_dir>/status.json`` every ``status_period`` seconds and log a progress
line per group every ``status_interval`` seconds (lag in seconds and bytes,
throughput).

One concern a module, each a mixin over :class:`~havend.node.base.NodeBase`
(the shared state): ``lifecycle`` (start, stop: the :class:`Node`),
``groups`` (source groups, their settings, pairing), ``status`` (status,
progress, volumes, peers), ``exports`` (views, promoted volumes, snapshots),
``failover`` (checkpoints and the failover operations as carried out).

What it writes in the state directory itself: ``status.json`` (rewritten,
not synced), ``group-ids/<name>`` (a source group's UUID),
``scratch/<export>.cow`` (a writable view's writes, removed at close); the
groups' own files are written by ``havend.ship`` (source) and
``havend.target`` (target), the database by ``havend.state``.

Imports: the data plane (``ship``, ``target``, ``cdp``, ``journal``, ``nbd``)
and ``state``; never ``api``, ``admin`` or ``operations``, which are built
around the node by the composition root, ``havend.cli``.
"""

from havend.node.groups import open_source_group
from havend.node.lifecycle import Node

__all__ = ["Node", "open_source_group"]
