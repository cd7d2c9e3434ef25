"""The embedded local setup: a protected site and a recovery site on this
machine, for the roles' molecule scenarios and docs/examples/.

``up DIR`` starts a source node src1 and a target node tgt1 (``havend run``,
TLS from one test CA, the REST API and replication on 127.0.0.1 only, ports
chosen free), replicating group ``app``: the volumes of the shop of
docs/recovery-plans.md "A plan that runs here" (db1: ``db``, ``db-log``;
app1: ``app-root``; web1: ``web-root``; each labelled with its server),
caught up, with one checkpoint retained on the recovery node; builds the tiny
guest (tools/guest_image.py, cached) and the disk image of a server to protect
(``DIR/images/reports1.qcow2``, docs/examples) and writes ``DIR/site.yml``, the
vars a play needs to reach both nodes (an ``admin`` token of the source for
protecting servers) (``ansible-playbook -e @DIR/site.yml``), and
``DIR/collections``, this checkout as haven.dr (``ANSIBLE_COLLECTIONS_PATH``).
The nodes keep running after it exits (their own sessions).

``down DIR`` destroys whatever VMs and networks the plays left under
``DIR/state`` (drills, failovers), then stops the two nodes it started
(their pids in ``DIR/pids.json``, checked against their command lines),
SIGTERM then SIGKILL. Again is harmless.

Root (the qemu provider's network namespaces and taps)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
sys.path.insert(0, str(ROOT / "tools"))

import guest_image  # noqa: E402
from nodes import MiB, app_group, make_token, start_pair, wait_caught_up  # noqa: E402

# The shop's volumes, per server (tests/service/recovery_app.py has the same).
DISKS = {"db1": ["db", "db-log"], "app1": ["app-root"], "web1": ["web-root"]}
SIZES = {"db": 2 * MiB, "db-log": 2 * MiB, "app-root": MiB, "web-root": MiB}


def up(site: Path) -> dict[str, object]:
    if (site / "pids.json").exists():
        raise SystemExit(f"local_site: {site} is up already (local_site.py down {site} first)")
    site.mkdir(parents=True, exist_ok=True)
    group = app_group(site, {v: SIZES[v] for disks in DISKS.values() for v in disks})
    for volume in group["volumes"]:
        volume["server"] = next(s for s, disks in DISKS.items() if volume["name"] in disks)
    pair = start_pair(site, [group], tls=True, api=True, caught_up=60)
    try:
        pids = {"source": pair.source.proc.pid, "target": pair.target.proc.pid}
        (site / "pids.json").write_text(json.dumps(pids))
        assert pair.tls is not None
        ca = pair.tls[0]["ca"]
        source_token = make_token(pair.source, "local-site", "operate")
        admin_token = make_token(pair.source, "local-site-admin", "admin")
        recovery_token = make_token(pair.target, "local-site", "operate")
        with httpx.Client(
            base_url=pair.source.address("api"),
            headers={"Authorization": "Bearer " + source_token},
            verify=ca,
            timeout=30,
        ) as api:
            made = api.post("/v1/groups/app/checkpoints", json={"label": "local site"})
            made.raise_for_status()
        wait_caught_up(pair.source, pair.target, timeout=60)
        image = guest_image.build()
        collections(site)
        example = example_image(site / "images" / "reports1.qcow2")
        variables: dict[str, object] = {
            "haven_source_url": pair.source.address("api"),
            "haven_source_token": source_token,
            "haven_source_admin_token": admin_token,
            "haven_source_volume_dir": str(site),
            "haven_example_image": str(example),
            "haven_recovery_url": pair.target.address("api"),
            "haven_recovery_token": recovery_token,
            "haven_ca_path": ca,
            "haven_state_dir": str(site / "state"),
            "haven_guest_kernel": str(image.kernel),
            "haven_guest_initrd": str(image.initrd),
        }
        (site / "site.yml").write_text(
            "# written by tools/local_site.py up: the embedded local setup's nodes\n"
            + yaml.safe_dump(variables, sort_keys=True)
        )
        return variables
    except BaseException:
        pair.stop()
        (site / "pids.json").unlink(missing_ok=True)
        raise


def example_image(path: Path) -> Path:
    """A 4 MiB qcow2 disk of a server to protect (docs/examples: reports1),
    its data a pattern: byte 0x5a in the first MiB, 0xa5 at 3 MiB."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        made = path.with_suffix(".tmp")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(made), str(4 * MiB)],
            check=True,
            timeout=60,
        )
        for pattern, offset in ((0x5A, 0), (0xA5, 3 * MiB)):
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {MiB}", str(made)],
                check=True,
                timeout=60,
                stdout=subprocess.DEVNULL,
            )
        made.rename(path)
    return path


def _ours(pid: int, site: Path) -> bool:
    """The process is a havend run of a config file in ``site``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run" in cmdline and any(arg.startswith(str(site).encode() + b"/") for arg in cmdline)


def _stop(pid: int, site: Path, grace: float = 30) -> None:
    if not _ours(pid, site):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _ours(pid, site):
        time.sleep(0.1)
    if _ours(pid, site):
        os.kill(pid, signal.SIGKILL)


def collections(site: Path) -> Path:
    """``DIR/collections``: haven.dr as a link to this checkout (ANSIBLE_COLLECTIONS_PATH)."""
    link = site / "collections" / "ansible_collections" / "haven" / "dr"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)
    return site / "collections"


def down(site: Path) -> None:
    state = site / "state"
    if state.exists():
        sys.path.insert(0, str(collections(site)))
        from ansible_collections.haven.dr.plugins.module_utils.providers import get_provider

        # every qemu provider's state under it: <state_dir>/qemu of each run
        for where in {p.parent for p in state.glob("**/qemu/vms")} | {
            p.parent for p in state.glob("**/qemu/networks")
        }:
            left = get_provider("qemu", state_dir=str(where))
            for name in left.list(10):
                left.destroy(name, 30)
            for spec in (where / "networks").glob("*.json"):
                left.destroy_network(spec.stem, 30)
    pids_file = site / "pids.json"
    if pids_file.exists():
        pids = json.loads(pids_file.read_text())
        for role in ("source", "target"):  # the source first, as Pair.stop does
            with contextlib.suppress(ProcessLookupError):
                _stop(pids[role], site.resolve())
        pids_file.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("dir", type=Path, help="the site's directory: nodes, volumes, site.yml")
    args = parser.parse_args(argv)
    site = args.dir.resolve()
    if args.action == "up":
        up(site)
        print(site / "site.yml")
    else:
        down(site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
