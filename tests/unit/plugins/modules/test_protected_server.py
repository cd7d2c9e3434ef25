# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.six.moves.urllib.parse import parse_qs, urlparse
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import protected_server

NAMES = ("db-data", "db-wal", "db-log", "web-root", "other")


class Node:
    """havend's groups and volumes (source node), in memory: a volume added
    is syncing for ``sync_polls`` reads of /v1/volumes, then protected."""

    def __init__(self, script, sync_polls=2):
        self.sync_polls = sync_polls
        self.volumes = [
            self.volume("db-log", "app", "db1", 8192),
            self.volume("web-root", "app", "web1", 4096),
            self.volume("other", "batch", None, 4096),
        ]
        self.polls = {}
        for group in ("app", "batch"):
            script.on("GET", "/v1/groups/%s" % group, (200, {"name": group, "state": "protecting"}))
            script.on("POST", "/v1/groups/%s/volumes" % group, self.add)
            for name in NAMES:
                script.on("DELETE", "/v1/groups/%s/volumes/%s" % (group, name), self.remove)
        script.on("GET", "/v1/volumes", self.list)

    @staticmethod
    def volume(name, group, server, size, path=None):
        return {
            "name": name,
            "group": group,
            "path": path or "/srv/havend/%s.img" % name,
            "size": size,
            "server": server,
            "uri": "nbd://127.0.0.1:10809/%s" % name,
            "state": "protected",
            "sync": None,
        }

    def list(self, method, path, body):
        query = dict((k, v[0]) for k, v in parse_qs(urlparse(path).query).items())
        for volume in self.volumes:
            if volume["state"] == "syncing":
                self.polls[volume["name"]] = self.polls.get(volume["name"], 0) + 1
                done = min(volume["size"], volume["size"] * self.polls[volume["name"]] // (self.sync_polls + 1))
                volume["sync"] = {"done_bytes": done, "total_bytes": volume["size"]}
                if self.polls[volume["name"]] > self.sync_polls:
                    volume.update(state="protected", sync=None)
        return 200, [v for v in self.volumes if all(v.get(k) == q for k, q in query.items())]

    def add(self, method, path, body):
        group = path.split("/")[3]
        volume = self.volume(body["name"], group, body["server"], body["size"] or 4096, "/srv/havend/" + body["path"])
        volume.update(state="syncing", sync={"done_bytes": 0, "total_bytes": volume["size"]})
        self.volumes.append(volume)
        return 201, volume

    def remove(self, method, path, body):
        parts = urlparse(path)
        name = parts.path.rsplit("/", 1)[1]
        self.volumes = [v for v in self.volumes if v["name"] != name]
        purged = parse_qs(parts.query).get("purge") == ["true"]
        return 200, {"group": parts.path.split("/")[3], "volume": name, "removed": True, "purged": purged}


def run(capsys, havend, **args):
    args.setdefault("url", havend.url)
    args.setdefault("token", "hvn_a_admin")
    args.setdefault("wait_interval", 0.01)
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            protected_server.main()
    return json.loads(capsys.readouterr().out)


def changes(script):
    return [(r[0], r[1], r[3]) for r in script.requests if r[0] in ("POST", "DELETE")]


DB1 = [
    {"name": "db-log", "path": "db-log.img"},
    {"name": "db-data", "path": "db1/data.img", "size": 16384},
    {"name": "db-wal", "path": "db1/wal.img", "size": 8192},
]


def test_new_disks_are_added_labelled_and_waited_for(havend, capsys):
    node = Node(havend.script)
    result = run(capsys, havend, name="db1", group="app", disks=DB1, _ansible_diff=True)
    assert result["changed"] and result["added"] == ["db-data", "db-wal"] and result["removed"] == []
    assert changes(havend.script) == [
        ("POST", "/v1/groups/app/volumes", {"name": "db-data", "path": "db1/data.img", "size": 16384, "server": "db1"}),
        ("POST", "/v1/groups/app/volumes", {"name": "db-wal", "path": "db1/wal.img", "size": 8192, "server": "db1"}),
    ]
    disks = result["server"]["disks"]
    assert [d["name"] for d in disks] == ["db-log", "db-data", "db-wal"]
    assert all(d["state"] == "protected" and d["server"] == "db1" for d in disks)
    assert result["server"]["group"] == "app"
    lines = [line.split(" after ")[0] for line in result["progress_lines"]]
    assert lines[0] == "db1: db-data 5461 of 16384 bytes (33 %), db-wal 2730 of 8192 bytes (33 %)"
    assert lines[-1] == "db1: every disk protected"
    assert result["diff"]["before"]["disks"] == [{"name": "db-log", "group": "app", "path": "/srv/havend/db-log.img", "size": 8192}]
    assert [d["name"] for d in result["diff"]["after"]["disks"]] == ["db-log", "db-data", "db-wal"]
    assert not [v for v in node.volumes if v["server"] == "web1" and v["state"] != "protected"]


def test_the_same_disks_again_change_nothing(havend, capsys):
    Node(havend.script)
    run(capsys, havend, name="db1", group="app", disks=DB1)
    before = len(havend.script.requests)
    result = run(capsys, havend, name="db1", group="app", disks=DB1)
    assert not result["changed"] and result["added"] == result["removed"] == []
    assert [r[0] for r in havend.script.requests[before:]] == ["GET", "GET", "GET"]
    assert "warnings" not in result


def test_a_disk_no_longer_listed_is_removed_with_purge_as_asked(havend, capsys):
    Node(havend.script)
    run(capsys, havend, name="db1", group="app", disks=DB1)
    result = run(capsys, havend, name="db1", group="app", disks=DB1[:2], purge=True)
    assert result["changed"] and result["removed"] == ["db-wal"] and result["added"] == []
    assert changes(havend.script)[-1] == ("DELETE", "/v1/groups/app/volumes/db-wal?purge=true", None)
    assert [d["name"] for d in result["server"]["disks"]] == ["db-log", "db-data"]


def test_check_mode_says_what_would_change_and_changes_nothing(havend, capsys):
    Node(havend.script)
    result = run(
        capsys, havend, name="db1", group="app", disks=DB1[1:], _ansible_check_mode=True, _ansible_diff=True
    )
    assert result["changed"] and result["added"] == ["db-data", "db-wal"] and result["removed"] == ["db-log"]
    assert changes(havend.script) == []
    assert [d["name"] for d in result["server"]["disks"]] == ["db-log"]
    assert [d["name"] for d in result["diff"]["after"]["disks"]] == ["db-data", "db-wal"]


def test_absent_removes_only_the_servers_disks_in_every_group(havend, capsys):
    node = Node(havend.script)
    node.volumes.append(node.volume("db-wal", "batch", "db1", 4096))
    result = run(capsys, havend, name="db1", state="absent", _ansible_diff=True)
    assert result["changed"] and result["removed"] == ["db-log", "db-wal"]
    assert changes(havend.script) == [
        ("DELETE", "/v1/groups/app/volumes/db-log?purge=false", None),
        ("DELETE", "/v1/groups/batch/volumes/db-wal?purge=false", None),
    ]
    assert [v["name"] for v in node.volumes] == ["web-root", "other"]
    assert result["server"] == {"name": "db1", "group": None, "disks": []}
    again = run(capsys, havend, name="db1", state="absent")
    assert not again["changed"] and again["removed"] == []


def test_absent_in_one_group_leaves_the_others(havend, capsys):
    node = Node(havend.script)
    node.volumes.append(node.volume("db-wal", "batch", "db1", 4096))
    result = run(capsys, havend, name="db1", group="batch", state="absent")
    assert result["removed"] == ["db-wal"] and [v["name"] for v in node.volumes] == ["db-log", "web-root", "other"]
    assert result["server"]["group"] == "app" and [d["name"] for d in result["server"]["disks"]] == ["db-log"]


@pytest.mark.parametrize(
    ("disks", "message"),
    [
        ([{"name": "web-root", "path": "w.img"}], "disk web-root: the volume name is taken on this node (group app, server web1)"),
        ([{"name": "other", "path": "o.img"}], "disk other: the volume name is taken on this node (group batch, no server)"),
        ([{"name": "db-x", "path": "x.img"}, {"name": "db-x", "path": "y.img"}], "disks: db-x listed more than once"),
    ],
)
def test_refusals_come_before_any_change(havend, capsys, disks, message):
    Node(havend.script)
    result = run(capsys, havend, name="db1", group="app", disks=[{"name": "db-data", "path": "d.img", "size": 4096}] + disks)
    assert result["failed"] and message in result["msg"]
    assert changes(havend.script) == []


def test_disks_of_the_server_in_another_group_are_named(havend, capsys):
    Node(havend.script)
    result = run(capsys, havend, name="db1", group="batch", disks=[{"name": "db-log", "path": "db-log.img"}])
    assert result["failed"] and "server db1 has disks in group app too (db-log)" in result["msg"]
    assert changes(havend.script) == []


def test_an_unknown_group_fails_naming_it(havend, capsys):
    Node(havend.script)
    result = run(capsys, havend, name="db1", group="nope", disks=DB1)
    assert result["failed"] and "group nope does not exist on this node" in result["msg"]
    assert changes(havend.script) == []


def test_a_different_file_is_a_warning_not_a_change(havend, capsys):
    Node(havend.script)
    result = run(capsys, havend, name="db1", group="app", disks=[{"name": "db-log", "path": "elsewhere/log.img"}])
    assert not result["changed"] and changes(havend.script) == []
    assert "disk db-log of server db1 is /srv/havend/db-log.img on the node, not elsewhere/log.img" in json.dumps(result["warnings"])


def test_a_path_names_the_nodes_file_relative_to_volume_dir_or_absolute():
    same = protected_server._same_file
    assert same("db-log.img", "/srv/havend/db-log.img") and same("./a/../db-log.img", "/srv/havend/db-log.img")
    assert same("/srv/havend/db-log.img", "/srv/havend/db-log.img")
    assert not same("log.img", "/srv/havend/db-log.img") and not same("/srv/db-log.img", "/srv/havend/db-log.img")


def test_a_refusal_midway_says_what_was_done(havend, capsys):
    Node(havend.script)
    havend.script.on(
        "POST",
        "/v1/groups/app/volumes",
        (201, {"name": "db-data"}),
        (409, {"detail": "group app is fenced: its volumes cannot change"}),
    )
    result = run(capsys, havend, name="db1", group="app", disks=DB1)
    assert result["failed"] and result["status"] == 409
    assert "group app is fenced" in result["msg"] and "(added before it: db-data; removed: none)" in result["msg"]
    assert result["changed"] and result["added"] == ["db-data"]


def test_a_copy_that_does_not_end_in_time_fails_with_the_progress(havend, capsys):
    Node(havend.script, sync_polls=10 ** 6)
    result = run(capsys, havend, name="db1", group="app", disks=DB1, wait_timeout=0.05)
    assert result["failed"] and "the initial copy of db1 is not done: db-data " in result["msg"]
    assert result["progress_lines"] and result["server"]["group"] == "app"


def test_wait_false_returns_while_syncing(havend, capsys):
    Node(havend.script, sync_polls=10 ** 6)
    result = run(capsys, havend, name="db1", group="app", disks=DB1, wait=False)
    assert result["changed"] and "progress_lines" not in result
    assert [d["state"] for d in result["server"]["disks"]] == ["protected", "syncing", "syncing"]


def test_present_needs_a_group_and_disks(havend, capsys):
    result = run(capsys, havend, name="db1", disks=DB1)
    assert result["failed"] and "group" in result["msg"] and havend.script.requests == []


@pytest.mark.parametrize(
    "args",
    [
        dict(group="batch", disks=[{"name": "db-x", "path": "x.img", "size": 4096}], _ansible_check_mode=True),
        dict(state="absent"),
    ],
)
def test_a_group_of_the_config_file_is_refused_before_any_change(havend, capsys, args):
    node = Node(havend.script)
    node.volumes.append(node.volume("db-wal", "batch", "db1", 4096))
    havend.script.on("GET", "/v1/groups/batch", (200, {"name": "batch", "settings": {"defined_in": "config"}}))
    if args.get("group") == "batch":
        node.volumes = [v for v in node.volumes if v["server"] != "db1"]
    result = run(capsys, havend, name="db1", **args)
    assert result["failed"] and "group batch is defined in the node's config file" in result["msg"]
    assert changes(havend.script) == []


REPORTS1 = [{"name": "reports-data", "path": "reports/data.img", "size": 8192}]


def test_create_group_makes_a_missing_group_with_the_servers_disks(havend, capsys):
    node = Node(havend.script)

    def create(method, path, body):
        for disk in body["volumes"]:
            volume = node.volume(disk["name"], body["name"], disk["server"], disk["size"], "/srv/havend/" + disk["path"])
            volume.update(state="syncing", sync={"done_bytes": 0, "total_bytes": volume["size"]})
            node.volumes.append(volume)
        return 201, {"name": body["name"], "state": "protecting"}

    havend.script.on("POST", "/v1/groups", create)
    result = run(capsys, havend, name="reports1", group="reports", disks=REPORTS1, create_group=True)
    assert result["changed"] and result["added"] == ["reports-data"]
    assert changes(havend.script) == [
        ("POST", "/v1/groups", {"name": "reports", "volumes": [dict(REPORTS1[0], server="reports1")]}),
    ]
    assert [(d["name"], d["state"]) for d in result["server"]["disks"]] == [("reports-data", "protected")]
    assert result["progress_lines"][-1].startswith("reports1: every disk protected")


def test_without_create_group_a_missing_group_changes_nothing(havend, capsys):
    Node(havend.script)
    result = run(capsys, havend, name="reports1", group="reports", disks=REPORTS1)
    assert result["failed"] and "group reports does not exist on this node" in result["msg"]
    assert "create_group=true" in result["msg"] and changes(havend.script) == []


def test_create_group_in_check_mode_changes_nothing(havend, capsys):
    Node(havend.script)
    result = run(capsys, havend, name="reports1", group="reports", disks=REPORTS1, create_group=True, _ansible_check_mode=True)
    assert result["changed"] and result["added"] == ["reports-data"] and changes(havend.script) == []


def test_a_group_made_meanwhile_gets_the_disks_added(havend, capsys):
    """Two servers of a new group in one task: the second create is refused
    (409), its disks are added to the group the first one made."""
    Node(havend.script)
    havend.script.on(
        "GET",
        "/v1/groups/reports",
        (404, {"detail": "no group reports"}),
        (200, {"name": "reports", "state": "protecting"}),
    )
    havend.script.on("POST", "/v1/groups", (409, {"detail": "group 'reports' exists already"}))
    havend.script.on("POST", "/v1/groups/reports/volumes", (201, {"name": "reports-data"}))
    result = run(capsys, havend, name="reports1", group="reports", disks=REPORTS1, create_group=True, wait=False)
    assert result["changed"] and result["added"] == ["reports-data"]
    assert changes(havend.script) == [
        ("POST", "/v1/groups", {"name": "reports", "volumes": [dict(REPORTS1[0], server="reports1")]}),
        ("POST", "/v1/groups/reports/volumes", dict(REPORTS1[0], server="reports1")),
    ]


def test_a_create_refused_otherwise_fails_with_havends_reason(havend, capsys):
    Node(havend.script)
    havend.script.on("POST", "/v1/groups", (422, {"detail": "volumes.0.path: outside the node's volume_dir"}))
    result = run(capsys, havend, name="reports1", group="reports", disks=REPORTS1, create_group=True)
    assert result["failed"] and result["status"] == 422 and "outside the node's volume_dir" in result["msg"]
