#!/usr/bin/env python3
"""A wheelhouse for a node without a package index: havend's dependencies
(``service/pyproject.toml``, pinned by ``constraints.txt``) and its build
backend (setuptools, wheel), as wheels for this machine's Python and
platform, in one directory that ``pip install --no-index --find-links DIR``
installs from (roles/replication_node: ``replication_node_wheelhouse``).

Fetched by ``pip download`` from the index pip is configured with, cached
under ``~/.cache/haven-dr/wheelhouse/<hash>/`` (the hash over the
requirements and the Python version): building twice is building once.

    tools/wheelhouse.py            # print the wheelhouse's path
    tools/wheelhouse.py --force    # fetch again
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "haven-dr" / "wheelhouse"
BUILD = ("setuptools>=68", "wheel")  # service/pyproject.toml's build-system


def requirements(root: Path = ROOT) -> list[str]:
    project = tomllib.loads((root / "service" / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"]]


def build(force: bool = False, python: str = sys.executable, timeout: float = 900) -> Path:
    wanted = requirements()
    constraints = (ROOT / "constraints.txt").read_text()
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    key = hashlib.sha256("\n".join([*wanted, constraints, version]).encode()).hexdigest()[:16]
    where = CACHE / key
    if (where / ".complete").exists() and not force:
        return where
    shutil.rmtree(where, ignore_errors=True)
    partial = where.with_name(key + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "constraints.txt").write_text(constraints)
    done = subprocess.run(
        [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
         "--only-binary=:all:", "--dest", str(partial),
         "--constraint", str(partial / "constraints.txt"), *wanted],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"wheelhouse: pip download failed:\n{done.stdout[-3000:]}{done.stderr}")
    (partial / "constraints.txt").unlink()
    (partial / ".complete").write_text("\n".join(wanted) + "\n")
    partial.rename(where)
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="fetch again")
    print(build(parser.parse_args(argv).force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
