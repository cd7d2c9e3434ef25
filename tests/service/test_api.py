"""The node REST API: real source and target processes over TLS, driven
through HTTPS with bearer tokens: the lifecycle (checkpoint, point-in-time
export, planned failover, failback), state, audit, metrics and bad input."""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from nodes import app_group, free_port, make_token, start_pair, wait_caught_up
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from waiting import wait_until

from havend.nbd.client import NBDClient
from havend.stamp import StampWriter, WriteLog, check_prefix

MiB = 1 << 20
VOLUMES = ["db", "log"]
SIZES = [4 * MiB, 2 * MiB]
WAIT = 60


class Api:
    """A source and a target with the API on, and an HTTPS client per node."""

    def __init__(self, tmp: Path) -> None:
        group = app_group(tmp, dict(zip(VOLUMES, SIZES, strict=True)))
        self.pair = start_pair(tmp, [group], tls=True, api=True)
        assert self.pair.tls is not None
        self.target, self.source = self.pair.target, self.pair.source
        self.paths = [Path(v["path"]) for v in group["volumes"]]
        self.tls_ca = self.pair.tls[0]["ca"]
        self.tls = ssl.create_default_context(cafile=self.tls_ca)
        self.tokens = {
            node: {
                s: make_token(getattr(self, node), f"{s}-{node}", s)
                for s in ("read", "operate", "admin")
            }
            for node in ("source", "target")
        }
        wait_caught_up(self.source, self.target, timeout=WAIT)
        nbd = int(self.source.address("nbd").rsplit(":", 1)[1])
        self.clients = {i: NBDClient.tcp("127.0.0.1", nbd, n) for i, n in enumerate(VOLUMES)}
        self.log = WriteLog()
        self.writer = StampWriter(self.clients, log=self.log, seed=3, flush_every=16)

    def http(self, node: str, scope: str | None = "admin") -> httpx.Client:
        process = getattr(self, node)
        headers = {"Authorization": f"Bearer {self.tokens[node][scope]}"} if scope else {}
        return httpx.Client(
            base_url=process.address("api"), headers=headers, verify=self.tls, timeout=60
        )

    def write(self, count: int) -> None:
        for _ in range(count):
            self.writer.step()

    def wait_operation(self, node: str, op: dict[str, Any]) -> dict[str, Any]:
        def ended(got: dict[str, Any]) -> bool:
            if got["state"] != "running":
                return True
            assert "progress" in got
            return False

        with self.http(node, "read") as client:
            return wait_until(
                lambda: client.get(f"/v1/operations/{op['id']}").json(),
                WAIT,
                f"operation {op['id']} on the {node} to end",
                until=ended,
                interval=0.1,
            )

    def close(self) -> None:
        for client in self.clients.values():
            client.close(disconnect=False)
        self.pair.stop()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    try:
        yield a
    finally:
        a.close()


def test_the_lifecycle_through_the_api(api: Api) -> None:
    src, tgt = api.http("source"), api.http("target")
    node = src.get("/v1/node").json()
    assert node["role"] == "source" and node["health"] == "ok" and node["groups"] == 1
    assert api.source.address("api").startswith("https://")
    api.write(100)
    # A checkpoint on the source, retained on the target, exported and verified.
    cp = src.post("/v1/groups/app/checkpoints", json={"label": "api"})
    assert cp.status_code == 201, cp.text
    at_checkpoint = api.log.last_seq
    api.write(50)
    wait_caught_up(api.source, api.target, timeout=WAIT)
    listed = tgt.get("/v1/groups/app/checkpoints").json()
    assert cp.json()["id"] in [c["id"] for c in listed]
    exports, images = [], {}
    for i, volume in enumerate(VOLUMES):
        export = tgt.post(
            "/v1/exports",
            json={"group": "app", "volume": volume, "checkpoint": cp.json()["id"]},
        )
        assert export.status_code == 201, export.text
        exports.append(export.json()["export"])
        with NBDClient.open(export.json()["uri"]) as view:
            images[i] = view.read(0, view.size)
    assert tgt.get("/v1/groups/app").json()["state"] == "testing"
    report = check_prefix(api.log, images)
    assert report.ok and report.min_seq <= at_checkpoint <= report.seq, report
    for export in exports:
        assert tgt.delete(f"/v1/exports/{export}").status_code == 200
    assert tgt.get("/v1/groups/app").json()["state"] == "protecting"
    # Planned failover: an operation to poll; RPO 0 by the seqs.
    started = src.post("/v1/groups/app/operations/failover", json={"timeout": 60})
    assert started.status_code == 202, started.text
    done = api.wait_operation("source", started.json())
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["final_seq"] == result["last_acknowledged_seq"] == result["target_applied_seq"]
    assert src.get("/v1/groups/app").json()["state"] == "failed_over"
    assert tgt.get("/v1/groups/app").json()["state"] == "failed_over"
    # Illegal transitions: 409 with the reason.
    again = src.post("/v1/groups/app/operations/failover", json={})
    assert again.status_code == 409 and "failed_over" in again.json()["detail"]
    promote = tgt.post("/v1/groups/app/operations/promote", json={})
    assert promote.status_code == 409
    wrong_node = tgt.post("/v1/groups/app/operations/failback", json={})
    assert wrong_node.status_code == 409 and "source node" in wrong_node.json()["detail"]
    # Writes on the promoted side, then failback.
    views_uri = api.target.address("views")
    with NBDClient.open(f"{views_uri}/app/db") as client:
        client.write(0, b"recovery" * 512)
        client.flush()
    back = src.post("/v1/groups/app/operations/failback", json={})
    assert back.status_code == 202, back.text
    done = api.wait_operation("source", back.json())
    assert done["state"] == "succeeded", done
    assert done["result"]["pulled_bytes"] >= 4096
    assert src.get("/v1/groups/app").json()["state"] == "protecting"
    assert api.paths[0].read_bytes()[:4096] == b"recovery" * 512
    history = [h["state"] for h in src.get("/v1/groups/app/history").json()]
    assert history[-1] == "protecting" and "failed_over" in history
    # Every change is in the audit log, with who did it.
    entries = src.get("/v1/audit").json()
    actions = [(e["action"], e["status"]) for e in entries]
    assert ("checkpoint", 201) in actions and ("failover", 202) in actions
    assert ("failover", 409) in actions and ("failback", 202) in actions
    assert all(
        e["actor"].startswith("admin-source") for e in entries if e["action"] != "token_create"
    )
    target_actions = {e["action"] for e in tgt.get("/v1/audit").json()}
    assert {"export_open", "export_close", "promote"} <= target_actions
    # Metrics.
    metrics = src.get("/metrics").text
    assert 'havend_group_state{group="app",state="protecting"} 1.0' in metrics
    assert 'havend_group_lag_seconds{group="app"}' in metrics
    assert 'havend_journal_capacity_bytes{group="app"}' in metrics
    assert 'havend_group_checkpoints{group="app"}' in tgt.get("/metrics").text


def test_groups_made_through_the_api(api: Api, tmp_path: Path) -> None:
    """A group created through the API replicates at once, survives a restart of
    its node, shows its volumes and peers, and can be deleted; those of the
    config file cannot; clashes and bad volumes are refused."""
    src, tgt = api.http("source"), api.http("target")
    path = tmp_path / "web" / "www.img"
    body = {
        "name": "web",
        "rpo_seconds": 5,
        "checkpoints": {"retain": 10},
        "volumes": [{"name": "www", "path": str(path), "size": 8 * MiB}],
    }
    made = src.post("/v1/groups", json=body)
    assert made.status_code == 201, made.text
    assert made.json()["state"] in ("protecting",) and path.stat().st_size == 8 * MiB
    assert src.post("/v1/groups", json=body).status_code == 409  # exists
    clash = src.post("/v1/groups", json=body | {"name": "web2"})
    assert clash.status_code == 409 and "www" in clash.json()["detail"]
    missing = src.post(
        "/v1/groups", json={"name": "x", "volumes": [{"name": "x1", "path": str(tmp_path / "x")}]}
    )
    assert missing.status_code == 422 and "give its size" in json.dumps(missing.json())
    huge = src.post(
        "/v1/groups",
        json={"name": "x", "volumes": [{"name": "x1", "path": "huge.img", "size": 1 << 50}]},
    )  # found by fuzzing: was a 500
    assert huge.status_code == 409 and "cannot be created" in huge.json()["detail"]
    assert not (tmp_path / "huge.img").exists()
    nul = src.post("/v1/groups", json={"name": "x", "volumes": [{"name": "x1", "path": "a\x00b"}]})
    assert nul.status_code == 422  # found by fuzzing: was a 500
    for outside in ("/etc/passwd", "../../x.img", str(tmp_path) + "/../x.img"):
        escape = src.post(
            "/v1/groups",
            json={"name": "x", "volumes": [{"name": "x1", "path": outside, "size": 4096}]},
        )
        assert escape.status_code == 422 and "outside" in json.dumps(escape.json()), outside
    hooks = src.post("/v1/groups", json=body | {"name": "y", "checkpoints": {"hooks": {}}})
    assert hooks.status_code == 422  # commands are for the config file only
    volumes = {v["name"]: v for v in src.get("/v1/volumes").json()}
    assert set(volumes) == {"db", "log", "www"} and volumes["www"]["size"] == 8 * MiB
    with NBDClient.open(volumes["www"]["uri"]) as client:
        client.write(4096, b"web" * 4096)
        client.flush()
    wait_caught_up(api.source, api.target, timeout=WAIT)
    replica = api.target.state_dir / "rep" / "web" / "www.img"
    assert replica.read_bytes() == path.read_bytes()
    peers = src.get("/v1/peers").json()
    assert peers["certificate"]["subject_cn"] == "src1"
    assert peers["peers"][0]["role"] == "target" and peers["peers"][0]["groups"]["web"]
    assert {"app", "web"} <= set(tgt.get("/v1/peers").json()["peers"][0]["groups"])
    # Kept across a restart of the node.
    api.source.stop()
    api.source.start()
    src = api.http("source")
    assert src.get("/v1/groups/web").status_code == 200
    assert src.delete("/v1/groups/app").status_code == 409  # the config file's
    gone = src.delete("/v1/groups/web")
    assert gone.status_code == 200, gone.text
    assert src.get("/v1/groups/web").status_code == 404
    assert path.exists()  # the data stays
    assert tgt.post("/v1/groups", json=body | {"name": "z"}).status_code == 409
    actions = [e["action"] for e in src.get("/v1/audit").json()]
    assert "group_create" in actions and "group_delete" in actions


def test_pairing_pausing_and_changing_settings(tmp_path: Path) -> None:
    """A source node without a target pairs through the API (the TLS handshake
    must succeed first), a group made through the API then replicates; pause
    stops shipping and resume catches up; settings change in place; all of
    it is kept across a restart."""
    sites = start_pair(tmp_path, [], tls=True, api=True, paired=False)
    assert sites.tls is not None
    source, target = sites.source, sites.target
    verify = ssl.create_default_context(cafile=sites.tls[0]["ca"])
    try:
        src = httpx.Client(
            base_url=source.address("api"),
            verify=verify,
            timeout=60,
            headers={"Authorization": f"Bearer {make_token(source, 'a', 'admin')}"},
        )
        tgt = httpx.Client(
            base_url=target.address("api"),
            verify=verify,
            timeout=60,
            headers={"Authorization": f"Bearer {make_token(target, 'a', 'admin')}"},
        )
        assert src.get("/v1/peers").json()["peers"] == []
        path = tmp_path / "v.img"
        made = src.post(
            "/v1/groups",
            json={"name": "g", "volumes": [{"name": "v", "path": str(path), "size": 4 * MiB}]},
        )
        assert made.status_code == 201, made.text
        assert made.json()["last_error"] in ("", "no target paired")
        port = int(target.address("replication").rsplit(":", 1)[1])
        closed = src.post("/v1/peers", json={"host": "127.0.0.1", "port": free_port()})
        assert closed.status_code == 409 and "cannot pair" in closed.json()["detail"]
        stranger = src.post(
            "/v1/peers", json={"host": "127.0.0.1", "port": port, "server_name": "not-tgt1"}
        )
        assert stranger.status_code == 409 and "certificate" in stranger.json()["detail"].lower()
        paired = src.post(
            "/v1/peers", json={"host": "127.0.0.1", "port": port, "server_name": "tgt1"}
        )
        assert paired.status_code == 200, paired.text
        assert paired.json()["certificate"]["subject_cn"] == "tgt1"
        nbd = source.address("nbd")
        with NBDClient.open(f"{nbd}/v") as client:
            client.write(0, b"a" * 8192)
            client.flush()
            wait_caught_up(source, target, timeout=WAIT)
            replica = target.state_dir / "rep" / "g" / "v.img"
            assert replica.read_bytes() == path.read_bytes()
            # Pause: writes go on, nothing ships; resume: it catches up.
            paused = src.post("/v1/groups/g/pause")
            assert paused.status_code == 200 and paused.json()["state"] == "paused"
            assert src.post("/v1/groups/g/pause").status_code == 409
            client.write(8192, b"b" * 8192)
            client.flush()
            time.sleep(1)
            group = src.get("/v1/groups/g").json()
            assert group["lag_bytes"] >= 8192 and group["acked_seq"] < group["last_seq"]
            assert replica.read_bytes() != path.read_bytes()
            metrics = src.get("/metrics").text
            assert 'havend_group_state{group="g",state="paused"} 1.0' in metrics
        # Kept across a restart: the pairing, the group, the pause.
        source.stop()
        source.start()
        src = httpx.Client(
            base_url=source.address("api"), verify=verify, timeout=60, headers=src.headers
        )
        assert src.get("/v1/groups/g").json()["state"] == "paused"
        assert src.get("/v1/peers").json()["peers"][0]["port"] == port
        resumed = src.post("/v1/groups/g/resume")
        assert resumed.status_code == 200 and resumed.json()["state"] == "protecting"
        wait_caught_up(source, target, timeout=WAIT)
        assert replica.read_bytes() == path.read_bytes()
        # Settings in place: RPO, sync mode, periodic checkpoints.
        changed = src.patch(
            "/v1/groups/g",
            json={"rpo_seconds": 2, "mode": "sync", "checkpoints": {"interval_seconds": 1}},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["rpo_seconds"] == 2 and changed.json()["mode"] == "sync"
        wait_until(
            lambda: tgt.get("/v1/groups/g/checkpoints").json(),
            WAIT,
            "two periodic checkpoints on the target",
            until=lambda checkpoints: len(checkpoints) >= 2,
            interval=0.2,
        )
        bad = src.patch("/v1/groups/g", json={"rpo_seconds": 0, "volumes": []})
        assert bad.status_code == 422
        assert {d["field"] for d in bad.json()["detail"]} == {"rpo_seconds", "volumes"}
        source.stop()
        source.start()
        src = httpx.Client(
            base_url=source.address("api"), verify=verify, timeout=60, headers=src.headers
        )
        assert src.get("/v1/groups/g").json()["rpo_seconds"] == 2
    finally:
        sites.stop()


def test_every_route_needs_a_token_of_the_right_scope(api: Api) -> None:
    with api.http("source") as admin:
        schema = admin.get("/openapi.json").json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    routes.append(("GET", "/openapi.json"))
    assert len(routes) > 12
    with api.http("source", None) as anonymous:
        for method, path in routes:
            concrete = path.replace("{group}", "app").replace("{kind}", "failover")
            concrete = concrete.replace("{op_id}", "x").replace("{token_id}", "x")
            concrete = concrete.replace("{export}", "x")
            answer = anonymous.request(method, concrete, json={})
            assert answer.status_code == 401, (method, path, answer.text)
        bogus = anonymous.get("/v1/node", headers={"Authorization": "Bearer hvn_x_nope"})
        assert bogus.status_code == 401
    with api.http("source", "read") as reader:
        assert reader.get("/v1/groups").status_code == 200
        denied = reader.post("/v1/groups/app/checkpoints", json={})
        assert denied.status_code == 403 and "read" in denied.json()["detail"]
        assert reader.get("/v1/audit").status_code == 403
    with api.http("source", "operate") as operator:
        assert operator.post("/v1/tokens", json={"name": "x", "scope": "admin"}).status_code == 403
    with api.http("source") as admin:
        entries = admin.get("/v1/audit").json()
        denied_entries = [e for e in entries if e["status"] in (401, 403)]
        assert any(e["actor"] == "anonymous" for e in denied_entries)
        assert any(e["actor"].startswith("read-source") for e in denied_entries)
        # A token made through the API works, and is never in the audit log in clear.
        made = admin.post("/v1/tokens", json={"name": "ci", "scope": "read"}).json()
        with httpx.Client(
            base_url=api.source.address("api"),
            verify=api.tls,
            headers={"Authorization": f"Bearer {made['token']}"},
        ) as ci:
            assert ci.get("/v1/node").status_code == 200
            assert admin.delete(f"/v1/tokens/{made['id']}").status_code == 200
            assert ci.get("/v1/node").status_code == 401
        assert made["token"] not in json.dumps(admin.get("/v1/audit").json())
        assert made["token"] not in api.source.log()
    database = api.source.state_dir / "havend.db"
    assert made["token"] not in database.read_bytes().decode("latin-1")
    # The audit log cannot be rewritten, even from SQL.
    with sqlite3.connect(database) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")


def test_bad_requests_are_refused_with_the_field_named(api: Api) -> None:
    with api.http("source") as src, api.http("target") as tgt:
        bad = src.post("/v1/groups/app/checkpoints", json={"label": 5, "colour": "red"})
        assert bad.status_code == 422
        fields = {d["field"] for d in bad.json()["detail"]}
        assert {"label", "colour"} <= fields
        assert src.post("/v1/groups/nope/checkpoints", json={}).status_code == 404
        assert src.get("/v1/groups/nope").status_code == 404
        assert src.get("/v1/operations/0123").status_code == 404
        assert src.get("/v1/audit", params={"after": 10**30}).status_code == 422  # found by fuzzing
        assert src.post("/v1/groups/app/operations/explode", json={}).status_code == 422
        timeout = src.post("/v1/groups/app/operations/failover", json={"timeout": -1})
        assert timeout.status_code == 422 and timeout.json()["detail"][0]["field"] == "timeout"
        resolve = src.post("/v1/groups/app/operations/resolve", json={"survivor": "both"})
        assert resolve.status_code == 422
        not_now = src.post("/v1/groups/app/operations/resolve", json={"survivor": "production"})
        assert not_now.status_code == 409 and "protecting" in not_now.json()["detail"]
        export = tgt.post(
            "/v1/exports", json={"group": "app", "volume": "db", "checkpoint": "f" * 32}
        )
        assert export.status_code == 409 and "retains no checkpoints" in export.json()["detail"]
        assert tgt.post("/v1/exports", json={"group": "../x", "volume": "db"}).status_code == 422
        assert tgt.delete("/v1/exports/app/db@nothing").status_code == 404
        not_json = src.post(
            "/v1/groups/app/checkpoints",
            content=b"\xff{",
            headers={"Content-Type": "application/json"},
        )
        assert not_json.status_code == 400, not_json.text  # not JSON at all: no field to name
        assert src.get("/v1/node").status_code == 200  # still serving


SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"


def test_the_published_schema_is_the_code_s() -> None:
    from havend.api.app import schema

    assert json.loads(SCHEMA.read_text()) == json.loads(json.dumps(schema())), (
        "docs/api/openapi.json is stale: make openapi"
    )


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    a = Api(tmp_path_factory.mktemp("fuzz"))
    a.write(50)
    try:
        yield a
    finally:
        a.close()


# Pairing dials whatever host it is given: tested by hand above, never fuzzed.
schema = schemathesis.openapi.from_path(str(SCHEMA)).exclude(path="/v1/peers", method="POST")


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_no_request_makes_a_5xx_or_breaks_the_schema(case: Any, fuzzed: Api) -> None:
    """Generated requests (bounded) with an admin token, to both nodes: never a
    5xx, never an answer outside the schema, and the node keeps serving."""
    for node in ("source", "target"):
        process = getattr(fuzzed, node)
        response = case.call(
            base_url=process.address("api"),
            headers={"Authorization": f"Bearer {fuzzed.tokens[node]['admin']}"},
            verify=fuzzed.tls_ca,
            timeout=60,
        )
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
        )


def test_json_logs(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: {name: x, role: source, state_dir: /tmp/x}\ninsecure_plaintext: true\n")
    result = subprocess.run(
        [sys.executable, "-m", "havend", "--log-format", "json", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and "source: required" in entry["message"]
    assert {"time", "logger", "pid"} <= set(entry)
