"""Each module's EXAMPLES, as written in the module's file, run as a play by
``ansible-playbook`` against a real source and target havend (TLS, tokens).

The text is read from the module file (its ``EXAMPLES`` string, found with
ast: nothing is imported), wrapped as ``hosts: localhost, gather_facts:
false, tasks: <examples>``, and run with the source node's connection in
the environment (HAVEN_URL, HAVEN_TOKEN of the admin scope, HAVEN_CA_PATH),
as an AWX credential gives it. What else an example names is set up here:
group ``app`` (volumes ``db`` and ``log``, freeze and thaw hooks) and the
variables of ``EXAMPLE_VARS`` (the recovery site's node, directories).
Examples that need a state run after those that make it (a checkpoint
before the exports of it); group_operation's fail the group over and
back, last."""

from __future__ import annotations

import ast
import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from plays import ROOT, Sites, ansible, ansible_env, collection_sites
from test_hypervisor_mirror import Vm
from test_qemu_provider import _collection_on_path

sys.path.insert(0, str(ROOT / "tools"))
import guest_image

_collection_on_path()
from ansible_collections.haven.dr.plugins.module_utils._recovery import (  # noqa: E402
    cache_dir,
)
from ansible_collections.haven.dr.plugins.module_utils.providers import (  # noqa: E402
    get_provider,
)

FAILOVERS = Path(cache_dir("failovers"))
SHOP_SUBNET = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"

MODULES = ROOT / "plugins" / "modules"
# In this order: each one's examples find what the ones before left.
ORDER = [
    "node_info",
    "node_pair",
    "api_token",
    "replication_info",
    "protection_group",
    "checkpoint",  # takes before-upgrade-2026-12 with the hooks
    "checkpoint_info",  # finds it on the target
    "pit_export",  # exports the db volume as of it
    "recovery_plan",  # validates a plan of db1.example.com against both nodes
    "drill",  # boots db1.example.com from the latest checkpoint, isolated, and tears it down
    "failover",  # stops production db1.example.com, fails group app over, boots the shop plan
    "failback",  # brings app home, boots production db1.example.com again
    "protected_server",  # makes group crm, adds a server's disks to it, removes them
    "qemu_mirror_info",  # the disk of web1, a VM on its local disk here
    "qemu_mirror",  # web1's disk in group crm, mirrored onto its export, then not
    "group_operation",  # failover, then failback: last
]


def examples(module: str) -> str:
    """The ``EXAMPLES`` string of ``plugins/modules/<module>.py``."""
    tree = ast.parse((MODULES / f"{module}.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["EXAMPLES"]
            and isinstance(node.value, ast.Constant)
        ):
            return node.value.value
    raise AssertionError(f"{module} has no EXAMPLES string")


PRODUCTION = "ex" + secrets.token_hex(3)  # the production network of db1.example.com
RECOVERY = "er" + secrets.token_hex(3)  # the shop plan's network at the recovery site


def shop_plan(sub: str) -> dict:
    return {
        "name": "shop-examples",
        "networks": {RECOVERY: {"isolated": False, "cidr": f"{sub}.0/24"}},
        "groups": [
            {
                "name": "db",
                "servers": [
                    {
                        "name": "db1.example.com",
                        "vcpus": 1,
                        "memory_mib": 192,
                        "nics": [{"network": RECOVERY, "ip": f"{sub}.11/24"}],
                        "health_check": {
                            "type": "tcp",
                            "port": 5432,
                            "timeout_seconds": 180,
                            "interval_seconds": 1,
                        },
                    }
                ],
            }
        ],
    }


def boot_production(sites: Sites) -> None:
    """db1.example.com running at the production site on the source node's
    exports of db and log (qemu provider, ``production`` state dir)."""
    image = guest_image.build().as_dict()
    prod = get_provider("qemu", state_dir=str(sites.tmp / "production"), image=image)
    sub = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    prod.create_network({"name": PRODUCTION, "cidr": f"{sub}.0/24", "isolated": False}, 30)
    nbd = sites.pair.source.address("nbd")
    prod.create(
        {
            "name": "db1.example.com",
            "memory": 192,
            "role": "tcp:5432",
            "nics": [{"network": PRODUCTION, "ip": f"{sub}.11/24"}],
        },
        [f"{nbd}/db", f"{nbd}/log"],
        30,
    )
    prod.power_on("db1.example.com", 120)


def destroy_vms(*state_dirs: Path) -> None:
    for where in state_dirs:
        left = get_provider("qemu", state_dir=str(where), image={})
        for name in left.list(10):
            left.destroy(name, 30)
        networks = where / "networks"
        for spec in networks.glob("*.json") if networks.exists() else []:
            left.destroy_network(spec.stem, 30)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    tmp = tmp_path_factory.mktemp("examples")
    hooks = tmp / "hooks.log"
    policy = {
        "hooks": {
            "pre": ["sh", "-c", f"echo freeze >>{hooks}"],
            "post": ["sh", "-c", f"echo thaw >>{hooks}"],
            "timeout_seconds": 10,
        }
    }
    with collection_sites(tmp, checkpoints=policy) as made:
        for name in ("prometheus", "restore"):
            (tmp / name).mkdir()
        try:
            yield made
        finally:  # the failover's recovery servers (in the default state dir) and production
            destroy_vms(FAILOVERS / "shop-examples" / "qemu", tmp / "production")


@pytest.fixture(scope="module")
def web1(sites: Sites) -> Iterator[Vm]:
    """A tiny guest on its local disk with a QMP socket (qemu_mirror's examples),
    booted by the first example that needs it."""
    vm = Vm(sites.tmp, guest_image.build().as_dict())
    try:
        yield vm
    finally:
        vm.stop()


def _run(sites: Sites, module: str) -> str:
    text = examples(module)
    tasks = yaml.safe_load(text)
    assert isinstance(tasks, list) and tasks, f"{module}: EXAMPLES is not a list of tasks"
    play = sites.tmp / f"examples-{module}.yml"
    # The text itself, indented under tasks: (comments, anchors, order as written).
    body = "".join(f"    {line}" if line.strip() else "\n" for line in text.splitlines(True))
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n" + body
    )
    assert yaml.safe_load(play.read_text())[0]["tasks"] == tasks
    v, tmp = sites.variables, sites.tmp
    extra = sites.tmp / "example-vars.json"
    extra.write_text(
        json.dumps(
            {
                "haven_recovery_url": v["haven_target_url"],
                "haven_recovery_token": v["haven_target_tokens"]["operate"],
                "haven_recovery_listen_host": "127.0.0.1",
                "haven_recovery_listen_port": v["haven_target_replication_port"],
                "prometheus_config_dir": str(tmp / "prometheus"),
                "restore_dir": str(tmp / "restore"),
                "haven_production_state_dir": str(tmp / "production"),
                "shop_plan": shop_plan(SHOP_SUBNET),
                "ansible_python_interpreter": v["ansible_python_interpreter"],
                "web1_qmp_socket": str(tmp / "vm1" / "qmp.sock"),  # the web1 fixture's VM
                "web1_hypervisor": "localhost",
            }
        )
    )
    env = ansible_env(
        tmp,
        HAVEN_URL=v["haven_source_url"],
        HAVEN_TOKEN=v["haven_source_tokens"]["admin"],
        HAVEN_CA_PATH=v["haven_ca"],
    )
    done = ansible(
        tmp, "ansible-playbook", "-i", "localhost,", "-e", f"@{extra}", str(play), env=env
    )
    output = done.stdout + done.stderr
    (tmp / f"examples-{module}.log").write_text(output)  # to read after a run
    assert done.returncode == 0, f"{module}'s examples failed:\n{output[-8000:]}"
    recap = output[output.rindex("PLAY RECAP") :]
    assert "failed=0" in recap and "unreachable=0" in recap, output[-4000:]
    return output


def test_every_module_is_run() -> None:
    assert sorted(ORDER) == sorted(p.stem for p in MODULES.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", ORDER)
def test_examples_run_as_written(sites: Sites, web1: Vm, module: str) -> None:
    if module == "failover":
        boot_production(sites)
    if module.startswith("qemu_mirror") and getattr(web1, "pid", None) is None:
        web1.start()
    output = _run(sites, module)
    tmp = sites.tmp
    if module == "api_token":  # the secret kept, then rotated, then revoked
        secret = (tmp / "prometheus" / "havend.token").read_text()
        assert secret.startswith("hvn_") and secret not in output
    elif module == "checkpoint":  # between the hooks
        assert (tmp / "hooks.log").read_text() == "freeze\nthaw\n"
    elif module in ("failover", "failback"):  # production stopped, then running again
        prod = get_provider("qemu", state_dir=str(tmp / "production"), image={})
        state = prod.status("db1.example.com", 10)["state"]
        assert state == ("stopped" if module == "failover" else "running"), state
    elif module == "pit_export":  # the db volume copied out, then the exports closed
        assert (tmp / "restore" / "db.img").stat().st_size == 4 << 20
    for node in (sites.pair.source, sites.pair.target):  # no traceback on either side
        assert "Traceback" not in node.log(), node.log()[-3000:]
