"""The REST API's request bodies and its error body, as pydantic models: every
bad body is a 422 naming the field, and the OpenAPI schema is made from them."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from havend.config import SERVER_NAME

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SERVER = SERVER_NAME.pattern


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointRequest(Strict):
    label: str = Field("", max_length=200)
    app: bool | None = Field(
        None, description="true: freeze/thaw hooks required; false: crash-consistent"
    )


class ExportRequest(Strict):
    group: str = Field(pattern=NAME)
    volume: str = Field(pattern=NAME)
    checkpoint: str = Field("latest", min_length=1, max_length=64)
    writable: bool = False


class OperationRequest(Strict):
    checkpoint: str | None = Field(None, min_length=1, max_length=64)
    survivor: Literal["recovery", "production"] | None = None
    timeout: float = Field(3600, gt=0, le=86400)


class VolumeSpec(Strict):
    name: str = Field(pattern=NAME)
    path: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]+$",
        description="inside the node's volume_dir (relative to it, or absolute within it)",
    )
    size: int | None = Field(
        None, gt=0, le=1 << 50, multiple_of=4096, description="create the file, sparse, if missing"
    )
    server: str | None = Field(
        None,
        pattern=SERVER,
        description="the protected server this volume is a disk of (a label, see /v1/servers)",
    )


class JournalSpec(Strict):
    segment_size: int = Field(64 << 20, ge=256 << 10, le=1 << 32, multiple_of=4096)
    max_segments: int = Field(16, ge=2, le=4096)
    cache_bytes: int = Field(64 << 20, ge=0, le=1 << 34)
    background_sync_bytes: int = Field(32 << 20, ge=0, le=1 << 34)


class CheckpointPolicySpec(Strict):
    interval_seconds: float = Field(0, ge=0, le=86400 * 365)
    retain: int = Field(2048, ge=1, le=1 << 20)
    max_age_seconds: float = Field(0, ge=0)


class GroupRequest(Strict):
    """A consistency group: one write order across its volumes. Freeze/thaw
    hooks run commands, so they are set in the node's config file only."""

    name: str = Field(pattern=NAME)
    mode: Literal["async", "sync"] = "async"
    rpo_seconds: float = Field(30, gt=0, le=86400)
    compression_level: int = Field(3, ge=0, le=22)
    bandwidth_limit: int = Field(0, ge=0, description="bytes/s on the wire, 0: unlimited")
    journal: JournalSpec = Field(default_factory=JournalSpec)
    checkpoints: CheckpointPolicySpec = Field(default_factory=CheckpointPolicySpec)
    reverse_interval_seconds: float = Field(0, ge=0, le=86400)
    volumes: list[VolumeSpec] = Field(min_length=1, max_length=64)


class CheckpointPolicyUpdate(Strict):
    interval_seconds: float | None = Field(None, ge=0, le=86400 * 365)
    retain: int | None = Field(None, ge=1, le=1 << 20)
    max_age_seconds: float | None = Field(None, ge=0)


class GroupUpdate(Strict):
    """Settings changed in place (the fields given; volumes and journal stay)."""

    mode: Literal["async", "sync"] | None = None
    rpo_seconds: float | None = Field(None, gt=0, le=86400)
    compression_level: int | None = Field(None, ge=0, le=22)
    bandwidth_limit: int | None = Field(None, ge=0)
    checkpoints: CheckpointPolicyUpdate | None = None
    reverse_interval_seconds: float | None = Field(None, ge=0, le=86400)


class PeerRequest(Strict):
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-\[\]]+$")
    port: int = Field(ge=1, le=65535)
    server_name: str | None = Field(
        None, min_length=1, max_length=253, description="the name its certificate must carry"
    )


class TokenRequest(Strict):
    name: str = Field(pattern=NAME)
    scope: Literal["read", "operate", "admin"]


class Problem(BaseModel):
    detail: Any


class VerificationRequest(Strict):
    """A drill's result for a retained checkpoint (haven.dr's drills post it)."""

    checkpoint: str = Field(
        min_length=1, max_length=64, description="id, unique prefix (6+), latest or oldest"
    )
    passed: bool = Field(description="the application recovered from it: every check passed")
    plan: str = Field("", max_length=200, description="the recovery plan the drill ran")
    rto_seconds: float | None = Field(
        None, ge=0, le=86400 * 7, allow_inf_nan=False, description="start to last check passed"
    )
    report: dict[str, Any] = Field(
        default_factory=dict, description="the drill's summary (kept as given, 64 KiB at most)"
    )

    @field_validator("report")
    @classmethod
    def _bounded(cls, report: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(report, default=str)) > 64 << 10:
            raise ValueError("the report is over 64 KiB of JSON: keep the summary here")
        return report
