"""The README's "Using the collection" block, run as written: the collection
built and installed into a fresh path with ansible-galaxy, the embedded
local setup up, haven.dr.protect from the installed collection (not this
checkout), the setup down. Root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_block(heading: str = "## Using the collection") -> list[str]:
    """The lines of the first ``sh`` block of the README's section ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading + "\n") :]
    block = section[section.index("```sh\n") + 6 :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


@pytest.mark.timeout(1200)
def test_the_readme_block_runs_as_written_from_the_installed_collection(tmp_path: Path) -> None:
    lines = readme_block()
    assert lines[0] == "make build" and any("haven.dr.protect" in line for line in lines), lines
    site, installed = tmp_path / "haven-local", tmp_path / "haven-collections"
    script = "\n".join(
        line.replace("/tmp/haven-local", str(site)).replace(
            "/tmp/haven-collections", str(installed)
        )
        for line in lines
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "HAVEN_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    try:
        # everything but the last line (down): the nodes are read before they go
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "set -x\n" + "\n".join(script.splitlines()[:-1])],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1100,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-6000:]
        # the plays ran the installed collection, not this checkout
        manifest = json.loads(
            (installed / "ansible_collections/haven/dr/MANIFEST.json").read_text()
        )
        assert manifest["collection_info"]["name"] == "dr"
        assert f"{installed}/ansible_collections/haven/dr/roles/protected_server" in out, out[
            -3000:
        ]
        assert out.count("PLAY RECAP") == 1, out[-3000:]  # protect passed (rc 0)
        variables = yaml.safe_load((site / "site.yml").read_text())
        volumes = httpx.get(
            variables["haven_source_url"] + "/v1/volumes",
            params={"server": "reports1"},
            headers={"Authorization": "Bearer " + variables["haven_source_token"]},
            verify=variables["haven_ca_path"],
            timeout=30,
        ).json()
        assert [(v["name"], v["group"], v["state"]) for v in volumes] == [
            ("reports-data", "reports", "protected")
        ], volumes
    finally:
        down = script.splitlines()[-1]
        assert "local_site.py down" in down, down
        subprocess.run(["bash", "-c", down], cwd=ROOT, env=env, timeout=300, check=False)
    assert not (site / "pids.json").exists()
