"""haven.dr's execution environment: ``meta/execution-environment.yml`` with
``requirements.txt`` and ``bindep.txt``, as ansible-builder reads them.

Nothing here builds an image or touches the network (every ansible-builder
and ansible-galaxy command runs in a fresh network namespace): ``create``
only renders the build context, which is checked for what a build would
run, and ``introspect`` (what the builder stage runs) is run on the
collection installed from its tarball, as an EE build installs it. The
requirements are checked against what the plugins import and run.
"""

from __future__ import annotations

import ast
import contextlib
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from bindep.depends import Depends
from packaging.requirements import Requirement
from plays import BIN, ROOT

EE_FILE = ROOT / "meta" / "execution-environment.yml"
PIP_FILE = ROOT / "requirements.txt"
BINDEP_FILE = ROOT / "bindep.txt"

DEBIAN = ["default", "platform:dpkg", "platform:debian"]
FEDORA = ["default", "platform:rpm", "platform:redhat", "platform:fedora"]


def offline(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``argv`` in a network namespace of its own (no route anywhere)."""
    proc = subprocess.run(
        ["unshare", "--net", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def lines(path: Path) -> list[str]:
    return [
        ln.strip()
        for ln in path.read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection as `make build` makes it."""
    out = tmp_path_factory.mktemp("build")
    offline(
        str(BIN / "ansible-galaxy"),
        "collection",
        "build",
        "--output-path",
        str(out),
        str(ROOT),
        cwd=out,
    )
    (built,) = out.glob("haven-dr-*.tar.gz")
    return built


def test_definition_declares_the_files_at_the_collection_root() -> None:
    ee = yaml.safe_load(EE_FILE.read_text())
    assert ee["version"] == 3
    deps = ee["dependencies"]
    # introspect resolves these against the collection root (never meta/).
    assert deps["python"] == "requirements.txt"
    assert deps["system"] == "bindep.txt"
    assert deps["exclude"]["all_from_collections"] == ["haven.dr"]
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"] == ">=2.16.0"
    assert deps["ansible_core"]["package_pip"] == "ansible-core>=2.16,<2.20"


def test_python_requirements_are_what_the_plugins_import() -> None:
    """Every third-party top-level import of plugins/ (stdlib, ansible and the
    collection aside, libvirt from the system) is in requirements.txt, and
    nothing else is."""
    imported: set[str] = set()

    def scan(tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "import " in node.value
            ):
                # a script run by another interpreter (_health.py's ssh check)
                with contextlib.suppress(SyntaxError):
                    scan(ast.parse(node.value))

    for path in (ROOT / "plugins").rglob("*.py"):
        scan(ast.parse(path.read_text()))
    third_party = {
        m
        for m in imported
        if m not in sys.stdlib_module_names
        and m not in {"ansible", "ansible_collections", "__future__"}
    }
    assert third_party == {"requests", "paramiko", "jmespath", "libvirt"}
    declared = {Requirement(ln).name for ln in lines(PIP_FILE)}
    # libvirt is python3-libvirt of the system (bindep.txt), not a PyPI build.
    assert declared == third_party - {"libvirt"}


def test_bindep_gives_the_providers_commands_on_each_platform() -> None:
    deps = Depends(BINDEP_FILE.read_text())
    assert [r[0] for r in deps.active_rules(DEBIAN)] == [
        "qemu-system-x86",
        "iproute2",
        "python3-libvirt",
    ]
    assert [r[0] for r in deps.active_rules(FEDORA)] == [
        "qemu-system-x86-core",
        "iproute",
        "python3-libvirt",
    ]
    # No compile- or test-only packages: every requirement has a wheel.
    assert not [r for r in deps._rules if any(p[1] in ("compile", "test") for p in r[1])]
    # The provider defaults: the commands the qemu and libvirt providers run.
    qemu = (ROOT / "plugins/module_utils/providers/qemu.py").read_text()
    assert 'qemu="qemu-system-x86_64"' in qemu and 'ip="ip"' in qemu
    # On this Debian host (tools/setup.sh installs them) the Debian names are real
    # packages, installed, and they give those commands.
    for package, command in (("qemu-system-x86", "qemu-system-x86_64"), ("iproute2", "ip")):
        paths = [
            f"/usr/bin/{command}",
            f"/bin/{command}",
            f"/usr/sbin/{command}",
            f"/sbin/{command}",
        ]
        owners = subprocess.run(
            ["dpkg", "-S", *paths], capture_output=True, text=True, check=False
        ).stdout
        assert owners.startswith(f"{package}:"), (package, command, owners)
    missing = subprocess.run(
        [str(BIN / "bindep"), "-b", "-f", str(BINDEP_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 0, missing.stdout


def test_the_tarball_carries_the_three_files(tarball: Path) -> None:
    with tarfile.open(tarball) as tf:
        names = set(tf.getnames())
        for name in ("meta/execution-environment.yml", "requirements.txt", "bindep.txt"):
            assert name in names
            assert tf.extractfile(name).read() == (ROOT / name).read_bytes()


def test_create_renders_the_build_context(tmp_path: Path, tarball: Path) -> None:
    """``ansible-builder create`` on a copy of the definition next to the two
    files and the tarball, as docs/awx.md tells a user to build it."""
    ee = tmp_path / "ee"
    ee.mkdir()
    for path in (EE_FILE, PIP_FILE, BINDEP_FILE):
        shutil.copy(path, ee / path.name)
    shutil.copy(tarball, ee / "haven-dr.tar.gz")
    context = tmp_path / "context"
    offline(
        str(BIN / "ansible-builder"),
        "create",
        "--file",
        str(ee / "execution-environment.yml"),
        "--context",
        str(context),
        "--output-filename",
        "Containerfile",
        cwd=tmp_path,
    )
    build = context / "_build"
    assert (build / "requirements.txt").read_text() == PIP_FILE.read_text()
    assert (build / "bindep.txt").read_text() == BINDEP_FILE.read_text()
    assert (build / "haven-dr.tar.gz").read_bytes() == tarball.read_bytes()
    assert yaml.safe_load((build / "requirements.yml").read_text()) == {
        "collections": [{"name": "haven-dr.tar.gz", "type": "file"}]
    }
    assert (build / "exclude-collections.txt").read_text().split() == ["haven.dr"]

    text = (context / "Containerfile").read_text()
    # The base image is a parameter: a build argument with a default.
    assert text.startswith('ARG EE_BASE_IMAGE="quay.io/fedora/fedora:42"\n')
    assert "\nFROM $EE_BASE_IMAGE AS base\n" in text
    assert 'ARG ANSIBLE_INSTALL_REFS="ansible-core>=2.16,<2.20 ansible-runner"' in text
    assert 'ARG PKGMGR="/usr/bin/dnf"' in text
    # The galaxy stage installs the tarball from the context.
    assert "COPY _build /build" in text
    assert re.search(r"ansible-galaxy collection install .*-r requirements\.yml", text)
    # The builder stage introspects with the user files and haven.dr's own left out.
    introspect = next(ln for ln in text.splitlines() if "introspect.py introspect" in ln)
    assert "--user-pip=requirements.txt" in introspect
    assert "--user-bindep=bindep.txt" in introspect
    assert "--exclude-collection-reqs=exclude-collections.txt" in introspect
    assert "RUN /output/scripts/install-from-bindep" in text
    assert "LABEL ansible-execution-environment=true" in text


def test_introspect_finds_the_collections_declared_requirements(
    tmp_path: Path, tarball: Path
) -> None:
    """What the builder stage sees of haven.dr installed from its tarball:
    its own meta/execution-environment.yml names the two files, so any EE
    that installs haven.dr gets its requirements; haven.dr's own EE lists them
    once (the user's files, the collection's left out)."""
    root = tmp_path / "collections"
    offline(
        str(BIN / "ansible-galaxy"),
        "collection",
        "install",
        "--offline",
        # a haven.dr already in ~/.ansible/collections would make this "nothing to do"
        "--force",
        "-p",
        str(root),
        str(tarball),
        cwd=tmp_path,
    )
    assert (root / "ansible_collections/haven/dr/meta/execution-environment.yml").is_file()

    def introspect(*extra: str) -> dict[str, list[str]]:
        proc = offline(str(BIN / "ansible-builder"), "introspect", str(root), *extra, cwd=tmp_path)
        return yaml.safe_load(proc.stdout.split("---", 1)[1])

    other_ee = introspect()
    assert other_ee["python"] == [f"{ln}  # from collection haven.dr" for ln in lines(PIP_FILE)]
    assert other_ee["system"] == [f"{ln}  # from collection haven.dr" for ln in lines(BINDEP_FILE)]

    exclude = tmp_path / "exclude-collections.txt"
    exclude.write_text("haven.dr\n")
    own = introspect(
        f"--user-pip={PIP_FILE}",
        f"--user-bindep={BINDEP_FILE}",
        f"--exclude-collection-reqs={exclude}",
    )
    assert own["python"] == [f"{ln}  # from collection user" for ln in lines(PIP_FILE)]
    assert own["system"] == [f"{ln}  # from collection user" for ln in lines(BINDEP_FILE)]
