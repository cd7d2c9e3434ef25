"""Failovers when things break, and nothing hangs.

- On real tiny VMs, through a real ``ansible-playbook`` play: production db1
  writes through a replication link with latency (a :class:`FaultProxy`
  delay both ways), the source site dies (its havend and the link killed),
  and an unplanned ``haven.dr.failover`` promotes the replica and boots db1:
  the loss window it reports is no longer than the lag measured just before,
  and the recovered disk holds exactly the writer's records up to a point at
  least as late as that window's start.
- Against real havend processes, the module run in this process with a stub
  provider (no VM is needed for these properties): a source that refuses or
  does not answer, a source that is hung, a provider call that never
  returns, a health check nobody answers, and a source killed in the middle
  of a planned failover's drain. Each ends within its timeouts, and its
  report names the node, server, step or check.

Root for the VM test (network namespaces, taps); minutes under TCG."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import MiB, Pair, app_group, make_token, start_pair
from recovery_app import App, build_image, plan, read_nbd, records, running_app, subnet
from test_qemu_provider import _collection_on_path
from waiting import wait_until

from havend.nbd.client import NBDClient

_collection_on_path()
from ansible.module_utils.testing import patch_module_args  # noqa: E402
from ansible_collections.haven.dr.plugins.modules import failover  # noqa: E402

# --- the module in this process, its servers nothing ------------------------------


class StubProvider:
    """A provider whose VMs are nothing: every call returns at once, but
    ``hang`` (a call's name) blocks until :meth:`release` (the test's
    finalizer): a provider call that never returns."""

    def __init__(self, hang: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.hang = hang
        self.released = threading.Event()

    def __getattr__(self, name: str) -> Any:
        if name == "network_command":  # no netns: the checks run here
            raise AttributeError(name)

        def call(*args: Any) -> bool:
            self.calls.append((name, *args[:-1]))
            if name == self.hang:
                self.released.wait(600)  # bounded, but far beyond any call_timeout here
            return True

        return call

    def status(self, name: str, timeout: float) -> dict[str, str]:
        return {"state": "absent"}

    def release(self) -> None:
        self.released.set()


def run_failover(
    monkeypatch: pytest.MonkeyPatch, provider: StubProvider, **args: Any
) -> tuple[dict, float]:
    """haven.dr.failover's result with ``args``, the plan's servers on
    ``provider``; and how long it took (seconds)."""
    monkeypatch.setattr(
        failover, "make_providers", lambda plan, state_dir, guest: {"qemu": provider}
    )
    out = io.StringIO()
    started = time.monotonic()
    with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        failover.main()
    return json.loads(out.getvalue()), time.monotonic() - started


def one_server_plan(port: int, timeout: float = 20) -> dict[str, Any]:
    """db1 alone, its check a TCP port on this host."""
    return {
        "name": "db-only",
        "networks": {"rec-lan": {"isolated": False, "cidr": "10.98.0.0/24"}},
        "groups": [
            {
                "name": "database",
                "servers": [
                    {
                        "name": "db1",
                        "nics": [{"network": "rec-lan", "ip": "10.98.0.11/24"}],
                        "health_check": {
                            "type": "tcp",
                            "host": "127.0.0.1",
                            "port": port,
                            "timeout_seconds": timeout,
                            "interval_seconds": 0.5,
                        },
                    }
                ],
            }
        ],
    }


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on (the kernel completes the handshake)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def blackhole(port: int) -> Iterator[socket.socket]:
    """``port`` listening and never accepting: a connect succeeds (the
    kernel's backlog), and nothing is ever answered."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        yield sock


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """src1 replicating group app (db1's 4 MiB db volume) to tgt1, through a
    fault proxy, both with their API; caught up. Whatever a test stopped is
    continued so that it can be stopped."""
    group = app_group(tmp_path, {"db": 4 * MiB})
    group["volumes"][0]["server"] = "db1"
    made = start_pair(tmp_path, [group], api=True, proxy=True, caught_up=60)
    try:
        yield made
    finally:
        for node in (made.source, made.target):
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
        made.stop()


def args_of(pair: Pair, tmp_path: Path, mode: str, **more: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens.json"  # made once: the source may be dead by the next run
    if not tokens.exists():
        tokens.write_text(
            json.dumps(
                {
                    "source": make_token(pair.source, "faults-src", "operate"),
                    "target": make_token(pair.target, "faults-tgt", "operate"),
                    "url": pair.source.address("api"),
                }
            )
        )
    made = json.loads(tokens.read_text())
    return {
        "url": made["url"],
        "token": made["source"],
        "recovery_url": pair.target.address("api"),
        "recovery_token": made["target"],
        "mode": mode,
        "state_dir": str(tmp_path / "failover-state"),
    } | more


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


def group_state(pair: Pair, node: str, tmp_path: Path) -> dict[str, Any]:
    made = json.loads((tmp_path / "tokens.json").read_text())
    proc = pair.source if node == "source" else pair.target
    answer = httpx.get(
        proc.address("api") + "/v1/groups/app",
        headers={"Authorization": "Bearer " + made[node]},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- an unreachable source --------------------------------------------------------


@pytest.mark.parametrize("how", ["refused", "blackhole"])
def test_a_planned_failover_with_the_source_unreachable_fails_naming_it_within_its_retries(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int, how: str
) -> None:
    args = args_of(
        pair, tmp_path, "planned", plan=one_server_plan(listening), request_timeout=3, retries=2
    )
    url = args["url"]
    pair.source.kill()
    provider = StubProvider()
    with blackhole(port_of(url)) if how == "blackhole" else contextlib.nullcontext():
        result, seconds = run_failover(monkeypatch, provider, **args)
    # At most every attempt's request_timeout and the backoffs between them
    # (0.5 s, 1 s): 10.5 s; +20 s for a loaded machine. A refusal is retried
    # at once, a request sent and not answered is not retried (never twice).
    assert seconds < 3 * 3 + 1.5 + 20, seconds
    assert result["failed"] is True, result
    assert url in result["msg"], result["msg"]
    reason = "refused" if how == "refused" else "no answer within 3 s"
    assert reason in result["msg"].lower(), result["msg"]
    if how == "blackhole":
        assert seconds >= 3 - 0.1, seconds  # it did wait for an answer
    assert provider.calls == []  # nothing booted
    assert group_state(pair, "target", tmp_path)["state"] != "failed_over"


@pytest.mark.parametrize("how", ["blackhole", "stopped"])
def test_an_unplanned_failover_completes_with_the_source_not_answering(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int, how: str
) -> None:
    """The source's API accepts and never answers: a socket nobody accepts on
    where it listened (its process killed), or its process stopped (SIGSTOP:
    a hung machine, its replication connection still open)."""
    args = args_of(pair, tmp_path, "unplanned", plan=one_server_plan(listening), source_timeout=3)
    provider = StubProvider()
    if how == "stopped":
        os.kill(pair.source.proc.pid, signal.SIGSTOP)
        hole = contextlib.nullcontext()
    else:
        pair.source.kill()
        hole = blackhole(port_of(args["url"]))
    with hole:
        result, seconds = run_failover(monkeypatch, provider, **args)
    assert not result.get("failed"), json.dumps(result, indent=1)[-4000:]
    assert result["passed"] is True and result["changed"] is True
    probe = next(s for s in result["timeline"] if s["step"] == "source")
    assert "the source node is gone" in probe["output"]
    assert "no answer within 3 s" in probe["output"], probe
    # the probe waits source_timeout once (no retry), +5 s for a loaded machine
    assert 3 - 0.1 <= probe["seconds"] < 3 + 5, probe
    # the whole run: the probe, a promotion of a caught-up 4 MiB group and a
    # boot of nothing; 60 s is far beyond what that takes even under load
    assert seconds < 3 + 60, seconds
    promote = next(s for s in result["timeline"] if s["step"] == "promote")
    assert promote["outcome"] == "ok" and promote["group"] == "app"
    assert result["rpo"]["app"]["from_seq"] is not None
    assert [c[0] for c in provider.calls] == ["create_network", "create", "power_on"]
    assert group_state(pair, "target", tmp_path)["state"] == "failed_over"


def test_an_unplanned_failover_with_the_recovery_node_down_fails_naming_it(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    args = args_of(
        pair,
        tmp_path,
        "unplanned",
        plan=one_server_plan(listening),
        source_timeout=3,
        request_timeout=3,
        retries=2,
    )
    pair.source.kill()
    pair.target.kill()
    provider = StubProvider()
    result, seconds = run_failover(monkeypatch, provider, **args)
    # the source's probe (refused at once, not retried), then the recovery
    # node's first request: refused, retried after 0.5 s and 1 s; +20 s under load
    assert seconds < 3 + 1.5 + 20, seconds
    assert result["failed"] is True, result
    assert args["recovery_url"] in result["msg"] and "refused" in result["msg"], result["msg"]
    assert provider.calls == []


# --- a provider call that never returns, a check nobody answers -------------------


def promoted(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """The source killed, the replica promoted (a first unplanned run)."""
    pair.source.kill()
    first, _ = run_failover(
        monkeypatch,
        StubProvider(),
        **args_of(pair, tmp_path, "unplanned", plan=one_server_plan(port)),
    )
    assert first["passed"], json.dumps(first, indent=1)[-3000:]


def test_a_provider_call_that_never_returns_times_out_naming_the_server_and_the_call(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    args = args_of(
        pair,
        tmp_path,
        "unplanned",
        plan=one_server_plan(listening),
        call_timeout=4,
        state_dir=str(tmp_path / "hanging"),
    )
    pair.source.kill()
    provider = StubProvider(hang="power_on")
    try:
        result, seconds = run_failover(monkeypatch, provider, **args)
    finally:
        provider.release()
    assert result["failed"] is True and result["passed"] is False, result
    failure = result["failure"]
    assert (failure["server"], failure["step"]) == ("db1", "power_on"), failure
    assert "did not return within 4 s" in failure["output"], failure
    assert "db1" in result["msg"] and "power_on" in result["msg"], result["msg"]
    step = next(s for s in result["timeline"] if s["step"] == "power_on")
    assert step["outcome"] == "timeout", step
    # call_timeout, measured by the engine's own clock; +5 s for a loaded machine
    assert 4 - 0.1 <= step["seconds"] < 4 + 5, step
    assert seconds < 4 + 60, seconds
    assert result["left"]["created"] == ["db1"] and result["left"]["running"] == []
    # the group is promoted: a retry does not promote it again, and boots on
    again, _ = run_failover(monkeypatch, StubProvider(), **args)
    assert again["passed"], json.dumps(again, indent=1)[-3000:]
    assert next(s for s in again["timeline"] if s["step"] == "promote")["outcome"] == "skipped"


def test_a_health_check_nobody_answers_fails_in_its_timeout_naming_the_check(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    promoted(pair, tmp_path, monkeypatch, listening)
    port = closed_port()
    args = args_of(
        pair,
        tmp_path,
        "unplanned",
        plan=one_server_plan(port, timeout=4),
        state_dir=str(tmp_path / "unanswered"),
    )
    result, seconds = run_failover(monkeypatch, StubProvider(), **args)
    assert result["failed"] is True and result["passed"] is False, result
    failure = result["failure"]
    check = f"tcp 127.0.0.1:{port}"
    assert (failure["server"], failure["step"], failure["check"]) == ("db1", "health_check", check)
    assert "did not pass within its 4 s" in failure["output"], failure
    assert "refused" in failure["output"].lower(), failure
    assert check in result["msg"] and "db1" in result["msg"], result["msg"]
    step = next(s for s in result["timeline"] if s["step"] == "health_check")
    assert step["outcome"] == "timeout"
    # the check's timeout, then at most one try's own bound; +5 s under load
    assert 4 - 0.1 <= step["seconds"] < 4 + 5, step
    assert seconds < 4 + 60, seconds


# --- a node that dies mid-operation -----------------------------------------------


def test_the_source_killed_during_a_planned_failovers_drain(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    """The link is cut (held) with 4 MiB in the journal, a planned failover
    starts draining, and the source is killed: the task ends within its
    request bounds naming the source; once the source is back, running it
    again says why it cannot yet (the group stays fenced until the link tells
    whether the target was promoted), and once the link heals it fails over
    without loss."""
    assert pair.proxy is not None
    args = args_of(
        pair,
        tmp_path,
        "planned",
        plan=one_server_plan(listening),
        request_timeout=3,
        retries=2,
        operation_timeout=120,
    )
    pair.proxy.partition()
    nbd = NBDClient.open(pair.source.address("nbd") + "/db")
    try:
        for i in range(16):  # 4 MiB the target has not got
            nbd.write(i * 256 * 1024, bytes([i + 1]) * (256 * 1024))
        nbd.flush()
    finally:
        nbd.close()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"], box["seconds"] = run_failover(monkeypatch, StubProvider(), **args)
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(
        lambda: (
            (group_state(pair, "source", tmp_path).get("fence") or {}).get("stage") == "draining"
        ),
        30,
        "the planned failover to fence the group and drain",
    )
    killed = time.monotonic()
    pair.source.kill()
    # the module polls the operation at most 1 s apart; a refused poll is retried
    # twice (0.5 s + 1 s) before it gives up; +20 s for a loaded machine
    thread.join(3 + 0.5 + 1.5 + 20)
    assert not thread.is_alive(), "the failover task did not end after its source was killed"
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert time.monotonic() - killed < 3 + 0.5 + 1.5 + 20
    assert result["failed"] is True and result["passed"] is False, result
    failure = result["failure"]
    assert (failure["step"], failure["group"]) == ("failover", "app"), failure
    assert args["url"] in failure["output"], failure
    # the poll in flight when it died is cut (reset, closed), the next ones refused
    cut = r"refused|reset|closed|aborted|disconnected"
    assert re.search(cut, failure["output"].lower()), failure
    assert args["url"] in result["msg"] and "at failover" in result["msg"], result["msg"]
    assert group_state(pair, "target", tmp_path)["state"] != "failed_over"

    # the source back, the link still cut: it cannot know whether the target
    # was promoted, and a run again says so
    pair.source.start()
    args["url"] = pair.source.address("api")  # its API on a new port (port 0 in the test)
    refused, _ = run_failover(monkeypatch, StubProvider(), **args)
    assert refused["failed"] is True, refused
    assert (
        "409: group app is fenced already: a planned failover that an earlier run" in refused["msg"]
    ), refused["msg"]
    assert "left at draining" in refused["msg"] and "then run again" in refused["msg"]
    # the link healed, its first session tells the target was not promoted: the
    # fence is called off, and the task run again converges
    pair.proxy.heal()
    wait_until(
        lambda: group_state(pair, "source", tmp_path).get("fence") is None,
        60,
        "the restarted source to call the interrupted failover off",
        detail=lambda: pair.source.log()[-3000:],
    )
    again, _ = run_failover(monkeypatch, StubProvider(), **args)
    assert not again.get("failed"), again["msg"]
    assert again["passed"] and again["rpo"]["app"]["writes"] == 0
    assert again["rpo"]["app"]["final_seq"] == again["rpo"]["app"]["target_applied_seq"]
    assert group_state(pair, "target", tmp_path)["state"] == "failed_over"
    promoted_db = next(
        v["uri"]
        for v in httpx.get(
            pair.target.address("api") + "/v1/volumes",
            headers={"Authorization": "Bearer " + args["recovery_token"]},
            timeout=10,
        ).json()
        if v["name"] == "db"
    )
    data = read_nbd(promoted_db, 0, 4 * MiB)
    assert all(data[i * 256 * 1024] == i + 1 for i in range(16))  # every write of the drain


# --- the VM test: an unplanned failover's loss window ------------------------------

DELAY = 0.4  # the link's latency, each way


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    return build_image()


@pytest.fixture
def app(tmp_path: Path, image: dict[str, str]) -> Iterator[App]:
    with running_app(tmp_path, image, servers=["db1"], proxy=True) as made:
        yield made


@pytest.mark.timeout(900)
def test_an_unplanned_failover_loses_no_more_than_the_lag_measured_before(app: App) -> None:
    proxy = app.pair.proxy
    assert proxy is not None
    args = app.connection(roles={"db1": "tcp:5432"})  # the recovered db1 writes nothing
    proxy.delay(DELAY)
    time.sleep(5)  # the lag settles at the link's round trip
    # (wall time, the last write db1 acknowledged by then, the source's lag)
    samples: list[tuple[float, int, float]] = []
    end = time.monotonic() + 6
    while time.monotonic() < end:
        lag = app.src.get("/v1/groups/app").json()["lag_seconds"]
        samples.append((time.time(), max(app.acks()), lag))
        time.sleep(0.1)
    lag = max(s[2] for s in samples[-30:])  # the last 3 s
    # the disaster: the source node and its link gone at once
    app.pair.source.kill()
    proxy.stop()
    acks = app.acks()
    assert lag >= DELAY, samples[-30:]  # the latency is there to be measured
    dr_net, dr_sub = "r" + os.urandom(4).hex(), subnet()
    failed_over = app.play(
        "unplanned",
        "haven.dr.failover",
        args
        | {
            "mode": "unplanned",
            "state_dir": str(app.tmp / "failover-state"),
            "plan": plan(
                "shop",
                {dr_net: {"isolated": False, "cidr": f"{dr_sub}.0/24"}},
                dr_net,
                dr_sub,
                servers=["db1"],
            ),
        },
    )
    assert not failed_over.get("failed"), json.dumps(failed_over, indent=1)[-5000:]
    assert failed_over["passed"] and failed_over["changed"]
    gone = next(s for s in failed_over["timeline"] if s["step"] == "source")
    assert "the source node is gone" in gone["output"], gone
    check = next(s for s in failed_over["timeline"] if s["step"] == "health_check")
    assert (check["server"], check["outcome"]) == ("db1", "ok"), check
    window = failed_over["rpo"]["app"]
    print(f"lag measured before {lag:.3f} s, loss window {window}")  # -rP shows it
    assert window["writes"] is None and window["from_time"] and window["last_heard"]
    assert window["seconds"] == pytest.approx(window["last_heard"] - window["from_time"], abs=1e-3)
    # At least the link's one-way latency: the last write applied spent DELAY
    # in the proxy before it arrived, and last_heard is no earlier than that.
    assert window["seconds"] >= DELAY - 0.05, window
    # At most the lag measured just before, plus the tolerance of how the
    # proxy delays: it holds one chunk at a time per direction, so a frame may
    # wait behind the chunk held before it (one more DELAY) and the lag we
    # sampled every 0.1 s swings by that much between samples; plus the gap
    # between two of db1's writes (0.2 s sleep + dd + sync under TCG: 1 s).
    # The window runs from the last write applied to the last frame heard, and
    # the next write after it was unacknowledged at that moment: window <= lag
    # of that moment + the gap between two writes.
    assert window["seconds"] <= lag + DELAY + 1.0, (window, lag, samples[-30:])

    # the recovered disk: the writer's records 1..N, nothing missing, nothing
    # after what db1 could have written
    on_disk = records(app.read_target("db", 0, MiB))
    seqs = sorted(on_disk.values())
    assert seqs, "no record on the promoted db volume"
    top = seqs[-1]
    assert seqs == list(range(max(1, top - 2047), top + 1)), seqs[-20:]
    assert all(on_disk[sector] % 2048 == sector for sector in on_disk)
    assert top <= max(acks) + 1, (top, max(acks))  # at most the write in flight
    # every write db1 acknowledged before from_time (the source's clock of the
    # last write applied) was journaled before it, so it was applied
    before = [s for s in samples if s[0] <= window["from_time"]]
    assert before, (window, samples[:3])
    assert top >= before[-1][1], (top, before[-1], window)
