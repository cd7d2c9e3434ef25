"""The collection against a real havend pair: the sites the plays run against
(a source and a target with TLS, the API and tokens of each scope) and
``ansible-playbook`` / ``ansible-inventory`` run on them with this checkout
as the collection haven.dr. Shared by test_collection_plays.py (the
integration targets) and test_collection_examples.py (the modules' EXAMPLES)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes import Pair, app_group, free_port, make_token, start_pair

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BIN = Path(sys.executable).parent


@dataclass
class Sites:
    """The pair, the directory of its files and plays, and what the plays get
    to know of it (``variables``, also written to ``<tmp>/vars.json``)."""

    pair: Pair
    tmp: Path
    variables: dict[str, Any]


@contextmanager
def collection_sites(tmp: Path, **group_extra: Any) -> Iterator[Sites]:
    """Source src1 and target tgt1 over TLS with the API on, caught up on group
    ``app`` (volumes ``db`` 4 MiB and ``log`` 2 MiB, both disks of the server
    db1.example.com; ``group_extra`` adds keys to the group's config), and the
    collection installed as a link to this checkout. Stopped on exit."""
    group = app_group(tmp, {"db": 4 * MiB, "log": 2 * MiB}, **group_extra)
    for volume in group["volumes"]:
        volume["server"] = "db1.example.com"  # both disks of one protected server
    pair = start_pair(tmp, [group], tls=True, api=True, caught_up=60)
    try:
        collections = tmp / "collections" / "ansible_collections" / "haven"
        collections.mkdir(parents=True)
        (collections / "dr").symlink_to(
            ROOT
        )  # ansible-playbook follows it (ansible-test would not)
        closed = free_port()
        assert pair.tls is not None
        variables = {
            "haven_source_url": pair.source.address("api"),
            "haven_target_url": pair.target.address("api"),
            "haven_source_tokens": {
                s: make_token(pair.source, f"plays-{s}", s) for s in ("read", "operate", "admin")
            },
            "haven_target_tokens": {
                s: make_token(pair.target, f"plays-{s}", s) for s in ("read", "operate", "admin")
            },
            "haven_ca": pair.tls[0]["ca"],
            "haven_target_replication_port": int(
                pair.target.address("replication").rsplit(":", 1)[1]
            ),
            "haven_closed_port": closed,
            "haven_closed_url": f"http://127.0.0.1:{closed}",
            "ansible_python_interpreter": sys.executable,
        }
        (tmp / "vars.json").write_text(json.dumps(variables))
        yield Sites(pair, tmp, variables)
    finally:
        pair.stop()


def ansible_env(tmp: Path, **haven: str) -> dict[str, str]:
    """The environment of an ansible command: the collection from ``tmp``, no
    colours, and ``haven`` as the only HAVEN_* variables (none by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVEN_")}
    return env | {
        "ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **haven,
    }


def in_session(
    argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float, merge: bool = False
) -> subprocess.CompletedProcess[str]:
    """``argv`` in a session of its own: on a timeout or an interrupt its whole
    process group goes with it (ansible's workers, their ssh masters). Its
    output, stderr into stdout with ``merge``."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr or "")


def ansible(
    tmp: Path, tool: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``tool`` (ansible-playbook, ansible-inventory) of the venv, run in ``tmp``."""
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=tmp,
        env=env if env is not None else ansible_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
