# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.haven.dr.plugins.modules import node_info


def run(capsys, environ=None, **args):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            node_info.main()
    return json.loads(capsys.readouterr().out)


def test_the_node_and_its_peers(havend, capsys):
    havend.script.on("GET", "/v1/node", (200, {"name": "src1", "role": "source", "health": "ok"}))
    havend.script.on("GET", "/v1/peers", (200, {"tls": False, "certificate": None, "peers": []}))
    result = run(capsys, url=havend.url, token="hvn_r_read", _ansible_check_mode=True)
    assert not result["changed"]
    assert result["node"]["name"] == "src1" and result["peers"]["peers"] == []


def test_url_and_token_from_the_environment(havend, capsys, monkeypatch):
    havend.script.on("GET", "/v1/node", (200, {"name": "tgt1"}))
    havend.script.on("GET", "/v1/peers", (200, {"peers": []}))
    monkeypatch.setenv("HAVEN_URL", havend.url)
    monkeypatch.setenv("HAVEN_TOKEN", "hvn_e_env")
    assert run(capsys)["node"]["name"] == "tgt1"
    assert havend.script.requests[0][2]["Authorization"] == "Bearer hvn_e_env"


def test_no_url_fails_naming_it(capsys, monkeypatch):
    monkeypatch.delenv("HAVEN_URL", raising=False)
    failed = run(capsys, token="hvn_r_read")
    assert failed["failed"] and "url" in failed["msg"]
