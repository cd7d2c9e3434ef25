# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Running a recovery plan, whatever boots the servers (internal use only).

``PlanRun(plan, provider, checker)`` boots the plan's groups in order, the
servers of a group in parallel (threads) unless the group says otherwise,
and gates each group on its servers' health checks. A server's boot is
create, power on, its delay, then its health check polled until it passes
or its timeout ends; the group's timeout bounds the whole group (its pre
and post scripts too). Every provider, checker and script call is bounded
by a timeout: a call that does not return in time is a failed step (its
thread is left behind, a daemon).

On the first failure no new work starts; the boots already running end
(each within its own timeouts) and the result names the failed server, the
failed step or check, and its last output. ``PlanState`` records what was
created and what passed its check: ``cleanup(provider, state)`` destroys
exactly that, in reverse order (twice is harmless), and a run given the
state of an earlier one continues it (healthy servers are not booted
again). Times are the injected monotonic clock's, in seconds from the
run's start; the RTO is the start to the last health check passed.

Nothing here knows a VM: providers implement ``providers._base.Provider``
(calls by VM name, each with a timeout; ``create(server_spec(...), disks)``,
``status(name)["state"]``), health checks and script runners the small
interfaces below. ``providers`` is one provider or a mapping from a plan's
provider name (``qemu``, ``libvirt``) to one.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import abc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.haven.dr.plugins.module_utils.providers._base import ABSENT, RUNNING, ProviderTimeout

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"


class StepTimeout(Exception):
    """A provider, checker or script call did not return within its time."""


# The interfaces ------------------------------------------------------------------


def server_spec(plan, server):
    """The provider's server dict (``providers/_base.py``) of a plan's ``Server``."""
    nics = []
    for nic in server.nics:
        network = plan.networks[nic.network]
        nics.append({"network": nic.network, "ip": nic.ip, "gateway": network.gateway, "mac": nic.mac})
    return {"name": server.name, "memory": server.memory_mib, "cpus": server.vcpus, "nics": nics, "options": {}}


def network_spec(network):
    """The provider's network dict of a plan's ``Network``."""
    return {"name": network.name, "cidr": network.cidr, "isolated": network.isolated, "bridge": network.bridge}


class HealthChecker(abc.ABC):
    """Runs one health check once."""

    @abc.abstractmethod
    def check(self, server, check, timeout):
        """``(ok, output)``: whether ``check`` (a ``HealthCheck``) passes now,
        and what it saw (kept for the report)."""


class ScriptRunner(abc.ABC):
    """Runs a group's pre and post scripts."""

    @abc.abstractmethod
    def run(self, group, script, timeout):
        """``(ok, output)`` of ``script`` (a ``Script``)."""


class NoScripts(ScriptRunner):
    """For plans without scripts: one that has a script fails plainly."""

    def run(self, group, script, timeout):
        return False, "no script runner was given to run %r" % script.command


# What was done ---------------------------------------------------------------------


class PlanState:
    """What a run created and what passed its check, per server name:
    ``created`` (in creation order), ``running``, ``healthy``. Plain data
    (``to_dict``/``from_dict``) so a later task can retry or clean up."""

    def __init__(self, created=None, running=None, healthy=None, networks=None):
        self.created = list(created or [])
        self.running = set(running or [])
        self.healthy = set(healthy or [])
        self.networks = [list(n) for n in networks or []]  # [provider, network], in creation order
        self.lock = threading.Lock()

    def to_dict(self):
        return {
            "created": list(self.created),
            "running": sorted(self.running),
            "healthy": sorted(self.healthy),
            "networks": [list(n) for n in self.networks],
        }

    @classmethod
    def from_dict(cls, data):
        data = data or {}
        return cls(data.get("created"), data.get("running"), data.get("healthy"), data.get("networks"))


def provider_for(providers, kind):
    """The provider of a plan's provider name: ``providers`` is one or a mapping."""
    if isinstance(providers, dict):
        if kind not in providers:
            raise KeyError("no provider %r was given (given: %s)" % (kind, ", ".join(sorted(providers))))
        return providers[kind]
    return providers


class Timeline:
    """The steps of a run, each ``{step, group, server, started, ended,
    seconds, outcome, output}``, times in seconds since the run's start."""

    def __init__(self, clock):
        self._clock = clock
        self.origin = clock()
        self.steps = []
        self._lock = threading.Lock()

    def now(self):
        return self._clock() - self.origin

    def record(self, step, group, server, started, outcome, output=""):
        ended = self.now()
        entry = {
            "step": step,
            "group": group,
            "server": server,
            "started": round(started, 6),
            "ended": round(ended, 6),
            "seconds": round(ended - started, 6),
            "outcome": outcome,
            "output": output,
        }
        with self._lock:
            self.steps.append(entry)
        return entry


def provider_time(timeout):
    """The time a provider call is given within a step of ``timeout`` seconds:
    a little less, so that the provider's own timeout (which says what it was
    waiting for, and cleans up) ends the call before the step's guard does."""
    return max(timeout * 0.9, timeout - 5.0)


def call_with_timeout(func, timeout, *args):
    """``func(*args)``'s value, in a daemon thread given ``timeout`` seconds;
    ``StepTimeout`` if it has not returned by then (the thread runs on)."""
    box = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = func(*args)
        except Exception as exc:  # pylint: disable=broad-except
            box["error"] = exc
        done.set()

    thread = threading.Thread(target=target, name="haven-plan-step")
    thread.daemon = True
    thread.start()
    if not done.wait(max(0.0, timeout)):
        raise StepTimeout("did not return within %g s" % timeout)
    if "error" in box:
        raise box["error"]
    return box.get("value")


# The run ----------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, step, output, check=None):
        super(_Failure, self).__init__(output)
        self.step = step
        self.output = output
        self.check = check


class PlanRun:
    """One run of ``plan`` (a resolved ``_plan.Plan``) on ``providers``.
    ``disks(server)`` gives what ``provider.create`` boots from (the NBD URIs
    of the exports opened for it, boot disk first); ``call_timeout`` bounds each provider call (and the
    group's deadline bounds everything); ``clock`` is monotonic seconds,
    ``sleep`` waits (both injectable for tests)."""

    def __init__(
        self,
        plan,
        providers,
        checker,
        scripts=None,
        disks=None,
        call_timeout=300.0,
        clock=time.monotonic,
        sleep=None,
        log=None,
    ):
        self.plan = plan
        self.providers = providers
        self.checker = checker
        self.scripts = scripts or NoScripts()
        self.disks = disks or (lambda server: [d.volume for d in server.disks or []])
        self.call_timeout = float(call_timeout)
        self.clock = clock
        self.sleep = sleep or time.sleep
        self.stop = threading.Event()  # set at the first failure: start nothing new
        self._lock = threading.Lock()
        self.log = log or (lambda line: None)

    def run(self, state=None):
        """Boot the plan; ``state`` of an earlier run continues it. Returns
        ``{ok, failed, timeline, state, rto_seconds, seconds}``: ``failed``
        is None or ``{group, server, step, check, output}`` of the first
        failure; ``state`` what exists now (``PlanState``)."""
        self.stop.clear()
        state = state or PlanState()
        timeline = Timeline(self.clock)
        failures = []
        self._networks(state, timeline, failures)
        for group in self.plan.groups:
            if failures:
                break
            self._run_group(group, state, timeline, failures)
        passed = [s["ended"] for s in timeline.steps if s["step"] == "health_check" and s["outcome"] == OK]
        ok = not failures
        return {
            "ok": ok,
            "failed": failures[0] if failures else None,
            "timeline": timeline.steps,
            "state": state,
            "rto_seconds": (max(passed) if passed else timeline.now()) if ok else None,
            "seconds": round(timeline.now(), 6),
        }

    def _networks(self, state, timeline, failures):
        """The plan's networks, on every provider its servers use, before any server."""
        wanted = sorted(set(n.network for s in self.plan.servers() for n in s.nics))
        for kind in sorted(set(s.provider for s in self.plan.servers())):
            provider = self.providers.get(kind) if isinstance(self.providers, dict) else self.providers
            if provider is None:
                continue  # the servers on it fail at their create, naming it
            for name in wanted:
                if [kind, name] in state.networks:
                    continue
                started = timeline.now()
                spec = network_spec(self.plan.networks[name])
                try:
                    call_with_timeout(provider.create_network, self.call_timeout, spec, provider_time(self.call_timeout))
                except Exception as exc:  # pylint: disable=broad-except
                    output = "network %s: %s: %s" % (name, type(exc).__name__, exc)
                    timeline.record(
                        "network", None, None, started, TIMEOUT if isinstance(exc, StepTimeout) else FAILED, output
                    )
                    self.stop.set()
                    failures.append({"group": None, "server": None, "step": "network", "check": None, "output": output})
                    return
                state.networks.append([kind, name])
                timeline.record("network", None, None, started, OK, name)

    def _fail(self, failures, group, server, failure):
        self.stop.set()
        entry = {
            "group": group.name,
            "server": server,
            "step": failure.step,
            "check": failure.check,
            "output": failure.output,
        }
        with self._lock:  # in the order they happened: the first is the report's
            failures.append(entry)
        self.log("plan %s: %s failed at %s: %s" % (self.plan.name, server or group.name, failure.step, failure.output))

    def _run_group(self, group, state, timeline, failures):
        deadline = self.clock() + group.timeout_seconds
        try:
            for script in group.pre:
                self._script(group, "pre", script, deadline, timeline)
        except _Failure as exc:
            self._fail(failures, group, None, exc)
            return
        if group.parallel and len(group.servers) > 1:
            pool = ThreadPoolExecutor(max_workers=len(group.servers))
            try:
                futures = [
                    pool.submit(self._boot, group, s, deadline, state, timeline, failures) for s in group.servers
                ]
                for future in futures:
                    future.result()  # _boot bounds itself and reports its failure
            finally:
                pool.shutdown(wait=True)
        else:
            for server in group.servers:
                if self.stop.is_set():
                    break
                self._boot(group, server, deadline, state, timeline, failures)
        if failures:
            return
        try:
            for script in group.post:
                self._script(group, "post", script, deadline, timeline)
            if group.delay_seconds:
                started = timeline.now()
                self.sleep(min(group.delay_seconds, self._left(deadline, group)))
                timeline.record("delay", group.name, None, started, OK)
        except _Failure as exc:
            self._fail(failures, group, None, exc)

    def _left(self, deadline, group):
        left = deadline - self.clock()
        if left <= 0:
            raise _Failure("timeout", "boot group %s ran out of its %g s" % (group.name, group.timeout_seconds))
        return left

    def _script(self, group, when, script, deadline, timeline):
        started = timeline.now()
        try:
            timeout = min(script.timeout_seconds, self._left(deadline, group))
            ok, output = call_with_timeout(self.scripts.run, timeout, group, script, provider_time(timeout))
        except StepTimeout as exc:
            timeline.record(when, group.name, None, started, TIMEOUT, "%s: %s" % (script.command, exc))
            raise _Failure(when, "%s %s" % (script.command, exc))
        except _Failure:
            raise
        except Exception as exc:  # pylint: disable=broad-except
            ok, output = False, "%s: %s" % (type(exc).__name__, exc)
        timeline.record(when, group.name, None, started, OK if ok else FAILED, output)
        if not ok:
            raise _Failure(when, "%s: %s" % (script.command, output))

    def _boot(self, group, server, deadline, state, timeline, failures):
        """One server up and healthy (True), or its failure reported (False)."""
        try:
            if server.name in state.healthy:
                timeline.record("boot", group.name, server.name, timeline.now(), SKIPPED, "healthy in an earlier run")
                return True
            with state.lock:
                created = server.name in state.created
            try:
                provider = provider_for(self.providers, server.provider)
            except KeyError as exc:
                raise _Failure("create", str(exc.args[0]))
            if created:
                status = self._call("status", group, server, deadline, timeline, provider.status, server.name)
                status = status.get("state") if isinstance(status, dict) else status
                if status == ABSENT:
                    with state.lock:
                        state.created.remove(server.name)
                        state.running.discard(server.name)
                    created = False
                elif status == RUNNING:
                    with state.lock:
                        state.running.add(server.name)
            if not created:
                self._call(
                    "create",
                    group,
                    server,
                    deadline,
                    timeline,
                    provider.create,
                    server_spec(self.plan, server),
                    self.disks(server),
                )
                with state.lock:
                    state.created.append(server.name)
            if server.name not in state.running:
                self._call("power_on", group, server, deadline, timeline, provider.power_on, server.name)
                with state.lock:
                    state.running.add(server.name)
            if server.delay_seconds:
                started = timeline.now()
                self.sleep(min(server.delay_seconds, self._left(deadline, group)))
                timeline.record("delay", group.name, server.name, started, OK)
            self._health(group, server, deadline, timeline)
            with state.lock:
                state.healthy.add(server.name)
            return True
        except _Failure as exc:
            self._fail(failures, group, server.name, exc)
            return False

    def _call(self, step, group, server, deadline, timeline, func, *args):
        started = timeline.now()
        timeout = min(self.call_timeout, self._left(deadline, group))
        try:
            value = call_with_timeout(func, timeout, *args + (provider_time(timeout),))
        except StepTimeout as exc:
            timeline.record(step, group.name, server.name, started, TIMEOUT, str(exc))
            raise _Failure(step, "%s of %s %s" % (step, server.name, exc))
        except Exception as exc:  # pylint: disable=broad-except
            output = "%s: %s" % (type(exc).__name__, exc)
            outcome = TIMEOUT if isinstance(exc, ProviderTimeout) else FAILED
            timeline.record(step, group.name, server.name, started, outcome, output)
            raise _Failure(step, output)
        timeline.record(step, group.name, server.name, started, OK)
        return value

    def _health(self, group, server, deadline, timeline):
        check = server.health_check
        started = timeline.now()
        if check is None:
            timeline.record("health_check", group.name, server.name, started, OK, "no health check: up once powered on")
            return
        name = check.describe()
        until = min(self.clock() + check.timeout_seconds, deadline)
        output, tries = "", 0
        while True:
            left = until - self.clock()
            if left <= 0:
                why = (
                    "its %g s" % check.timeout_seconds
                    if until < deadline
                    else "boot group %s's %g s" % (group.name, group.timeout_seconds)
                )
                timeline.record("health_check", group.name, server.name, started, TIMEOUT, output)
                raise _Failure(
                    "health_check",
                    "%s did not pass within %s (%d tries); last: %s" % (name, why, tries, output),
                    check=name,
                )
            tries += 1
            try:
                ok, output = call_with_timeout(self.checker.check, left, server, check, provider_time(left))
            except StepTimeout as exc:
                ok, output = False, "the check %s" % exc
            except Exception as exc:  # pylint: disable=broad-except
                ok, output = False, "%s: %s" % (type(exc).__name__, exc)
            if ok:
                timeline.record("health_check", group.name, server.name, started, OK, output)
                return
            wait = min(check.interval_seconds, until - self.clock())
            if wait > 0:
                self.sleep(wait)


def cleanup(plan, providers, state, call_timeout=300.0, clock=time.monotonic):
    """Destroy what ``state`` says was created, in reverse order: power off
    what runs, then destroy; then the networks made. Idempotent: what is
    destroyed leaves the state, so a second call does nothing. Goes on past
    a failure (that one stays in the state). Returns ``{ok, timeline,
    errors, state}``."""
    servers = dict((s.name, s) for s in plan.servers())
    timeline = Timeline(clock)
    errors = []
    for name in list(reversed(state.created)):
        server = servers.get(name)
        if server is None:
            errors.append({"server": name, "output": "not in the plan: cannot destroy it"})
            continue
        try:
            provider = provider_for(providers, server.provider)
            if name in state.running:
                _undo_step(timeline, "power_off", name, provider.power_off, call_timeout)
                state.running.discard(name)
            _undo_step(timeline, "destroy", name, provider.destroy, call_timeout)
        except Exception as exc:  # pylint: disable=broad-except
            errors.append({"server": name, "output": "%s: %s" % (type(exc).__name__, exc)})
            continue
        state.created.remove(name)
        state.healthy.discard(name)
    if not state.created:  # a network goes once no server of the run is left on it
        for kind, network in list(reversed(state.networks)):
            try:
                _undo_step(
                    timeline, "destroy_network", network, provider_for(providers, kind).destroy_network, call_timeout
                )
            except Exception as exc:  # pylint: disable=broad-except
                errors.append({"server": None, "output": "network %s: %s: %s" % (network, type(exc).__name__, exc)})
                continue
            state.networks.remove([kind, network])
    return {"ok": not errors, "timeline": timeline.steps, "errors": errors, "state": state}


def _undo_step(timeline, step, name, func, timeout):
    started = timeline.now()
    try:
        call_with_timeout(func, timeout, name, provider_time(timeout))
    except Exception as exc:
        timeline.record(step, None, name, started, TIMEOUT if isinstance(exc, StepTimeout) else FAILED, str(exc))
        raise
    timeline.record(step, None, name, started, OK)
