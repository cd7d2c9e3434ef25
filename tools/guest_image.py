#!/usr/bin/env python3
"""Tiny guests for tests and the demo: a kernel + initrd pair from Debian packages.

The kernel is the Debian cloud kernel from /boot (``linux-image-cloud-amd64``);
the initrd is busybox-static, the virtio (and ACPI power button) modules in
dependency order (``modinfo -k``), ``qemu-ga`` and dropbear with the shared
libraries they need (``ldd``, the dynamic loader too), and a small ``/init`` that reads what to do
from the kernel command line:

- ``haven.role=tcp:PORT``           answer every TCP connection on PORT with
                                    ``haven <name> <role>`` (busybox nc)
- ``haven.role=http:PORT:TEXT``     serve TEXT (percent-encoded) as ``/`` (busybox httpd)
- ``haven.role=writer``             write sequence-stamped 512-byte records to
                                    /dev/vda (``writer:vdb``: that disk), each
                                    followed by ``sync`` and ``haven: ack N`` on the console
- ``haven.role=db:PORT[:DISK]``     a database: the writer on DISK (default vda)
                                    going on after the highest seq already on it,
                                    its last record the answer on TCP PORT
- ``haven.role=app:PORT:HOST:DBPORT`` answer on PORT ``haven <name> app: <record>``,
                                    the last record of the db at HOST:DBPORT
- ``haven.role=web:PORT:HOST:APPPORT`` serve ``/`` (a CGI): ``shop web <name>: <the
                                    app's answer>`` (busybox httpd)
- ``haven.role=writer+tcp:5432``    several roles at once, joined by ``+``
- ``haven.role=idle`` (default)     nothing
- ``haven.name=NAME``               the server's name (its hostname)
- ``haven.ip=10.0.0.2/24``          eth0's address; ``haven.gw=10.0.0.1`` a default route
- ``haven.mount=/dev/vda:/mnt``     mount a disk (ext4) before the role runs
- ``haven.ssh_key=BASE64``          an authorized_keys line (base64 of it) for root:
                                    dropbear then serves ssh on port 22 (public key only)

Whatever the role, the QEMU guest agent (Debian's ``qemu-ga``) runs on the
virtio-serial port ``org.qemu.guest_agent.0`` (the qemu provider gives every VM
one): ``guest-exec`` of ``/bin/sh -c ...`` answers a ``guest_agent`` health check.

The guest prints ``haven: vda <the first 64 bytes, printable ones only>`` and
``haven: up ...`` on the serial console when the role runs, and
powers off when the ACPI power button is pressed (QMP ``system_powerdown``):
busybox ``acpid`` syncs and triggers sysrq ``o``.

The pair is cached under ``~/.cache/haven-dr/guest/<kernel version>-<hash>/``,
the hash over the init, the module list, busybox and the programs with their
libraries: building twice is building once, and the cpio archive is
deterministic (mtime 0, sorted, gzip without a timestamp), so the same inputs give the same bytes.

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
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "button", "evdev")
# Dynamically linked programs copied with their libraries (path in the guest =
# path on the host), and the Debian package of each: the guest agent and ssh.
PROGRAMS = {
    "/usr/sbin/qemu-ga": "qemu-guest-agent",
    "/usr/sbin/dropbear": "dropbear-bin",
    "/usr/bin/dropbearkey": "dropbear-bin",
}
FORMAT = 2  # bump when the layout of the image changes

INIT = r"""#!/bin/busybox sh
# haven.dr tiny guest init (tools/guest_image.py)
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /var/log
ln -s /run /var/run
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "haven: insmod $m failed" > /dev/console
done

say() { echo "haven: $*" > /dev/console; }
NAME=guest; ROLE=idle; IP=; GW=; MOUNT=; SSH_KEY=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        haven.name=*) NAME=${arg#haven.name=} ;;
        haven.role=*) ROLE=${arg#haven.role=} ;;
        haven.ip=*) IP=${arg#haven.ip=} ;;
        haven.gw=*) GW=${arg#haven.gw=} ;;
        haven.mount=*) MOUNT=${arg#haven.mount=} ;;
        haven.ssh_key=*) SSH_KEY=${arg#haven.ssh_key=} ;;
    esac
done
hostname "$NAME"

# the QEMU guest agent on its virtio-serial port (no udev: the link by its name)
mkdir -p /dev/virtio-ports
for port in /sys/class/virtio-ports/*; do
    [ -r "$port/name" ] || continue
    dev=${port##*/}
    [ -e /dev/$dev ] || mknod /dev/$dev c $(sed 's/:/ /' "$port/dev")
    ln -sf ../$dev "/dev/virtio-ports/$(cat "$port/name")"
done
QGA=/dev/virtio-ports/org.qemu.guest_agent.0
if [ -e $QGA ]; then
    qemu-ga -m virtio-serial -p $QGA -t /run -l /var/log/qemu-ga.log &
else
    say "no guest agent port"
fi

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
if [ -n "$SSH_KEY" ]; then
    # ssh for root with that key only (no passwords); a new host key each boot
    mkdir -p /root/.ssh /etc/dropbear
    chmod 700 /root /root/.ssh
    echo "$SSH_KEY" | base64 -d > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    K=/etc/dropbear/dropbear_ed25519_host_key
    dropbearkey -t ed25519 -f $K > /dev/null 2>&1 || say "dropbearkey failed"
    dropbear -r $K -s -p 22 -P /run/dropbear.pid 2> /var/log/dropbear.log || say "dropbear failed"
fi
if [ -n "$MOUNT" ]; then
    mkdir -p "${MOUNT#*:}"
    mount "${MOUNT%%:*}" "${MOUNT#*:}" || say "mount $MOUNT failed"
fi

# record N at sector N % 2048 (1 MiB ring) of disk $1, from seq $2 + 1:
# "haven-seq <16 digits> <name>", synced, then "haven: ack N" on the console
# (and the record in /run/haven-last, what the db role serves)
write_records() {
    seq=$2
    while true; do
        seq=$((seq+1))
        RECORD=$(printf 'haven-seq %016d %s' "$seq" "$NAME")
        echo "$RECORD" | dd of=/dev/$1 bs=512 seek=$((seq % 2048)) conv=notrunc,sync 2>/dev/null &&
            sync && echo "$RECORD" > /run/haven-last && say "ack $seq"
        sleep 0.2
    done
}

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
        DISK=vda
        [ "$1" != writer ] && DISK=${1#writer:}
        write_records "$DISK" 0 &
        ;;
    db:*)
        # a database: the writer on DISK (db:PORT[:DISK], default vda), going on
        # after the highest seq the disk holds, its last record served on PORT
        REST=${1#db:}
        PORT=${REST%%:*}
        DISK=vda
        [ "$REST" != "$PORT" ] && DISK=${REST#*:}
        LAST=$(dd if=/dev/$DISK bs=512 count=2048 2>/dev/null | tr '\000' '\n' |
            grep -o '^haven-seq [0-9]*' | sort | tail -n 1 | cut -d' ' -f2 | sed 's/^0*//')
        say "db $DISK from seq ${LAST:-0}"
        echo "no record yet" > /run/haven-last
        printf '#!/bin/sh\ncat /run/haven-last\n' > /bin/haven-db-$PORT
        chmod +x /bin/haven-db-$PORT
        nc -ll -p "$PORT" -e /bin/haven-db-$PORT &
        write_records "$DISK" "${LAST:-0}" &
        ;;
    app:*)
        # app:PORT:HOST:DBPORT - every connection on PORT asks the db at HOST:DBPORT
        # for its last record and answers "haven <name> app: <that record>"
        REST=${1#app:}
        PORT=${REST%%:*}
        DB=${REST#*:}
        printf '#!/bin/sh\necho "haven %s app: $(nc %s %s </dev/null | head -n 1)"\n' \
            "$NAME" "${DB%%:*}" "${DB#*:}" > /bin/haven-app-$PORT
        chmod +x /bin/haven-app-$PORT
        nc -ll -p "$PORT" -e /bin/haven-app-$PORT &
        ;;
    web:*)
        # web:PORT:HOST:APPPORT - an HTTP page (a CGI) "shop web <name>: <the app's answer>"
        REST=${1#web:}
        PORT=${REST%%:*}
        APP=${REST#*:}
        mkdir -p /www-$PORT/cgi-bin
        {
            printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\n'
            printf 'echo "shop web %s: $(nc %s %s </dev/null | head -n 1)"\n' \
                "$NAME" "${APP%%:*}" "${APP#*:}"
        } > /www-$PORT/cgi-bin/index.cgi
        chmod +x /www-$PORT/cgi-bin/index.cgi
        httpd -p "$PORT" -h /www-$PORT
        ;;
    idle) ;;
    *) say "unknown role $1" ;;
esac
}
# roles joined by "+" all run: writer+tcp:5432
for one in $(echo "$ROLE" | tr '+' ' '); do run_role "$one"; done
[ -b /dev/vda ] && say "vda $(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -cd 'A-Za-z0-9._-')"
say "up name=$NAME role=$ROLE ip=$IP ssh=${SSH_KEY:+on}"
while true; do sleep 3600; done
"""


# What the writer role leaves (the init above): a record per synced write at
# sector seq % 2048 of its disk, and "haven: ack N" on the console after it.
WRITER_RECORD = re.compile(rb"haven-seq (\d{16}) (\S+)\n")
WRITER_ACK = re.compile(r"haven: ack (\d+)")


def writer_records(data: bytes) -> dict[int, int]:
    """{sector: seq} of the writer's records in ``data`` (a disk's bytes)."""
    out = {}
    for i in range(0, len(data) - 511, 512):
        m = WRITER_RECORD.match(data, i)
        if m:
            out[i // 512] = int(m.group(1))
    return out


def writer_acks(console: str) -> list[int]:
    """The seqs the writer acknowledged, in order, from its console log."""
    return [int(n) for n in WRITER_ACK.findall(console)]


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


def shared_libraries(program: Path) -> list[Path]:
    """The shared libraries ``program`` loads (``ldd``), the dynamic loader among them."""
    out = subprocess.run(
        ["ldd", str(program)], capture_output=True, text=True, check=True, timeout=30
    )
    found: list[Path] = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(", 1)[0].strip()
            if not target:  # linux-vdso.so.1 => (none): the kernel's
                continue
            if target == "not":
                raise SystemExit(f"guest_image: {program} needs {line}")
        else:
            target = line.split("(", 1)[0].strip()
        if target.startswith("/"):
            found.append(Path(target))
    return found


def program_files() -> list[Path]:
    """The programs of PROGRAMS and every library they load, sorted, once each
    (a library's path is the one ldd names, as the loader looks it up)."""
    missing = [f"{path} ({pkg})" for path, pkg in PROGRAMS.items() if not Path(path).exists()]
    if missing:
        raise SystemExit(
            "guest_image: missing "
            + ", ".join(missing)
            + ": install the packages (make setup does)"
        )
    files = {Path(p) for p in PROGRAMS}
    for program in PROGRAMS:
        files.update(shared_libraries(Path(program)))
    return sorted(files)


def _parents(paths: list[str]) -> list[str]:
    dirs: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


ETC = {
    # dropbear looks root up (getpwnam, files are built into glibc) and wants
    # its shell listed; the password is locked: public keys only
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/shells": "/bin/sh\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\n",
}


def initrd_entries(kver: str) -> list[tuple[str, int, bytes]]:
    directory, file_mode, exe = 0o040755, 0o100644, 0o100755
    modules = module_order(kver)
    programs = program_files()
    entries: list[tuple[str, int, bytes]] = [
        (d, directory, b"")
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp", "var")
    ]
    entries.append(("root", 0o040700, b""))
    have = {name for name, _, _ in entries}
    entries += [
        (d, directory, b"")
        for d in _parents([str(p).lstrip("/") for p in programs])
        if d not in have and d != "lib/modules"
    ]
    entries += [
        ("bin/busybox", exe, BUSYBOX.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),  # symlink: its data is the target
        ("init", exe, INIT.encode()),
        ("etc/modules.order", file_mode, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [
        (name, file_mode if name != "etc/shadow" else 0o100600, text.encode())
        for name, text in ETC.items()
    ]
    entries += [(f"lib/modules/{n}.ko", file_mode, _read_module(p)) for n, p in modules]
    # the real file under the path ldd names (a library path is often a symlink)
    entries += [(str(p).lstrip("/"), exe, p.resolve().read_bytes()) for p in programs]
    return entries


def image_key(kver: str) -> str:
    """What the cached image depends on: the init, the modules, busybox, the
    programs and their libraries."""
    digest = hashlib.sha256()
    digest.update(b"format %d\n" % FORMAT)
    digest.update(INIT.encode())
    for name, path in module_order(kver):
        digest.update(f"{name} {path}\n".encode())
    digest.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    for name, text in sorted(ETC.items()):
        digest.update(f"{name} {text}".encode())
    for path in program_files():
        digest.update(f"{path} ".encode() + hashlib.sha256(path.resolve().read_bytes()).digest())
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
