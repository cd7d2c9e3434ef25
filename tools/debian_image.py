#!/usr/bin/env python3
"""A Debian 12 guest with systemd and sshd, from Debian packages only.

The root filesystem is ``mmdebstrap --variant=minbase`` of bookworm from the
machine's own Debian mirror (the first ``URIs:`` of
``/etc/apt/sources.list.d/*.sources``, or ``--mirror``) with PACKAGES: systemd
as PID 1, udev, dbus (logind: the ACPI power button powers it off), openssh,
iproute2, python3 with venv and apt (Ansible manages it; a role can build a
virtualenv offline), mdadm and nbd-client (the in-guest mirroring of
roles/protected_server needs them and the guest has no mirror to install
them from), nftables (roles/replication_node's firewall). The kernel is
the host's Debian cloud kernel (``linux-image-cloud-amd64``), its initrd the host's
``/boot/initrd.img-<version>`` (initramfs-tools: virtio and ext4 are in it) and
its modules (``/lib/modules/<version>``) copied into the image, so udev loads
the rest (virtio_net, the power button) after the switch to the root.

The image is one ext4 filesystem without a partition table (``root=/dev/vda
rw``: the qemu provider adds that for a server with ``options.image``). At
boot, ``haven-guest.service`` reads the kernel command line before networkd
and sshd start:

- ``haven.name=NAME``      the hostname
- ``haven.ip=10.0.0.2/24`` the address of the first Ethernet NIC
                           (systemd-networkd, ``/run/systemd/network``);
  ``haven.gw=10.0.0.1``    its default route
- ``haven.ssh_key=BASE64`` an authorized_keys line (base64 of it) added for root

and makes an ed25519 host key when there is none (the image ships without
host keys: every VM gets its own on its first boot). Each build also bakes
the key pair it generates (``id_ed25519`` next to the image) into root's
authorized_keys, so the image is reachable without ``haven.ssh_key`` too.
Password logins are impossible (root's password is locked).

Cached under ``~/.cache/haven-dr/debian/<hash>/`` (``base.qcow2``,
``vmlinuz``, ``initrd.img``, ``id_ed25519``, ``image.json``), the hash over
FORMAT, the suite, the mirror, PACKAGES, the files written into the image,
the size, the kernel version and the bytes of the kernel and its initrd:
building twice is building once. The cached base is never written: VMs boot
from a copy-on-write qcow2 overlay of it (``overlay()``; the qemu provider
makes one per VM for ``options.image``).

    tools/debian_image.py            # build (or find) the image, print its paths as JSON
    tools/debian_image.py --force    # rebuild
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "haven-dr" / "debian"
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "openssh-server",
    "iproute2",
    "python3",
    "python3-venv",
    "python3-apt",
    "mdadm",  # in-guest mirroring (roles/protected_server, in_guest): the guest has no apt mirror
    "nbd-client",
    "nftables",  # roles/replication_node opens only havend's ports
)
SIZE = "3G"  # sparse: the qcow2 holds what is used (about 300 MB)
FORMAT = 1  # bump when the layout of the image changes
CMDLINE = "root=/dev/vda rw"
SOURCES = Path("/etc/apt/sources.list.d")

SETUP = r"""#!/bin/sh
# haven.dr Debian guest: configuration from the kernel command line
# (tools/debian_image.py); runs before systemd-networkd and ssh
set -u
NAME=; IP=; GW=; SSH_KEY=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        haven.name=*) NAME=${arg#haven.name=} ;;
        haven.ip=*) IP=${arg#haven.ip=} ;;
        haven.gw=*) GW=${arg#haven.gw=} ;;
        haven.ssh_key=*) SSH_KEY=${arg#haven.ssh_key=} ;;
    esac
done
if [ -n "$NAME" ]; then
    echo "$NAME" > /etc/hostname
    hostname "$NAME"
    grep -q " $NAME\$" /etc/hosts || echo "127.0.1.1 $NAME" >> /etc/hosts
fi
mkdir -p /run/systemd/network
if [ -n "$IP" ]; then
    {
        echo "[Match]"
        echo "Type=ether"
        echo "[Network]"
        echo "Address=$IP"
        [ -n "$GW" ] && echo "Gateway=$GW"
        echo "LinkLocalAddressing=no"
        echo "IPv6AcceptRA=no"
    } > /run/systemd/network/10-haven.network
fi
if [ -n "$SSH_KEY" ]; then
    mkdir -p /root/.ssh
    chmod 700 /root/.ssh
    LINE=$(echo "$SSH_KEY" | base64 -d)
    touch /root/.ssh/authorized_keys
    grep -qxF "$LINE" /root/.ssh/authorized_keys || echo "$LINE" >> /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
fi
K=/etc/ssh/ssh_host_ed25519_key
[ -s $K ] || ssh-keygen -q -t ed25519 -N '' -f $K
echo "haven: guest configured name=$NAME ip=$IP" > /dev/console
"""

UNIT = """[Unit]
Description=haven.dr guest configuration from the kernel command line
DefaultDependencies=no
After=local-fs.target systemd-remount-fs.service
Before=network-pre.target systemd-networkd.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/haven-guest-setup

[Install]
WantedBy=multi-user.target
"""

SSHD = """# haven.dr Debian guest: public keys only, the host key made at first boot
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
"""

FILES = {
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": "haven-guest\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "usr/local/sbin/haven-guest-setup": SETUP,
    "etc/systemd/system/haven-guest.service": UNIT,
    "etc/ssh/sshd_config.d/haven.conf": SSHD,
}
ENABLE = ("systemd-networkd.service", "haven-guest.service", "ssh.service")
# firstboot would prompt on the console; wait-online would wait 2 min for a NIC
# that a VM without haven.ip never configures (the static address is up at once)
MASK = ("systemd-firstboot.service", "systemd-networkd-wait-online.service")


@dataclass(frozen=True)
class DebianImage:
    image: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    ssh_key: Path

    def as_dict(self) -> dict[str, str]:
        return {
            "image": str(self.image),
            "format": "qcow2",
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_version": self.kernel_version,
            "ssh_key": str(self.ssh_key),
            "ssh_pubkey": self.ssh_key.with_suffix(".pub").read_text().strip(),
            "cmdline": CMDLINE,
        }


def _run(argv: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, check=True, timeout=timeout, **kw
        )
    except subprocess.CalledProcessError as exc:
        raise SystemExit(
            f"debian_image: {' '.join(argv[:3])}... exited {exc.returncode}:\n"
            f"{(exc.stderr or exc.stdout or '')[-3000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"debian_image: {' '.join(argv[:3])}... did not end in {timeout} s"
        ) from None


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"debian_image: missing {', '.join(missing)}: install mmdebstrap, e2fsprogs, "
            "qemu-utils, openssh-client (make setup does)"
        )


def default_mirror(sources: Path = SOURCES) -> str:
    """The first Debian archive URI of the machine's deb822 sources (not security's)."""
    for path in sorted(sources.glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri
    list_file = Path("/etc/apt/sources.list")
    if list_file.exists():
        for line in list_file.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in line:
                return next(p for p in parts[1:] if "://" in p)
    raise SystemExit("debian_image: no Debian mirror in /etc/apt: give --mirror")


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(boot: Path = Path("/boot")) -> tuple[str, Path, Path]:
    """The newest Debian cloud kernel with an initrd: (version, vmlinuz, initrd)."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*-cloud-amd64"):
        version = vmlinuz.name[len("vmlinuz-") :]
        initrd = boot / f"initrd.img-{version}"
        if initrd.exists() and Path(f"/lib/modules/{version}/modules.dep").exists():
            found.append((version, vmlinuz, initrd))
    if not found:
        raise SystemExit(
            "debian_image: no /boot/vmlinuz-*-cloud-amd64 with its initrd and modules: "
            "install linux-image-cloud-amd64 (make setup does)"
        )
    return max(found, key=lambda item: _version_key(item[0]))


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_key(mirror: str, kver: str, vmlinuz: Path, initrd: Path) -> str:
    """What the cached image depends on (the inputs, not the bytes mmdebstrap makes)."""
    digest = hashlib.sha256()
    digest.update(f"format {FORMAT}\nsuite {SUITE}\nmirror {mirror}\nsize {SIZE}\n".encode())
    digest.update(("packages " + " ".join(PACKAGES) + "\n").encode())
    digest.update(("enable " + " ".join(ENABLE) + " mask " + " ".join(MASK) + "\n").encode())
    for name, text in sorted(FILES.items()):
        digest.update(f"{name}\n{text}\n".encode())
    digest.update(f"kernel {kver} {_sha(vmlinuz)} {_sha(initrd)}\n".encode())
    digest.update(_sha(Path(f"/lib/modules/{kver}/modules.dep")).encode())
    return digest.hexdigest()[:16]


def _images(where: Path, kver: str) -> DebianImage:
    return DebianImage(
        where / "base.qcow2", where / "vmlinuz", where / "initrd.img", kver, where / "id_ed25519"
    )


def _rootfs(root: Path, mirror: str, work: Path, timeout: float) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            "--include=" + ",".join(PACKAGES),
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            SUITE,
            str(root),
            f"deb {mirror} {SUITE} main",
        ],
        timeout,
        env=env,
        cwd=work,
    )


def _configure(root: Path, kver: str, pubkey: str, timeout: float) -> None:
    # the kernel's modules (udev loads virtio_net, button, ... from them)
    modules = root / "usr/lib/modules" / kver
    shutil.rmtree(modules, ignore_errors=True)
    shutil.copytree(f"/lib/modules/{kver}", modules, symlinks=True)
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if name.startswith("usr/local/sbin/") else 0o644)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every VM makes its own at first boot
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    (root / "etc/machine-id").write_text("")  # each VM its own
    _run(["chroot", str(root), "systemctl", "enable", *ENABLE], timeout)
    _run(["chroot", str(root), "systemctl", "mask", *MASK], timeout)
    _run(["chroot", str(root), "passwd", "--lock", "root"], timeout)


def build(
    cache: Path = CACHE,
    force: bool = False,
    mirror: str | None = None,
    boot: Path = Path("/boot"),
    timeout: float = 900,
) -> DebianImage:
    """The Debian guest, from the cache when it is there (``force``: rebuilt)."""
    require("mmdebstrap", "mkfs.ext4", "qemu-img", "ssh-keygen", "chroot")
    if os.geteuid() != 0:
        raise SystemExit("debian_image: needs root (mmdebstrap --mode=root, chroot)")
    mirror = mirror or default_mirror()
    kver, vmlinuz, initrd = find_kernel(boot)
    key = image_key(mirror, kver, vmlinuz, initrd)
    where = cache / key
    image = _images(where, kver)
    if not force and (where / "image.json").exists():
        return image
    where.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=where.parent))
    os.chmod(tmp, 0o755)
    try:
        root = tmp / "root"
        _rootfs(root, mirror, tmp, timeout)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"haven-debian-{key}",
              "-f", str(tmp / "id_ed25519")], 60)  # fmt: skip
        pubkey = (tmp / "id_ed25519.pub").read_text().strip()
        _configure(root, kver, pubkey, 120)
        raw = tmp / "root.raw"
        fs_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
        env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
        _run(["mkfs.ext4", "-q", "-F", "-L", "haven-root", "-U", fs_uuid,
              "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-d", str(root), str(raw), SIZE],
             timeout, env=env)  # fmt: skip
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp / "base.qcow2")],
             timeout)  # fmt: skip
        raw.unlink()
        shutil.rmtree(root)
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        shutil.copyfile(initrd, tmp / "initrd.img")
        (tmp / "base.qcow2").chmod(0o444)  # the base is never written
        (tmp / "image.json").write_text(
            json.dumps(
                {
                    "suite": SUITE,
                    "mirror": mirror,
                    "packages": list(PACKAGES),
                    "kernel_version": kver,
                    "cmdline": CMDLINE,
                    "built_seconds": round(time.monotonic() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        if where.exists():
            shutil.rmtree(where)
        os.rename(tmp, where)  # atomic: a concurrent builder finds all or nothing
    except OSError:
        if (where / "image.json").exists():  # another builder won the race
            return image
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


def overlay(base: Path, path: Path, timeout: float = 60) -> Path:
    """A copy-on-write qcow2 at ``path`` over ``base`` (which stays as it is)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)],
         timeout)  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"cache directory ({CACHE})")
    parser.add_argument("--mirror", help="Debian mirror URI (default: the machine's own)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.cache, args.force, args.mirror).as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
