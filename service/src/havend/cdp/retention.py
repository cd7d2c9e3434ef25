"""How long the target keeps a group's checkpoints: the retention policy.

Set on the source (config file or API), sent to the target in every HELLO and
kept there in the group's ``group.json``; one record for all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from havend.errors import Invalid

DEFAULT_RETAIN = 2048  # checkpoints kept per group unless the policy says otherwise


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Keep at most ``count`` checkpoints (at least 1), none older than
    ``max_age_seconds`` (0: no age limit)."""

    count: int = DEFAULT_RETAIN
    max_age_seconds: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise Invalid(f"retention count must be an integer of at least 1, not {self.count!r}")
        age = self.max_age_seconds
        if (
            isinstance(age, bool)
            or not isinstance(age, (int, float))
            or not math.isfinite(age)
            or age < 0
        ):
            raise Invalid(f"retention max_age_seconds must be 0 or more, not {age!r}")

    def to_dict(self) -> dict[str, Any]:
        """As HELLO carries it and ``group.json`` keeps it."""
        return {"count": self.count, "max_age_seconds": float(self.max_age_seconds)}

    @classmethod
    def from_dict(cls, data: Any) -> RetentionPolicy:
        """From a HELLO or ``group.json`` (missing keys: the defaults); a value
        that is not a policy raises :class:`Invalid`."""
        if not isinstance(data, dict):
            raise Invalid(f"a retention policy is an object, not {type(data).__name__}")
        try:
            count = int(data.get("count", DEFAULT_RETAIN))
            age = float(data.get("max_age_seconds", 0))
        except (TypeError, ValueError) as exc:
            raise Invalid(f"malformed retention policy: {exc}") from None
        return cls(count, age)
