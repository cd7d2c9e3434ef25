#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: qemu_mirror_info
short_description: A running QEMU VM's disk and its mirror onto a havend export
version_added: 0.1.0
description:
  - Runs on the B(hypervisor) host and asks a running VM's QEMU, over its QMP unix socket, about one of its disks - its
    image, format and virtual size (the size the source node's volume of the disk needs, for
    M(haven.dr.protected_server)) - and the mirror job M(haven.dr.qemu_mirror) keeps on it, if any.
  - Changes nothing.
author:
  - haven.dr maintainers (@haven-dr)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  qmp_socket:
    description:
      - The VM's QMP unix socket on the hypervisor (QEMU's C(-qmp unix:PATH,server=on,wait=off)).
    type: path
    required: true
  device:
    description:
      - The VM's disk - its device id (C(-device ...,id=vda), the qdev id or QOM path of C(query-block)), its drive
        (BlockBackend) name (C(-drive ...,id=drive0)), or the node name at the top of its block graph. An unknown one
        fails the task, listing the VM's disks.
    type: str
    required: true
  qmp_timeout:
    description:
      - Seconds QEMU has to greet and to answer each command.
    type: float
    default: 30
attributes:
  check_mode:
    support: full
    details: It changes nothing, in check mode or not.
  diff_mode:
    support: none
  platform:
    platforms: posix
    details: The hypervisor host, where the VM's QMP socket is.
seealso:
  - module: haven.dr.qemu_mirror
"""

EXAMPLES = r"""
# It runs on the hypervisor the VM runs on, over the VM's QMP socket (its -qmp unix:PATH,server=on,wait=off).
- name: The web server's disk as its VM sees it
  haven.dr.qemu_mirror_info:
    qmp_socket: "{{ web1_qmp_socket }}"
    device: vda
  delegate_to: "{{ web1_hypervisor }}"
  register: web1_vda

- name: Show its size (the size of its volume on the source node) and its mirror
  ansible.builtin.debug:
    msg: >-
      {{ web1_vda.disk.device }}: {{ web1_vda.disk.virtual_size }} bytes ({{ web1_vda.disk.format }}
      {{ web1_vda.disk.file }}), mirror {{ (web1_vda.mirror or {}).status | default('none') }}
"""

RETURN = r"""
disk:
  description: The VM's disk O(device) names.
  returned: success
  type: dict
  contains:
    device:
      description: Its device id (the qdev id), else its drive name, else its node name - what its mirror is named after.
      returned: success
      type: str
      sample: vda
    qdev:
      description: The qdev id or QOM path of its device (null for a drive without a device).
      returned: success
      type: str
      sample: /machine/peripheral/vda/virtio-backend
    drive:
      description: Its drive (BlockBackend) name, null for a C(-blockdev) disk.
      returned: success
      type: str
      sample: drive0
    node_name:
      description: The node name at the top of its block graph.
      returned: success
      type: str
      sample: "#block154"
    file:
      description: Its image file.
      returned: success
      type: str
      sample: /var/lib/vms/web1/vda.qcow2
    format:
      description: The image's format.
      returned: success
      type: str
      sample: qcow2
    virtual_size:
      description: Bytes the guest sees, the size the source node's volume must have.
      returned: success
      type: int
      sample: 21474836480
mirror:
  description: The disk's mirror job of M(haven.dr.qemu_mirror) (as that module returns it), null when there is none.
  returned: success
  type: dict
  sample: {"job": "haven-mirror-vda", "node": "haven-nbd-vda", "export": "nbd://src1.example.com:10809/web1-vda",
           "status": "ready", "ready": true, "io_status": "ok", "bytes": 21474836480, "total": 21474836480,
           "eta_seconds": null, "error": null}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
from ansible_collections.haven.dr.plugins.module_utils._qmp import (
    Session,
    disk_info,
    job_view,
    look,
    names_of,
    node_export,
)


def run_module(params):
    block, job, node = Session(params["qmp_socket"], params["qmp_timeout"]).run(
        lambda qmp: look(qmp, params["device"])
    )
    return {
        "changed": False,
        "disk": disk_info(block),
        "mirror": job_view(job, names_of(block)[1], node_export(node)),
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            qmp_socket=dict(type="path", required=True),
            device=dict(type="str", required=True),
            qmp_timeout=dict(type="float", default=30.0),
        ),
        supports_check_mode=True,
    )
    try:
        result = run_module(module.params)
    except HavenError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
