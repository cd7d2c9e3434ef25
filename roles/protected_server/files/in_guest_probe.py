# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
# ruff: noqa: UP031 - %-formatting, like the collection's modules that run on managed hosts
"""haven.dr protected_server, in_guest: what the server's disks are now.

Run by the role on the protected server (``ansible.builtin.script``), read
only: it changes nothing, so the role checks every disk before it changes
anything. The argument is base64 of JSON ``{"disks": [{"name", "device"}],
"records": DIR}``; it prints JSON:

- ``disks``: per disk ``name``, ``device`` (as given), ``real`` (resolved),
  ``size`` (bytes), ``action`` - ``create`` (a blank device, or an ext2/3/4
  filesystem that ends at least TAIL bytes before the end: kept, ``adopt``
  says so), ``assemble`` (the disk's own array, not running) or ``active``
  (its array runs) - or ``problem``, why the role refuses it; ``md`` (the
  running array: ``device``, ``raid_disks``, ``degraded``, ``sync_action``,
  ``backlog``, ``members`` by kernel name with their state) and ``nbd``, the
  device of its NBD leg (the recorded one, else a free one), with ``leg``
  (``connected``, ``member``, ``in_sync``, ``faulty``).
- ``records``: the disks the role set up on this server (``DIR/NAME.env``).

Python 3 standard library only (the server's interpreter).
"""

import base64
import errno
import json
import os
import re
import stat
import struct
import subprocess
import sys

TAIL = 1 << 20  # room md's 1.0 superblock and internal bitmap need at the end (at most 140 KiB)
EXT = ("ext2", "ext3", "ext4")


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def records(where):
    found = {}
    if not os.path.isdir(where):
        return found
    for leaf in sorted(os.listdir(where)):
        if not leaf.endswith(".env"):
            continue
        values = {}
        for line in (read(os.path.join(where, leaf), "") or "").splitlines():
            m = re.match(r"^HAVEN_([A-Z_]+)=(.*)$", line.strip())
            if m:
                values[m.group(1).lower()] = m.group(2).strip("'\"")
        if values.get("disk"):
            found[values["disk"]] = values
    return found


def blkid(device):
    """Signatures of ``device`` (low-level probe, nothing cached): dict, or
    {"AMBIVALENT": ...} when libblkid finds several."""
    try:
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", device],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,  # its exit status is read below (2: no signature)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ERROR": str(exc)}
    if out.returncode == 2:
        return {}
    if out.returncode == 8:
        return {"AMBIVALENT": (out.stderr or out.stdout).strip() or "several signatures"}
    tags = {}
    for line in out.stdout.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            tags[key] = value
    if out.returncode != 0 and not tags:
        return {"ERROR": (out.stderr or "blkid exited %d" % out.returncode).strip()}
    return tags


def ext_bytes(device):
    """The size of the ext2/3/4 filesystem at the start of ``device``."""
    with open(device, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 0x158 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    blocks = struct.unpack_from("<I", sb, 4)[0]
    if struct.unpack_from("<I", sb, 0x60)[0] & 0x80:  # INCOMPAT_64BIT
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    return blocks * (1024 << struct.unpack_from("<I", sb, 24)[0])


def mounts_of(kname):
    """Mount points of /dev/<kname> and its partitions."""
    numbers = set()
    for name in [kname, *sorted(os.listdir("/sys/class/block/%s" % kname))]:
        dev = read("/sys/class/block/%s/dev" % name)
        if dev and (name == kname or name.startswith(kname)):
            numbers.add(dev)
    points = []
    for line in (read("/proc/self/mountinfo", "") or "").splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] in numbers:
            points.append(fields[4])
    return points


def md_info(md):
    base = "/sys/block/%s/md" % md
    members = {}
    for leaf in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if leaf.startswith("dev-"):
            members[leaf[4:]] = {
                "state": (read("%s/%s/state" % (base, leaf), "") or "").split(","),
                "slot": read("%s/%s/slot" % (base, leaf)),
            }

    def number(leaf):
        value = read("%s/%s" % (base, leaf))
        return int(value) if value and value.isdigit() else None

    return {
        "device": "/dev/" + md,
        "level": read(base + "/level"),
        "metadata": read(base + "/metadata_version"),
        "array_state": read(base + "/array_state"),
        "raid_disks": number("raid_disks"),
        "degraded": number("degraded"),
        "sync_action": read(base + "/sync_action"),
        "sync_completed": read(base + "/sync_completed"),
        "backlog": number("bitmap/backlog"),
        "bitmap": read(base + "/bitmap/location"),
        "members": members,
    }


def nbd_devices():
    names = [n for n in os.listdir("/sys/block") if re.match(r"^nbd\d+$", n)]
    if not names:  # the module not loaded yet: its default nbds_max
        names = ["nbd%d" % i for i in range(16)]
    return sorted(names, key=lambda n: int(n[3:]))


def nbdtab_devices():
    used = set()
    for line in (read("/etc/nbdtab", "") or "").splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            used.add(fields[0].replace("/dev/", ""))
    return used


def connected(kname):
    return os.path.exists("/sys/block/%s/pid" % kname)


def ours(tags, name):
    label = tags.get("LABEL", "")
    return label == name or label.endswith(":" + name)


def probe(disk, recorded):
    name, device = disk["name"], disk.get("device") or ""
    out = {
        "name": name,
        "device": device,
        "real": None,
        "size": None,
        "action": None,
        "problem": None,
    }
    out["adopt"] = out["md"] = None
    out["volume"] = {}
    out["nbd"] = (recorded or {}).get("nbd")

    def refuse(why):
        out["problem"] = "disk %s: %s" % (name, why)
        return out

    if not device:
        return refuse("no device given (protected_server_disks[].device, the local disk to mirror)")
    real = os.path.realpath(device)
    out["real"] = real
    try:
        st = os.stat(real)
    except OSError:
        return refuse("%s does not exist on this server" % device)
    if not stat.S_ISBLK(st.st_mode):
        return refuse("%s is not a block device" % device)
    kname = None
    for candidate in os.listdir("/sys/class/block"):
        if read("/sys/class/block/%s/dev" % candidate) == "%d:%d" % (
            os.major(st.st_rdev),
            os.minor(st.st_rdev),
        ):
            kname = candidate
    if kname is None:
        return refuse("%s: no such block device in /sys/class/block" % device)
    if kname.startswith(("nbd", "md")):
        return refuse("%s is itself an NBD or md device: give the local disk" % device)
    size = int(read("/sys/class/block/%s/size" % kname, "0")) * 512
    out["size"] = size
    out["volume"] = {"size": size}  # what the registration of its volume adds to the disk
    if size % 4096 or size < 4 * TAIL:
        return refuse(
            "%s is %d bytes: a disk of at least 4 MiB, a multiple of 4096" % (device, size)
        )
    holders = sorted(os.listdir("/sys/class/block/%s/holders" % kname))
    tags = blkid(real)
    mds = [h for h in holders if h.startswith("md")]
    if mds:
        md = md_info(mds[0])
        label = tags.get("LABEL", "?")
        if not ours(tags, name):
            return refuse(
                "%s is a leg of md array %s (name %s): the role does not take a disk out of "
                "another array" % (device, md["device"], label)
            )
        if md["level"] != "raid1" or md["metadata"] != "1.0":
            return refuse(
                "%s is in %s, a %s array with metadata %s, not the role's raid1 with metadata 1.0"
                % (device, md["device"], md["level"], md["metadata"])
            )
        others = [
            m for m in md["members"] if m not in (kname, (out["nbd"] or "").replace("/dev/", ""))
        ]
        if others:
            return refuse(
                "%s is in %s with other legs too (%s): not an array the role made"
                % (device, md["device"], ", ".join(others))
            )
        out["md"] = md
        out["action"] = "active"
        return out
    if holders:
        return refuse(
            "%s is in use by %s (device-mapper, LVM, ...): not taken" % (device, ", ".join(holders))
        )
    points = mounts_of(kname)
    if points:
        return refuse(
            "%s is mounted (%s): unmount it first, the role puts it under /dev/md/%s and "
            "that is what you mount then" % (device, ", ".join(points), name)
        )
    try:
        os.close(os.open(real, os.O_RDONLY | os.O_EXCL))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return refuse("%s is busy (in use, swap?): not taken" % device)
        return refuse("%s cannot be opened: %s" % (device, exc.strerror))
    if "ERROR" in tags or "AMBIVALENT" in tags:
        return refuse(
            "%s: blkid cannot tell what it holds (%s): not taken"
            % (device, tags.get("ERROR") or tags.get("AMBIVALENT"))
        )
    kind = tags.get("TYPE") or tags.get("PTTYPE")
    if kind == "linux_raid_member":
        if ours(tags, name) and tags.get("VERSION") == "1.0":
            out["action"] = "assemble"
            return out
        return refuse(
            "%s holds the md superblock of another array (name %s, UUID %s): not taken"
            % (device, tags.get("LABEL", "?"), tags.get("UUID", "?"))
        )
    if kind in EXT:
        fs = ext_bytes(real)
        if fs is None:
            return refuse("%s: blkid says %s but its superblock cannot be read" % (device, kind))
        disk_size = int(out["size"])
        if fs + TAIL > disk_size:
            return refuse(
                "%s holds a filesystem (%s) of %d bytes that reaches into the last MiB of the "
                "%d-byte device, where md's superblock and bitmap go (metadata 1.0): shrink it "
                "first (resize2fs %s %dK), or give a larger device"
                % (device, kind, fs, disk_size, device, (disk_size - TAIL) // 1024)
            )
        out["adopt"] = {"type": kind, "bytes": fs}
        out["action"] = "create"
        return out
    if kind:
        return refuse(
            "%s holds %s (%s): only a blank device or an ext2/3/4 filesystem with 1 MiB free "
            "at the end of the device is taken in"
            % (device, kind, "a partition table" if tags.get("PTTYPE") else "a signature")
        )
    out["action"] = "create"
    return out


def main():
    args = json.loads(base64.b64decode(sys.argv[1]).decode())
    recs = records(args["records"])
    disks = [probe(d, recs.get(d["name"])) for d in args["disks"]]
    names = [d["name"] for d in args["disks"]]
    devices = [d["real"] for d in disks if d["real"]]
    for d in disks:
        if not d["problem"] and devices.count(d["real"]) > 1:
            d["problem"] = "disk %s: %s is given for more than one disk" % (d["name"], d["device"])
    used = set(r.get("nbd", "").replace("/dev/", "") for r in recs.values()) | nbdtab_devices()
    free = [n for n in nbd_devices() if n not in used and not connected(n)]
    for d in disks:
        if d["nbd"] is None and not d["problem"]:
            if not free:
                d["problem"] = "disk %s: no free NBD device left (/dev/nbd*, nbds_max)" % d["name"]
                continue
            d["nbd"] = "/dev/" + free.pop(0)
        if d["nbd"]:
            kname = d["nbd"].replace("/dev/", "")
            members = (d["md"] or {}).get("members", {})
            state = members.get(kname, {}).get("state", [])
            d["leg"] = {
                "connected": connected(kname),
                "member": kname in members,
                "in_sync": "in_sync" in state,
                "faulty": "faulty" in state,
                "write_mostly": "write_mostly" in state,
            }
    for rec in recs.values():  # what detaching a disk finds
        kname = rec.get("nbd", "").replace("/dev/", "")
        md = os.path.basename(os.path.realpath(rec.get("md", "/nonexistent")))
        info = md_info(md) if os.path.isdir("/sys/block/%s/md" % md) else None
        rec["connected"] = bool(kname) and connected(kname)
        rec["member"] = bool(info) and kname in info["members"]
        rec["raid_disks"] = (info or {}).get("raid_disks")
    print(
        json.dumps(
            {
                "disks": disks,
                "records": recs,
                "unlisted": sorted(n for n in recs if n not in names),
                "problems": [d["problem"] for d in disks if d["problem"]],
                "nbd_loaded": os.path.isdir("/sys/module/nbd"),
                "update_initramfs": os.path.exists("/usr/sbin/update-initramfs"),
            }
        )
    )


if __name__ == "__main__":
    main()
