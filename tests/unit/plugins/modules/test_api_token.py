# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import api_token


class Tokens:
    """havend's /v1/tokens, in memory."""

    def __init__(self, script):
        self.tokens = [{"id": "a0", "name": "ops", "scope": "admin", "created": 1.0, "revoked": None}]
        self.count = 0
        script.on("GET", "/v1/tokens", self.list)
        script.on("POST", "/v1/tokens", self.create)
        for i in range(8):
            script.on("DELETE", "/v1/tokens/t%d" % i, self.revoke)
        script.on("DELETE", "/v1/tokens/a0", self.revoke)

    def list(self, method, path, body):
        return 200, self.tokens

    def create(self, method, path, body):
        token_id = "t%d" % self.count
        self.count += 1
        self.tokens.append(dict(id=token_id, name=body["name"], scope=body["scope"], created=2.0, revoked=None))
        return 201, {"id": token_id, "name": body["name"], "scope": body["scope"], "token": "hvn_%s_s3cret" % token_id}

    def revoke(self, method, path, body):
        token_id = path.rsplit("/", 1)[1]
        for token in self.tokens:
            if token["id"] == token_id and token["revoked"] is None:
                token["revoked"] = 3.0
                return 200, {"id": token_id, "revoked": True}
        return 404, {"detail": "no active token %r" % token_id}

    def active(self, name):
        return [(t["id"], t["scope"]) for t in self.tokens if t["name"] == name and t["revoked"] is None]


def run(capsys, **args):
    args.setdefault("token", "hvn_a0_admin")
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            api_token.main()
    return json.loads(capsys.readouterr().out)


def test_made_once_its_secret_shown_once(havend, capsys):
    tokens = Tokens(havend.script)
    url = havend.url
    checked = run(capsys, url=url, name="prometheus", scope="read", _ansible_check_mode=True, _ansible_diff=True)
    assert checked["changed"] and checked["token"] is None and tokens.active("prometheus") == []
    assert checked["diff"] == {"before": {"tokens": []}, "after": {"tokens": [{"id": "(new)", "scope": "read"}]}}
    made = run(capsys, url=url, name="prometheus", scope="read")
    assert made["changed"] and made["token"] == "hvn_t0_s3cret" and made["id"] == "t0"
    again = run(capsys, url=url, name="prometheus", scope="read")
    assert not again["changed"] and again["token"] is None and again["id"] == "t0"
    assert tokens.active("prometheus") == [("t0", "read")]


def test_another_scope_or_a_rotation_replaces_it(havend, capsys):
    tokens = Tokens(havend.script)
    run(capsys, url=havend.url, name="ci", scope="read")
    wider = run(capsys, url=havend.url, name="ci", scope="operate")
    assert wider["changed"] and wider["revoked"] == ["t0"] and wider["scope"] == "operate"
    rotated = run(capsys, url=havend.url, name="ci", scope="operate", rotate=True)
    assert rotated["changed"] and rotated["revoked"] == ["t1"] and rotated["token"] == "hvn_t2_s3cret"
    assert tokens.active("ci") == [("t2", "operate")]


def test_absent_revokes_every_active_token_of_the_name(havend, capsys):
    tokens = Tokens(havend.script)
    run(capsys, url=havend.url, name="ci", scope="read")
    gone = run(capsys, url=havend.url, name="ci", state="absent")
    assert gone["changed"] and gone["revoked"] == ["t0"] and tokens.active("ci") == []
    assert not run(capsys, url=havend.url, name="ci", state="absent")["changed"]


def test_rotating_the_token_the_task_runs_with_revokes_it_last(havend, capsys):
    tokens = Tokens(havend.script)
    rotated = run(capsys, url=havend.url, name="ops", scope="admin", rotate=True)
    assert rotated["revoked"] == ["a0"] and tokens.active("ops") == [("t0", "admin")]
    assert [r[:2] for r in havend.script.requests][-2:] == [("POST", "/v1/tokens"), ("DELETE", "/v1/tokens/a0")]


def test_present_without_a_scope_fails_naming_the_option(havend, capsys):
    Tokens(havend.script)
    failed = run(capsys, url=havend.url, name="ci")
    assert failed["failed"] and "scope" in failed["msg"]
    assert havend.script.requests == []


def test_a_bad_token_fails_with_401_and_the_node(havend, capsys):
    havend.script.on("GET", "/v1/tokens", (401, {"detail": "a valid bearer token is required"}))
    failed = run(capsys, url=havend.url, name="ci", scope="read", token="hvn_x_wrong")
    assert failed["failed"] and failed["status"] == 401
    assert failed["msg"] == havend.url + ": GET /v1/tokens answered 401: a valid bearer token is required"
    assert "hvn_x_wrong" not in json.dumps(failed)


def test_an_unreachable_node_is_one_line(closed_port, capsys):
    url = "http://127.0.0.1:%d" % closed_port
    failed = run(capsys, url=url, name="ci", scope="read", retries=0)
    assert failed["msg"] == url + ": connection refused (is havend running and its API on?)"


def test_a_failed_revoke_still_returns_the_new_secret(havend, capsys):
    tokens = Tokens(havend.script)
    havend.script.on("DELETE", "/v1/tokens/a0", (500, {"detail": "disk full"}))
    failed = run(capsys, url=havend.url, name="ops", scope="admin", rotate=True)
    assert failed["failed"] and "revoking the old ones failed" in failed["msg"]
    assert failed["token"] == "hvn_t0_s3cret" and failed["id"] == "t0"
    assert ("t0", "admin") in tokens.active("ops")
