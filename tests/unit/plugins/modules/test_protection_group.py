# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.modules.protection_group import differences

CURRENT = {
    "name": "shop",
    "state": "protecting",
    "settings": {
        "mode": "async",
        "rpo_seconds": 30.0,
        "compression_level": 3,
        "bandwidth_limit": 0,
        "reverse_interval_seconds": 0.0,
        "journal": {"segment_size": 67108864, "max_segments": 16},
        "checkpoints": {"interval_seconds": 300.0, "retain": 2048, "max_age_seconds": 0.0},
        "volumes": [{"name": "db", "path": "/v/db.img", "server": "db1"}, {"name": "web", "path": "/v/web.img", "server": None}],
    },
}


def params(**given):
    p = dict.fromkeys(
        ("mode", "rpo_seconds", "compression_level", "bandwidth_limit", "reverse_interval_seconds", "journal", "checkpoints", "volumes")
    )
    p["name"] = "shop"
    p.update(given)
    return p


def test_nothing_given_nothing_differs():
    assert differences(CURRENT, params()) == ({}, [], [], [])


def test_only_what_differs_is_changed():
    patch, names, add, remove = differences(
        CURRENT, params(rpo_seconds=30, mode="sync", checkpoints={"interval_seconds": 60, "retain": 2048, "max_age_seconds": None})
    )
    assert patch == {"mode": "sync", "checkpoints": {"interval_seconds": 60}}
    assert names == ["mode", "checkpoints.interval_seconds"] and add == remove == []


def test_volumes_by_name_the_new_ones_added_the_missing_ones_removed():
    same = [{"name": "db", "path": "elsewhere.img", "server": None, "size": None}, {"name": "web", "path": "w.img", "server": None, "size": None}]
    assert differences(CURRENT, params(volumes=same)) == ({}, [], [], [])
    app = {"name": "app", "path": "app.img", "server": "app1", "size": 4096}
    wanted = [{"name": "db", "path": "db.img", "server": None, "size": None}, app]
    patch, names, add, remove = differences(CURRENT, params(volumes=wanted))
    assert patch == {} and add == [app] and remove == ["web"]
    assert names == ["volumes +app", "volumes -web"]


def test_a_config_file_groups_volume_list_or_an_empty_one_is_refused_before_any_change():
    config = dict(CURRENT, settings=dict(CURRENT["settings"], defined_in="config"))
    wanted = [{"name": "db", "path": "db.img", "server": None, "size": None}]
    with pytest.raises(HavenError, match=r"defined in the node's config file: its volumes \(-web\)"):
        differences(config, params(volumes=wanted))
    with pytest.raises(HavenError, match="one volume at least"):
        differences(CURRENT, params(volumes=[]))


def test_a_live_groups_journal_cannot_change():
    with pytest.raises(HavenError, match="journal.max_segments is 16 on the node"):
        differences(CURRENT, params(journal={"segment_size": None, "max_segments": 32}))


def test_relabelling_a_volume_is_refused():
    wanted = [{"name": "db", "path": "db.img", "server": "db2", "size": None}, {"name": "web", "path": "w.img", "server": None, "size": None}]
    with pytest.raises(HavenError, match="volume db is labelled 'db1'"):
        differences(CURRENT, params(volumes=wanted))
