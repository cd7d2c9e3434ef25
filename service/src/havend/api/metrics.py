"""Prometheus metrics of a node, read from its status at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from havend.node import Node
from havend.operations import machine


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        status = self.node.status()
        role = status["role"]
        gauges = {
            "lag_seconds": GaugeMetricFamily(
                "havend_group_lag_seconds",
                "Age of the oldest write not on the target",
                labels=["group"],
            ),
            "lag_bytes": GaugeMetricFamily(
                "havend_group_lag_bytes",
                "Bytes written here and not yet on the target",
                labels=["group"],
            ),
            "rpo_ok": GaugeMetricFamily(
                "havend_group_rpo_met",
                "1 while the lag is within the group's RPO",
                labels=["group"],
            ),
            "journal_used": GaugeMetricFamily(
                "havend_journal_used_bytes", "Journal space in use", labels=["group"]
            ),
            "journal_capacity": GaugeMetricFamily(
                "havend_journal_capacity_bytes", "Journal space in all", labels=["group"]
            ),
            "connected": GaugeMetricFamily(
                "havend_group_link_up", "1 while the replication link is up", labels=["group"]
            ),
            "checkpoints": GaugeMetricFamily(
                "havend_group_checkpoints", "Checkpoints retained on the target", labels=["group"]
            ),
            "undo_bytes": GaugeMetricFamily(
                "havend_group_undo_bytes",
                "Space used by the undo log (CDP history)",
                labels=["group"],
            ),
            "applied_seq": GaugeMetricFamily(
                "havend_group_applied_seq", "Last seq applied to the replica", labels=["group"]
            ),
            "throughput": GaugeMetricFamily(
                "havend_group_throughput_bytes_per_second",
                "Bytes shipped (source) or applied (target) per second, last 5 s",
                labels=["group"],
            ),
            "verified_age": GaugeMetricFamily(
                "havend_group_last_verified_age_seconds",
                "Age of the newest checkpoint a drill recovered the application from",
                labels=["group"],
            ),
            "errors": GaugeMetricFamily(
                "havend_group_errors",
                "1 while the group reports an error (link, apply)",
                labels=["group"],
            ),
        }
        shipped = CounterMetricFamily(
            "havend_group_shipped_bytes", "Bytes of writes shipped to the target", labels=["group"]
        )
        applied = CounterMetricFamily(
            "havend_group_applied_bytes", "Bytes applied to the replica", labels=["group"]
        )
        state = GaugeMetricFamily(
            "havend_group_state",
            "The group's failover state (1 for the current one)",
            labels=["group", "state"],
        )
        for group in status["groups"]:
            name = [group["name"]]
            current, _ = machine.state_of(role, group, None)
            for s in machine.STATES:
                state.add_metric([group["name"], s], 1.0 if s == current else 0.0)
            if role == "source":
                gauges["lag_seconds"].add_metric(name, group["lag_seconds"])
                gauges["lag_bytes"].add_metric(name, group["lag_bytes"])
                gauges["rpo_ok"].add_metric(name, 1.0 if group["rpo_ok"] else 0.0)
                gauges["journal_used"].add_metric(name, group["journal_used"])
                gauges["journal_capacity"].add_metric(name, group["journal_capacity"])
                gauges["errors"].add_metric(name, 1.0 if group["last_error"] else 0.0)
                shipped.add_metric(name, group["shipped_bytes"])
            else:
                cdp = group.get("cdp") or {}
                gauges["checkpoints"].add_metric(name, cdp.get("checkpoints", 0))
                gauges["undo_bytes"].add_metric(name, cdp.get("undo_bytes", 0))
                gauges["applied_seq"].add_metric(name, group["applied_seq"])
                gauges["errors"].add_metric(name, 1.0 if cdp.get("damaged") else 0.0)
                verified = group.get("last_verified")
                if verified is not None:
                    gauges["verified_age"].add_metric(name, verified["age_seconds"])
                applied.add_metric(name, group["applied_bytes"])
            gauges["connected"].add_metric(name, 1.0 if group["connected"] else 0.0)
            gauges["throughput"].add_metric(name, group.get("throughput_bytes_per_s", 0))
        yield from (g for g in gauges.values() if g.samples)
        yield from (m for m in (shipped, applied, state) if m.samples)


def render_metrics(node: Node) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return generate_latest(registry), CONTENT_TYPE_LATEST
