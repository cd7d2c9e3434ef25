#!/usr/bin/env python3
"""The real ``awx.awx`` collection, for checking docs/examples/awx/ offline.

``awx.awx`` is not on PyPI by itself, but the ``ansible`` community package
bundles it; ``ansible`` 12.x pairs with ansible-core 2.19 (the project's pin).
This fetches that one wheel (``pip download --no-deps --require-hashes``,
never installed anywhere) and extracts only ``ansible_collections/awx/awx/``
into a collections path:

    ~/.cache/haven-dr/collections/ansible-<version>/ansible_collections/awx/awx/

The wheel's sha256 comes from PyPI's own metadata (the simple index in its
JSON form, PEP 691, which is what pip reads) and is checked twice: by pip
(``--hash``) and here, before anything is extracted. The extracted tree is
marked with that digest; a later call finds it and needs no network.

    tools/awx_collection.py             # fetch (or find) it, print the collections path
    tools/awx_collection.py --force     # fetch and extract again

Used as ``ANSIBLE_COLLECTIONS_PATH=<printed path>`` by
tests/service/test_awx_examples.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

# ansible 12.x bundles the collections of ansible-core 2.19 (requirements-dev.txt).
ANSIBLE_VERSION = "12.3.0"
INDEX = "https://pypi.org/simple"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "haven-dr" / "collections"
PREFIX = "ansible_collections/awx/awx/"
MARKER = ".haven-dr-source.json"


class FetchError(RuntimeError):
    pass


def wheel_name(version: str) -> str:
    return f"ansible-{version}-py3-none-any.whl"


def index_sha256(version: str, index: str = INDEX) -> str:
    """The sha256 PyPI publishes for the ``ansible`` wheel of ``version``."""
    request = urllib.request.Request(
        f"{index}/ansible/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            files = json.load(answer)["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise FetchError(
            f"cannot read PyPI's metadata of ansible ({index}/ansible/): {exc}"
        ) from exc
    name = wheel_name(version)
    for entry in files:
        if entry.get("filename") == name:
            if entry.get("yanked"):
                raise FetchError(f"{name} is yanked on PyPI")
            digest = entry.get("hashes", {}).get("sha256")
            if not digest:
                raise FetchError(f"PyPI's metadata of {name} has no sha256")
            return digest
    raise FetchError(f"{name} is not on PyPI ({index}/ansible/)")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(version: str, digest: str, dest: Path) -> Path:
    """``pip download`` the wheel into ``dest`` (pip checks ``digest``), then check it again."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write(f"ansible=={version} --hash=sha256:{digest}\n")
        req.flush()
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
        ]
        argv += ["--require-hashes", "-r", req.name, "-d", str(dest)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wheel = dest / wheel_name(version)
    if proc.returncode != 0 or not wheel.is_file():
        err = proc.stderr.strip()[-2000:]
        raise FetchError(f"pip download ansible=={version} failed ({proc.returncode}): {err}")
    got = sha256_of(wheel)
    if got != digest:
        wheel.unlink()
        raise FetchError(f"{wheel.name}: sha256 {got}, PyPI says {digest}")
    return wheel


def extract(wheel: Path, root: Path) -> Path:
    """Only ``ansible_collections/awx/awx/`` of ``wheel`` under ``root`` (no path escapes)."""
    target = root / PREFIX
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(PREFIX) and not m.is_dir()]
        if not any(m.filename == PREFIX + "MANIFEST.json" for m in members):
            raise FetchError(f"{wheel.name} has no {PREFIX}MANIFEST.json")
        for member in members:
            out = (root / member.filename).resolve()
            if not out.is_relative_to(target.resolve()):
                raise FetchError(f"{wheel.name}: {member.filename} leaves {PREFIX}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def awx_collection(
    version: str = ANSIBLE_VERSION, cache: Path = CACHE, force: bool = False
) -> Path:
    """The collections path holding ``awx.awx`` of ``ansible==version``; fetched once."""
    root = cache / f"ansible-{version}"
    marker = root / MARKER
    if not force and marker.is_file() and (root / PREFIX / "MANIFEST.json").is_file():
        return root
    digest = index_sha256(version)
    wheels = cache / "wheels"
    wheel = wheels / wheel_name(version)
    if force or not wheel.is_file() or sha256_of(wheel) != digest:
        if wheel.is_file():
            wheel.unlink()
        wheel = download(version, digest, wheels)
    staging = Path(tempfile.mkdtemp(prefix=f".ansible-{version}-", dir=cache))
    try:
        extract(wheel, staging)
        (staging / MARKER).write_text(
            json.dumps({"wheel": wheel.name, "sha256": digest}, indent=2) + "\n"
        )
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheel.unlink()  # 40+ MB; the extracted collection is what is kept
    return root


def awx_version(root: Path) -> str:
    manifest = json.loads((root / PREFIX / "MANIFEST.json").read_text())
    return manifest["collection_info"]["version"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--version", default=ANSIBLE_VERSION, help="the ansible package (default %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="fetch and extract again")
    args = parser.parse_args()
    try:
        root = awx_collection(args.version, force=args.force)
    except FetchError as exc:
        print(f"awx_collection: {exc}", file=sys.stderr)
        return 1
    print(root)
    print(f"awx.awx {awx_version(root)} from ansible {args.version}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
