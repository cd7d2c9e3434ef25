#!/usr/bin/env python3
"""Tiny guests for tests and the demo: a kernel + initrd pair from Debian packages.

The kernel is the Debian cloud kernel from /boot (``linux-image-cloud-amd64``);
the initrd is busybox-static, the virtio (and ACPI power button) modules in
dependency order (``modinfo -k``), and a small ``/init`` that reads what to do
from the kernel command line:

- ``haven.role=tcp:PORT``           answer every TCP connection on PORT with
                                    ``haven <name> <role>`` (busybox nc)
- ``haven.role=http:PORT:TEXT``     serve TEXT (percent-encoded) as ``/`` (busybox httpd)
- ``haven.role=writer``             write sequence-stamped 512-byte records to
                                    /dev/vda (``writer:vdb``: that disk), each
                                    followed by ``sync`` and ``haven: ack N`` on the console
- ``haven.role=writer+tcp:5432``    several roles at once, joined by ``+``
- ``haven.role=idle`` (default)     nothing
- ``haven.name=NAME``               the server's name (its hostname)
- ``haven.ip=10.0.0.2/24``          eth0's address; ``haven.gw=10.0.0.1`` a default route
- ``haven.mount=/dev/vda:/mnt``     mount a disk (ext4) before the role runs

The guest prints ``haven: vda <the first 64 bytes, printable ones only>`` and
``haven: up ...`` on the serial console when the role runs, and
powers off when the ACPI power button is pressed (QMP ``system_powerdown``):
busybox ``acpid`` syncs and triggers sysrq ``o``.

The pair is cached under ``~/.cache/haven-dr/guest/<kernel version>-<hash>/``,
the hash over the init, the module list and busybox: building twice is
building once, and the cpio archive is deterministic (mtime 0, sorted, gzip
without a timestamp), so the same inputs give the same bytes.

    tools/guest_image.py            # build (or find) the image, print its paths as JSON
    tools/guest_image.py --force    # rebuild
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "haven-dr" / "guest"
BUSYBOX = Path("/bin/busybox")
# What the guest needs (virtio_pci: the transport, which no driver depends on);
# each is loaded after what it depends on.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
FORMAT = 1  # bump when the layout of the image changes

INIT = r"""#!/bin/busybox sh
# haven.dr tiny guest init (tools/guest_image.py)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /var/log
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "haven: insmod $m failed" > /dev/console
done

say() { echo "haven: $*" > /dev/console; }
NAME=guest; ROLE=idle; IP=; GW=; MOUNT=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        haven.name=*) NAME=${arg#haven.name=} ;;
        haven.role=*) ROLE=${arg#haven.role=} ;;
        haven.ip=*) IP=${arg#haven.ip=} ;;
        haven.gw=*) GW=${arg#haven.gw=} ;;
        haven.mount=*) MOUNT=${arg#haven.mount=} ;;
    esac
done
hostname "$NAME"

# power button (QMP system_powerdown): sync, then off at once
mkdir -p /etc/acpi/PWRF
cat > /etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "haven: power button" > /dev/console
sync
echo o > /proc/sysrq-trigger
EOF
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /var/log/acpid.log

ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
if [ -n "$IP" ]; then
    ip addr add "$IP" dev eth0
    ip link set eth0 up
    [ -n "$GW" ] && ip route add default via "$GW"
fi
if [ -n "$MOUNT" ]; then
    mkdir -p "${MOUNT#*:}"
    mount "${MOUNT%%:*}" "${MOUNT#*:}" || say "mount $MOUNT failed"
fi

run_role() {
case "$1" in
    tcp:*)
        PORT=${1#tcp:}
        printf '#!/bin/sh\necho "haven %s tcp"\n' "$NAME" > /bin/haven-tcp-$PORT
        chmod +x /bin/haven-tcp-$PORT
        # -ll: keep listening after each client; -e: one child per connection
        nc -ll -p "$PORT" -e /bin/haven-tcp-$PORT &
        ;;
    http:*)
        REST=${1#http:}
        PORT=${REST%%:*}
        TEXT=
        [ "$REST" != "$PORT" ] && TEXT=${REST#*:}
        mkdir -p /www-$PORT
        httpd -d "${TEXT:-haven $NAME}" > /www-$PORT/index.html
        httpd -p "$PORT" -h /www-$PORT
        ;;
    writer|writer:*)
        # record N at sector N % 2048 (1 MiB ring) of the disk (default vda):
        # "haven-seq <16 digits> <name>", synced, then "haven: ack N" on the console
        DISK=vda
        [ "$1" != writer ] && DISK=${1#writer:}
        (
            seq=0
            while true; do
                seq=$((seq+1))
                printf 'haven-seq %016d %s\n' "$seq" "$NAME" |
                    dd of=/dev/$DISK bs=512 seek=$((seq % 2048)) conv=notrunc,sync 2>/dev/null &&
                    sync && say "ack $seq"
                sleep 0.2
            done
        ) &
        ;;
    idle) ;;
    *) say "unknown role $1" ;;
esac
}
# roles joined by "+" all run: writer+tcp:5432
for one in $(echo "$ROLE" | tr '+' ' '); do run_role "$one"; done
[ -b /dev/vda ] && say "vda $(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -cd 'A-Za-z0-9._-')"
say "up name=$NAME role=$ROLE ip=$IP"
while true; do sleep 3600; done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_version": self.kernel_version,
        }


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(boot: Path = Path("/boot")) -> tuple[str, Path]:
    """The newest Debian cloud kernel in ``boot``: (version, vmlinuz path)."""
    found = [(p.name[len("vmlinuz-") :], p) for p in boot.glob("vmlinuz-*-cloud-amd64")]
    if not found:
        raise SystemExit(
            "guest_image: no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 "
            "(make setup does)"
        )
    return max(found, key=lambda item: _version_key(item[0]))


def _modinfo(kver: str, field: str, module: str) -> str:
    out = subprocess.run(
        ["modinfo", "-k", kver, "-F", field, module],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def module_order(kver: str, wanted: tuple[str, ...] = MODULES) -> list[tuple[str, Path]]:
    """Every module ``wanted`` needs, each after its dependencies: (name, file)."""
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        depends = _modinfo(kver, "depends", name)
        for dep in sorted(d for d in depends.split(",") if d):
            visit(dep)
        filename = _modinfo(kver, "filename", name)
        if filename == "(builtin)" or not filename:
            return
        order.append((name, Path(filename)))

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A deterministic newc archive: (path, mode, data); directories have no data."""
    out = io.BytesIO()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(sorted(entries), start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def initrd_entries(kver: str) -> list[tuple[str, int, bytes]]:
    directory, file_mode, exe = 0o040755, 0o100644, 0o100755
    modules = module_order(kver)
    entries: list[tuple[str, int, bytes]] = [
        (d, directory, b"")
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp")
    ]
    entries += [
        ("bin/busybox", exe, BUSYBOX.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),  # symlink: its data is the target
        ("init", exe, INIT.encode()),
        ("etc/modules.order", file_mode, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [(f"lib/modules/{n}.ko", file_mode, _read_module(p)) for n, p in modules]
    return entries


def image_key(kver: str) -> str:
    """What the cached image depends on: the init, the modules and busybox."""
    digest = hashlib.sha256()
    digest.update(b"format %d\n" % FORMAT)
    digest.update(INIT.encode())
    for name, path in module_order(kver):
        digest.update(f"{name} {path}\n".encode())
    digest.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return f"{kver}-{digest.hexdigest()[:16]}"


def build(cache: Path = CACHE, force: bool = False, boot: Path = Path("/boot")) -> GuestImage:
    """The guest image, from the cache when it is there (``force``: rebuilt)."""
    kver, vmlinuz = find_kernel(boot)
    if not BUSYBOX.exists():
        raise SystemExit("guest_image: no /bin/busybox: install busybox-static (make setup does)")
    where = cache / image_key(kver)
    image = GuestImage(where / "vmlinuz", where / "initrd.gz", kver)
    if not force and image.kernel.exists() and image.initrd.exists():
        return image
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=where.parent))
    os.chmod(tmp, 0o755)
    try:
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        raw = _cpio_newc(initrd_entries(kver))
        with (
            open(tmp / "initrd.gz", "wb") as f,
            gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz,
        ):
            gz.write(raw)
        (tmp / "image.json").write_text(
            json.dumps({"kernel_version": kver, "modules": [n for n, _ in module_order(kver)]})
            + "\n"
        )
        if where.exists():
            shutil.rmtree(where)
        os.rename(tmp, where)  # atomic: a concurrent builder finds all or nothing
    except OSError:
        if where.exists() and image.initrd.exists():  # another builder won the race
            return image
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"cache directory ({CACHE})")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.cache, args.force).as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
