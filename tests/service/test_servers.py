"""Protected servers: a volume's ``server`` label, from the config file or
the API, lists the server with its group, volumes and state
(``/v1/servers``) and filters ``/v1/volumes``; a bad name is refused with
the field named, in the config file as in the API."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from nodes import app_group, make_token, start_pair

from havend.config import load
from havend.errors import ConfigError

MiB = 1 << 20
HAVEND = [sys.executable, "-m", "havend"]


def test_servers_by_label_from_the_config_file_and_the_api(tmp_path: Path) -> None:
    group = app_group(tmp_path, {"db": MiB, "log": MiB})
    group["volumes"][0]["server"] = "db1.example.com"
    group["volumes"][1]["server"] = "db1.example.com"
    pair = start_pair(tmp_path, [group], api="source", caught_up=60)
    try:
        source = pair.source
        headers = {"Authorization": f"Bearer {make_token(source, 't', 'admin')}"}
        with httpx.Client(base_url=source.address("api"), headers=headers, timeout=60) as api:
            made = api.post(
                "/v1/groups",
                json={
                    "name": "web",
                    "volumes": [
                        {"name": "www", "path": "www.img", "size": MiB, "server": "web1"},
                        {"name": "scratch", "path": "scratch.img", "size": MiB},
                    ],
                },
            )
            assert made.status_code == 201, made.text
            servers = api.get("/v1/servers").json()
            assert [s["name"] for s in servers] == ["db1.example.com", "web1"]
            db1, web1 = servers
            assert db1["groups"] == ["app"] and [v["name"] for v in db1["volumes"]] == ["db", "log"]
            assert db1["node"] == "src1" and db1["state"] == "protecting" and db1["rpo_ok"]
            assert web1["groups"] == ["web"] and [v["name"] for v in web1["volumes"]] == ["www"]
            www = api.get("/v1/volumes", params={"server": "web1"}).json()
            assert [v["name"] for v in www] == ["www"] and www[0]["server"] == "web1"
            app = api.get("/v1/volumes", params={"group": "app"}).json()
            assert {v["name"] for v in app} == {"db", "log"}
            unlabelled = [v for v in api.get("/v1/volumes").json() if v["name"] == "scratch"]
            assert unlabelled[0]["server"] is None
            bad = api.post(
                "/v1/groups",
                json={"name": "x", "volumes": [{"name": "x", "path": "x.img", "server": "../etc"}]},
            )
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["field"] == "volumes.0.server"
            assert api.get("/v1/volumes", params={"server": "a b"}).status_code == 422
        # The labels survive a restart (the API's groups are kept in the store).
        source.stop()
        source.start()
        with httpx.Client(base_url=source.address("api"), headers=headers, timeout=60) as api:
            assert [s["name"] for s in api.get("/v1/servers").json()] == ["db1.example.com", "web1"]
    finally:
        pair.stop()


def test_a_bad_server_name_in_the_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "src.yaml"
    config.write_text(
        "node: {name: s, role: source, state_dir: /tmp/x}\ninsecure_plaintext: true\n"
        "source:\n  nbd: {host: 127.0.0.1, port: 0}\n  groups:\n"
        "    - name: app\n      volumes:\n        - {name: db, path: /tmp/db.img, server: 'a b'}\n"
    )
    with pytest.raises(ConfigError, match=r"source\.groups\[0\]\.volumes\[0\]\.server: 'a b'"):
        load(str(config))
