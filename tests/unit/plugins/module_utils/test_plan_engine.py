# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The plan engine with fake providers and checkers: no VM, no real sleep
longer than a tenth of a second; time is a fake clock that sleeping moves."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import threading
import time

import pytest

from ansible_collections.haven.dr.plugins.module_utils._plan import parse_plan
from ansible_collections.haven.dr.plugins.module_utils._plan_engine import (
    HealthChecker,
    PlanRun,
    PlanState,
    ScriptRunner,
    call_with_timeout,
    StepTimeout,
    cleanup,
)
from ansible_collections.haven.dr.plugins.module_utils.providers._base import Provider, ProviderTimeout


class Clock:
    """Monotonic seconds that only ``sleep`` moves (shared by every thread)."""

    def __init__(self):
        self.now = 100.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def sleep(self, seconds):
        with self.lock:
            self.now += seconds


class FakeProvider(Provider):
    """Records every call; ``hang`` = {(step, server)} blocks until released,
    ``fail`` = {(step, server): message} raises; ``status_of`` for status."""

    def __init__(self, clock=None, step_seconds=0.0):
        self.calls = []
        self.lock = threading.Lock()
        self.hang, self.fail, self.status_of = set(), {}, {}
        self.release = threading.Event()
        self.clock, self.step_seconds = clock, step_seconds
        self.active, self.max_active = 0, 0
        self.gate = None  # (a threading.Barrier) every create waits at it
        self.specs, self.networks = {}, []
        self.timeouts = []  # (step, name, the timeout the call was given)
        self.own_timeout = set()  # (step, server): raises ProviderTimeout, as a provider whose deadline passed

    def _do(self, step, name, timeout):
        with self.lock:
            self.calls.append((step, name))
            self.timeouts.append((step, name, timeout))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if step == "create" and self.gate is not None:
                self.gate.wait(2)  # broken (BrokenBarrierError) unless every boot is here at once
            if (step, name) in self.hang:
                self.release.wait(5)
            if (step, name) in self.fail:
                raise RuntimeError(self.fail[(step, name)])
            if (step, name) in self.own_timeout:
                raise ProviderTimeout(name, step, "QEMU did not start within %.0f s (its disks: nbd://x)" % timeout)
            if self.clock is not None and self.step_seconds:
                self.clock.sleep(self.step_seconds)
        finally:
            with self.lock:
                self.active -= 1

    def create(self, server, disks, timeout):
        self.specs[server["name"]] = (server, disks)
        self._do("create", server["name"], timeout)

    def power_on(self, name, timeout):
        self._do("power_on", name, timeout)

    def power_off(self, name, timeout):
        self._do("power_off", name, timeout)

    def status(self, name, timeout):
        self._do("status", name, timeout)
        return {"name": name, "state": self.status_of.get(name, "running")}

    def destroy(self, name, timeout):
        self._do("destroy", name, timeout)

    def create_network(self, network, timeout):
        self.networks.append(("create_network", network))

    def destroy_network(self, name, timeout):
        self.networks.append(("destroy_network", name))


class FakeChecker(HealthChecker):
    """``answers[server]``: a list of (ok, output) used in turn (the last
    repeats); a server not in it passes at once."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.tries = {}
        self.lock = threading.Lock()

    def check(self, server, check, timeout):
        with self.lock:
            self.tries[server.name] = self.tries.get(server.name, 0) + 1
            queue = self.answers.get(server.name, [(True, "open")])
            return queue.pop(0) if len(queue) > 1 else queue[0]


class FakeScripts(ScriptRunner):
    def __init__(self, fail=()):
        self.ran, self.fail = [], fail

    def run(self, group, script, timeout):
        self.ran.append((group.name, script.command))
        return script.command not in self.fail, "ran %s" % script.command


def tcp(port=22, timeout=30, interval=5):
    return {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout_seconds": timeout, "interval_seconds": interval}


def plan(**group_changes):
    data = {
        "name": "shop",
        "groups": [
            {
                "name": "db",
                "pre": [{"command": "pre-db"}],
                "post": [{"command": "post-db"}],
                "servers": [{"name": "db1", "health_check": tcp(5432)}],
            },
            {
                "name": "app",
                "servers": [{"name": "app1", "health_check": tcp(8080)}, {"name": "app2", "health_check": tcp(8080)}],
            },
            {
                "name": "web",
                "parallel": False,
                "servers": [{"name": "web1", "health_check": tcp(80)}, {"name": "web2"}],
            },
        ],
    }
    for name, changes in group_changes.items():
        group = [g for g in data["groups"] if g["name"] == name][0]
        group.update(changes)
    return parse_plan(data)


def engine(the_plan, provider=None, checker=None, clock=None, **kwargs):
    clock = clock or Clock()
    kwargs.setdefault("scripts", FakeScripts())
    return PlanRun(
        the_plan, provider or FakeProvider(), checker or FakeChecker(), clock=clock, sleep=clock.sleep, **kwargs
    )


def test_groups_boot_in_order_and_a_sequential_group_one_server_at_a_time():
    provider, scripts = FakeProvider(), FakeScripts()
    result = engine(plan(), provider, scripts=scripts).run()
    assert result["ok"] and result["failed"] is None
    order = [s for step, s in provider.calls if step == "create"]
    assert set(order[1:3]) == {"app1", "app2"} and order[0] == "db1" and order[3:] == ["web1", "web2"]
    web = [c for c in provider.calls if c[1].startswith("web")]
    assert web == [("create", "web1"), ("power_on", "web1"), ("create", "web2"), ("power_on", "web2")]
    assert scripts.ran == [("db", "pre-db"), ("db", "post-db")]
    steps = [(s["step"], s["server"]) for s in result["timeline"] if s["group"] == "db"]
    assert steps == [("pre", None), ("create", "db1"), ("power_on", "db1"), ("health_check", "db1"), ("post", None)]
    assert result["state"].to_dict() == {
        "created": result["state"].created,
        "running": ["app1", "app2", "db1", "web1", "web2"],
        "healthy": ["app1", "app2", "db1", "web1", "web2"],
        "networks": [],
    }


def test_the_servers_of_a_group_boot_at_the_same_time():
    provider = FakeProvider()
    provider.gate = threading.Barrier(2)  # each create waits for the other: they must overlap
    the_plan = plan(db={"servers": [{"name": "db1"}, {"name": "db2"}]}, web={"parallel": True})  # two servers each
    result = engine(the_plan, provider).run()
    assert result["ok"], result["failed"]
    assert provider.max_active == 2


def test_a_group_with_parallel_false_does_not_overlap():
    provider = FakeProvider()
    provider.gate = threading.Barrier(2)
    try:
        result = engine(
            plan(db={"parallel": False, "servers": [{"name": "db1"}, {"name": "db2"}]}), provider, call_timeout=0.1
        ).run()
    finally:
        provider.gate.abort()
    assert not result["ok"]  # the first create waited for a second that never came at the same time
    assert provider.max_active == 1 and [c for c in provider.calls if c[0] == "create"] == [("create", "db1")]


def test_a_failing_health_check_stops_the_plan_and_names_the_server_and_the_check():
    checker = FakeChecker({"db1": [(False, "connect to 127.0.0.1:5432: connection refused")]})
    provider = FakeProvider()
    result = engine(plan(), provider, checker).run()
    assert not result["ok"] and result["rto_seconds"] is None
    failed = result["failed"]
    assert (failed["group"], failed["server"], failed["step"], failed["check"]) == (
        "db",
        "db1",
        "health_check",
        "tcp 127.0.0.1:5432",
    )
    assert "did not pass within its 30 s (6 tries)" in failed["output"]
    assert failed["output"].endswith("last: connect to 127.0.0.1:5432: connection refused")
    assert checker.tries["db1"] == 6  # at 0, 5, ... 25 s of the fake clock
    assert [c[1] for c in provider.calls] == ["db1", "db1"]  # nothing of app was started
    last = result["timeline"][-1]
    assert (last["step"], last["outcome"], last["seconds"]) == ("health_check", "timeout", 30.0)
    assert result["state"].to_dict() == {"created": ["db1"], "running": ["db1"], "healthy": [], "networks": []}


def test_in_a_parallel_group_the_running_boots_end_and_the_next_group_does_not_start():
    checker = FakeChecker({"app1": [(False, "HTTP 503")]})
    provider = FakeProvider()
    result = engine(plan(), provider, checker).run()
    assert result["failed"]["server"] == "app1"
    assert "app2" in result["state"].healthy and "app1" not in result["state"].healthy
    assert not [c for c in provider.calls if c[1].startswith("web")]


def test_a_hanging_provider_call_ends_at_its_timeout():
    provider = FakeProvider()
    provider.hang.add(("power_on", "db1"))
    started = time.monotonic()
    try:
        result = engine(plan(), provider, call_timeout=0.05).run()
    finally:
        provider.release.set()
    assert time.monotonic() - started < 2
    failed = result["failed"]
    assert (failed["server"], failed["step"]) == ("db1", "power_on")
    assert failed["output"] == "power_on of db1 did not return within 0.05 s"
    assert result["timeline"][-1]["outcome"] == "timeout"
    assert result["state"].created == ["db1"] and not result["state"].running


def test_a_provider_gets_less_time_than_its_step_so_its_own_timeout_says_why():
    provider = FakeProvider()
    provider.own_timeout.add(("power_on", "db1"))
    result = engine(plan(), provider, call_timeout=100).run()
    given = [t for step, name, t in provider.timeouts if (step, name) == ("power_on", "db1")]
    assert given == [95.0]  # 5 s before the step's guard (10 % of a short one)
    failed = result["failed"]
    assert (failed["server"], failed["step"]) == ("db1", "power_on")
    assert failed["output"] == "ProviderTimeout: vm 'db1': power_on: QEMU did not start within 95 s (its disks: nbd://x)"
    assert result["timeline"][-1]["outcome"] == "timeout"  # a timeout, though the provider said it


def test_a_hanging_check_and_a_provider_error_are_failed_steps():
    with pytest.raises(StepTimeout):
        call_with_timeout(threading.Event().wait, 0.02, 1)
    provider = FakeProvider()
    provider.fail[("create", "db1")] = "no space left on the datastore"
    result = engine(plan(), provider).run()
    assert result["failed"]["step"] == "create"
    assert result["failed"]["output"] == "RuntimeError: no space left on the datastore"
    assert result["state"].created == []


def test_the_group_timeout_bounds_the_whole_group():
    checker = FakeChecker({"db1": [(False, "refused")]})
    the_plan = plan(db={"timeout_seconds": 12, "servers": [{"name": "db1", "health_check": tcp(5432, timeout=300)}]})
    result = engine(the_plan, checker=checker).run()
    assert "did not pass within boot group db's 12 s" in result["failed"]["output"]
    assert result["timeline"][-1]["ended"] == 12.0


def test_a_failing_pre_script_boots_nothing():
    provider = FakeProvider()
    result = engine(plan(), provider, scripts=FakeScripts(fail=("pre-db",))).run()
    assert result["failed"] == {
        "group": "db",
        "server": None,
        "step": "pre",
        "check": None,
        "output": "pre-db: ran pre-db",
    }
    assert provider.calls == []


def test_the_timeline_and_the_rto_are_in_the_clocks_seconds():
    clock = Clock()
    provider = FakeProvider(clock, step_seconds=1.0)  # each provider call takes 1 s of the fake clock
    the_plan = plan(web={"parallel": False, "servers": [{"name": "web1", "delay_seconds": 3, "health_check": tcp(80)}]})
    result = engine(the_plan, provider, clock=clock).run()
    db = [s for s in result["timeline"] if s["server"] == "db1"]
    assert [(s["step"], s["started"], s["ended"]) for s in db] == [
        ("create", 0.0, 1.0),
        ("power_on", 1.0, 2.0),
        ("health_check", 2.0, 2.0),
    ]
    web = [s for s in result["timeline"] if s["server"] == "web1"]
    assert [s["step"] for s in web] == ["create", "power_on", "delay", "health_check"]
    assert web[2]["seconds"] == 3.0
    checks = [s["ended"] for s in result["timeline"] if s["step"] == "health_check"]
    assert result["rto_seconds"] == max(checks) == web[-1]["ended"]


def test_cleanup_destroys_what_was_created_in_reverse_and_twice_is_harmless():
    provider = FakeProvider()
    result = engine(plan(), provider, FakeChecker({"app2": [(False, "no")]})).run()
    state = result["state"]
    created = list(state.created)
    assert created[0] == "db1" and set(created[1:]) == {"app1", "app2"} and len(created) == 3
    provider.calls = []
    done = cleanup(plan(), provider, state)
    assert done["ok"] and done["errors"] == []
    expected = []
    for name in reversed(created):
        expected += [("power_off", name), ("destroy", name)]
    assert provider.calls == expected
    assert state.to_dict() == {"created": [], "running": [], "healthy": [], "networks": []}
    provider.calls = []
    assert cleanup(plan(), provider, state)["ok"] and provider.calls == []


def test_cleanup_goes_on_past_a_failure_and_keeps_what_it_could_not_destroy():
    provider = FakeProvider()
    state = PlanState(created=["db1", "app1"], running=["db1"])
    provider.fail[("destroy", "app1")] = "busy"
    done = cleanup(plan(), provider, state)
    assert done["errors"] == [{"server": "app1", "output": "RuntimeError: busy"}]
    assert provider.calls == [("destroy", "app1"), ("power_off", "db1"), ("destroy", "db1")]
    assert state.created == ["app1"]


def test_a_retry_continues_where_the_run_stopped():
    provider = FakeProvider()
    first = engine(plan(), provider, FakeChecker({"app1": [(False, "HTTP 503")]})).run()
    assert first["failed"]["server"] == "app1"
    state = PlanState.from_dict(first["state"].to_dict())  # as a later task would get it back
    provider.calls = []
    provider.status_of["app1"] = "running"
    again = engine(plan(), provider).run(state)
    assert again["ok"], again["failed"]
    assert [c for c in provider.calls if c[1] in ("db1", "app1", "app2")] == [
        ("status", "app1")
    ]  # nothing booted again
    skipped = [s["server"] for s in again["timeline"] if s["outcome"] == "skipped"]
    assert skipped == ["db1", "app2"] or sorted(skipped) == ["app2", "db1"]
    assert ("create", "web1") in provider.calls and state.healthy == {"db1", "app1", "app2", "web1", "web2"}


def test_a_retry_creates_again_a_server_whose_vm_is_gone():
    state = PlanState(created=["db1"], running=["db1"])
    provider = FakeProvider()
    provider.status_of["db1"] = "absent"
    result = engine(plan(), provider).run(state)
    assert result["ok"]
    assert [c for c in provider.calls if c[1] == "db1"] == [("status", "db1"), ("create", "db1"), ("power_on", "db1")]
    assert state.created.count("db1") == 1


def test_networks_come_first_servers_get_the_providers_spec_and_cleanup_removes_both():
    the_plan = parse_plan(
        {
            "name": "drill",
            "networks": {"drill": {"cidr": "10.99.0.0/24", "gateway": "10.99.0.1"}},
            "groups": [
                {
                    "name": "db",
                    "servers": [
                        {
                            "name": "db1",
                            "vcpus": 1,
                            "memory_mib": 256,
                            "nics": [{"network": "drill", "ip": "10.99.0.2/24"}],
                        }
                    ],
                }
            ],
        }
    )
    qemu = FakeProvider()
    result = PlanRun(
        the_plan, {"qemu": qemu}, FakeChecker(), disks=lambda s: ["nbd://tgt1:10809/app/db@3f9a2c01b7e4.1"]
    ).run()
    assert result["ok"], result["failed"]
    assert qemu.networks == [
        ("create_network", {"name": "drill", "cidr": "10.99.0.0/24", "isolated": True, "bridge": None})
    ]
    assert result["timeline"][0]["step"] == "network"
    spec, disks = qemu.specs["db1"]
    assert spec == {
        "name": "db1",
        "memory": 256,
        "cpus": 1,
        "nics": [{"network": "drill", "ip": "10.99.0.2/24", "gateway": "10.99.0.1", "mac": None}],
        "options": {},
    }
    assert disks == ["nbd://tgt1:10809/app/db@3f9a2c01b7e4.1"]
    done = cleanup(the_plan, {"qemu": qemu}, result["state"])
    assert done["ok"] and qemu.networks[-1] == ("destroy_network", "drill")
    assert result["state"].to_dict() == {"created": [], "running": [], "healthy": [], "networks": []}


def test_a_server_whose_provider_was_not_given_fails_at_create_naming_it():
    result = PlanRun(plan(), {"libvirt": FakeProvider()}, FakeChecker(), scripts=FakeScripts()).run()
    assert result["failed"]["step"] == "create" and "no provider 'qemu' was given" in result["failed"]["output"]
