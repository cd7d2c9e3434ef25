"""The tiny guest's shop roles (tools/guest_image.py) on real VMs under TCG:
``db`` goes on after the highest seq its disk already holds and serves its
last record, ``app`` asks the db for it, ``web`` shows the app's answer on
an HTTP page. Root (network namespaces, taps)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_havend
from nodes import subnet
from test_qemu_provider import BOOT, QemuProvider, get_provider, guest_image, net_name
from waiting import wait_until

RING = 2048 * 512


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[QemuProvider]:
    prov = get_provider(
        "qemu", state_dir=str(tmp_path / "qemu"), image=guest_image.build().as_dict()
    )
    try:
        yield prov
    finally:
        for name in prov.list(10):
            prov.destroy(name, 30)
        for spec in (tmp_path / "qemu" / "networks").glob("*.json"):
            prov.destroy_network(spec.stem, 30)


def _records(path: Path, seqs: range) -> None:
    """What a db that ran before left: records of ``seqs`` in its ring."""
    with open(path, "r+b") as disk:
        for seq in seqs:
            disk.seek((seq % 2048) * 512)
            disk.write(f"haven-seq {seq:016d} db1\n".encode().ljust(512, b"\0"))


def test_db_goes_on_from_its_disk_app_asks_it_web_shows_it(
    provider: QemuProvider, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    net, sub = net_name(), subnet()
    provider.create_network({"name": net, "cidr": f"{sub}.0/24", "isolated": False}, 30)
    disk = tmp_path / "db.img"
    disk.write_bytes(bytes(2 * RING))
    _records(disk, range(1, 43))  # seqs 1-42, as a db that ran before left them
    ip = {"db1": f"{sub}.11", "app1": f"{sub}.21", "web1": f"{sub}.31"}
    roles = {
        "db1": "db:5432",
        "app1": f"app:8080:{ip['db1']}:5432",
        "web1": f"web:80:{ip['app1']}:8080",
    }
    served = start_havend(disk, name="db")  # the db's disk over NBD, as a VM's disks are
    request.addfinalizer(served.stop)
    for name, role in roles.items():
        server = {
            "name": name,
            "memory": 192,
            "role": role,
            "nics": [{"network": net, "ip": f"{ip[name]}/24"}],
        }
        provider.create(server, [served.uri] if name == "db1" else [], 30)
        provider.power_on(name, BOOT)
    for name in roles:
        wait_until(
            lambda n=name: "haven: up" in provider.serial_log(n),
            BOOT,
            f"{name} to boot",
            detail=lambda n=name: provider.serial_log(n)[-2000:],
        )
    assert "haven: db vda from seq 42" in provider.serial_log("db1"), provider.serial_log("db1")[
        -2000:
    ]

    def acks() -> list[int] | None:
        got = guest_image.writer_acks(provider.serial_log("db1"))
        return got if len(got) >= 3 else None

    acks_seen = wait_until(acks, BOOT, "db1 to write")
    assert acks_seen[:3] == [43, 44, 45], acks_seen  # on after the disk's highest seq, not from 1

    def page() -> str | None:
        got = provider.guest_exec(
            "app1", ["/bin/sh", "-c", f"wget -q -O - http://{ip['web1']}/"], 30
        )
        return got["stdout"] if got["rc"] == 0 and "haven-seq" in got["stdout"] else None

    text = wait_until(
        page,
        BOOT,
        "web1 to show the last record",
        detail=lambda: provider.serial_log("web1")[-2000:],
    )
    shown = re.fullmatch(r"shop web web1: haven app1 app: haven-seq (\d{16}) db1\n", text)
    assert shown, text
    assert int(shown.group(1)) >= 43, text
    with open(disk, "rb") as f:  # what the page showed was written and synced
        assert guest_image.writer_records(f.read(RING)).get(int(shown.group(1)) % 2048) == int(
            shown.group(1)
        )
