"""The operations layer: every state change a node takes from outside.

``table`` lists the operations (failover, failback, resolve, reverse,
reclaim, promote, rollback, pause, resume, checkpoint, exports, snapshots,
groups, pairing): which role runs each, from which failover states, which
arguments it needs, whether it holds its group while it runs. ``machine``
reads a group's failover state from the data plane's durable records.
``runner.Operations`` applies those guards for every caller: the REST API
(``havend.api``), the admin socket (``havend.admin``) and the CLI through
it. Nothing here is written to disk but the operations and state changes
recorded in the node's state store (``havend.state``).

Imports: the node (``havend.node``) and the state store; never the API.
"""

from havend.operations.runner import Operations
from havend.operations.table import FAILOVER_KINDS, OPERATIONS, OperationSpec

__all__ = ["FAILOVER_KINDS", "OPERATIONS", "OperationSpec", "Operations"]
