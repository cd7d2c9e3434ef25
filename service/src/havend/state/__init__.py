"""The node's control-plane state: API tokens, the audit log, operations, the
history of each group's failover states, and what the API made (groups,
the paired target, paused groups).

On disk, in the node's state directory: ``havend.db``, one SQLite database
in WAL mode (with its ``havend.db-wal`` and ``havend.db-shm``), mode 0600
(token hashes and the audit trail). Its schema and migrations are in
``havend.state.store``. Replication state (journals, replicas, fences) is
not here: the data-plane packages keep it next to the data it describes.
"""

from havend.state.store import DB_NAME, SCOPES, StateStore, Token, open_store

__all__ = ["DB_NAME", "SCOPES", "StateStore", "Token", "open_store"]
