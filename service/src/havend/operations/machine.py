"""The failover state machine of a group, as the API and the operations see it.

The states are read from the data plane, which keeps them durably (the
source's fence, the target's promotion and split-brain records), so the API
can never disagree with what the node does; the state store records every
change with its generation (``/v1/groups/{group}/history``).

``protecting``   replicating (target: a replica)
``testing``      target: point-in-time exports open (a drill), replication goes on
``failing_over`` source: fenced, draining for a planned failover; target: promoting
``failed_over``  source: fenced, the target promoted; target: promoted, live
``failing_back`` a failback (or a split-brain resolution) is moving the data
``paused``       source: shipping stopped by an operator (writes still journaled)
``error``        a split brain (both sides took writes), or the target's applier
                 failing (``apply_error``: it retries; the replica does not move)
"""

from __future__ import annotations

from typing import Any

STATES = ("protecting", "testing", "failing_over", "failed_over", "failing_back", "paused", "error")


def state_of(role: str, group: dict[str, Any], running: str | None) -> tuple[str, str]:
    """(state, why) of a group from its status and the operation running on it."""
    if role == "source":
        fence = group.get("fence") or {}
        if fence.get("split_brain"):
            return "error", "split brain: both sides took writes; resolve it"
        if running in ("failback", "resolve"):
            return "failing_back", f"{running} running"
        if fence.get("promoted"):
            return (
                "failed_over",
                f"the target was promoted (generation {fence['promoted'].get('generation')})",
            )
        if fence:
            return "failing_over", str(fence.get("reason", "fenced"))
        if running == "failover":
            return "failing_over", "planned failover running"
        if group.get("paused"):
            return "paused", "shipping stopped by an operator; writes are journaled"
        return "protecting", "replicating" if group.get("connected") else "link down"
    if group.get("split_brain"):
        return "error", "split brain: both sides took writes; resolve it on the source node"
    if running == "promote":
        return "failing_over", "promotion running"
    failing = group.get("apply_error")
    if failing:
        return "error", (
            f"applying records fails ({failing['error']}; {failing['attempts']} attempts); "
            "retrying, the replica does not move"
        )
    promoted = group.get("promoted")
    if promoted:
        return "failed_over", f"promoted (generation {promoted.get('generation')})"
    if (group.get("cdp") or {}).get("views_open"):
        return "testing", "point-in-time exports open"
    return "protecting", group.get("state", "replica")
