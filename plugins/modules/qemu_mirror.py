#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: qemu_mirror
short_description: Mirror a running QEMU VM's disk onto a havend source node's NBD export
version_added: 0.1.0
description:
  - Runs on the B(hypervisor) host and talks to a running VM's QEMU over its QMP unix socket (standard library
    only). With O(state=present), it adds an NBD block node for the source node's export of the disk (O(export), as
    M(haven.dr.protected_server) returns it) and starts a QEMU C(blockdev-mirror) job of O(device) onto it - a full
    copy first, then every write of the guest. The VM keeps running on its B(local disk); the job is left
    mirroring in its C(ready) state and is never completed (no pivot to the export).
  - With O(copy_mode=write-blocking) (the default), a guest write is written to the export before the guest sees
    it complete; once the job is C(ready) (what the task waits for), every write the guest has seen complete is on
    the export, so the replica on the recovery site has every acknowledged write the source node replicated.
    A guest's FLUSH is not passed to the export - havend acknowledges a write once it is in the volume file
    (it survives a havend crash, not a power loss of the source node).
    With V(background), writes are copied to the export a moment later (the guest never waits for it; the
    export lags behind by what is in flight).
  - B(When the export goes away later) (the source node restarts, the connection breaks) - QEMU waits for it
    to come back for O(reconnect_delay) seconds (the guest's writes wait too, in V(write-blocking) mode; a havend
    restart shorter than that is invisible), then the writes fail on the export only. With
    O(on_target_error=stop) (the default) the B(job) pauses (C(io-status) C(failed)); the VM is B(not) stopped and
    its writes go on to its local disk, QEMU remembering which regions the export misses. A later run of the task
    resumes the job, which copies just those regions (QEMU reconnects to the export in the background); if the job
    fails again at once, the task starts a new full copy onto a fresh connection. With V(report) the job ends at
    the first error and the next run starts a new full copy. A job that ended (failed, or cancelled by someone)
    is started again by the next run, with a warning giving QEMU's error. So running the task again converges
    back to mirroring.
  - Idempotent - a job of this module already mirroring O(device) to O(export) is left as it is (C(changed=false);
    O(copy_mode), O(on_target_error) and O(speed) apply when a job starts). A job of this module mirroring the device
    somewhere else fails the task naming it, unless O(force=true), which replaces it.
  - With O(state=absent), it cancels the job (C(block-job-cancel), which on a C(ready) mirror leaves the VM on its
    local disk and the export holding the disk as it was then) and removes the NBD node.
  - M(haven.dr.qemu_mirror_info) reports a disk (its virtual size - the size the source node's volume needs) and its
    mirror without changing anything.
  - The job and the NBD node are named after the disk (C(haven-mirror-<disk>), C(haven-nbd-<disk>)), so any run
    finds them whatever name of the disk O(device) gives.
  - QEMU's QMP socket serves one client at a time; the task holds it only for single exchanges (it connects again
    for each poll while it waits). A VM run by libvirt keeps its own monitor connection - give such a VM a second
    QMP socket (C(<qemu:commandline>) C(-qmp unix:/run/vm.qmp,server=on,wait=off)) for this module.
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
        (BlockBackend) name (C(-drive ...,id=drive0)), or the node name at the top of its block graph.
    type: str
    required: true
  export:
    description:
      - The source node's NBD export of the disk, C(nbd://HOST[:PORT]/NAME) (port 10809 by default) or
        C(nbd+unix:///NAME?socket=PATH), as reachable from the hypervisor. Required with O(state=present).
      - The export's size must be the disk's virtual size (M(haven.dr.qemu_mirror_info) reports it).
    type: str
  state:
    description:
      - V(present) - the disk mirrored onto O(export); V(absent) - no mirror of this module on the disk.
    type: str
    choices: [present, absent]
    default: present
  copy_mode:
    description:
      - How the guest's writes reach the export once the job runs (QEMU's C(copy-mode)), see the description.
      - V(write-blocking) - each write is on the export before the guest sees it complete.
      - V(background) - each write is copied a moment later; the guest never waits for the export.
    type: str
    choices: [write-blocking, background]
    default: write-blocking
  on_target_error:
    description:
      - What the job does when a write to the export fails (QEMU's C(on-target-error)). Neither stops the VM.
      - V(stop) - the job pauses, remembering what the export misses; the next run resumes it (a partial copy).
      - V(report) - the job ends; the next run starts a new full copy.
    type: str
    choices: [stop, report]
    default: stop
  reconnect_delay:
    description:
      - Seconds QEMU waits for a lost export to come back before failing the writes to it (its NBD
        C(reconnect-delay)); it keeps reconnecting in the background after that. V(0) - no reconnection at all (a
        broken connection can then only be replaced by a new full copy).
    type: int
    default: 5
  speed:
    description:
      - Bytes per second the job's own copying may use (the initial copy, a resumed job's catching up); V(0) - no
        limit. The guest's writes are never limited.
    type: int
    default: 0
  force:
    description:
      - Replace a mirror of this module that goes to another export (its job cancelled, its NBD node removed, a new
        full copy started).
    type: bool
    default: false
  wait:
    description:
      - Whether to wait until the job is C(ready) (the initial copy done, the export in step), reporting the
        progress. With V(false) the task returns once the job runs.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait for the job to be C(ready). When they run out, the task fails with what was seen last; the
        job goes on.
    type: float
    default: 3600
  wait_interval:
    description:
      - Seconds between two looks at the job while waiting.
    type: float
    default: 1
  qmp_timeout:
    description:
      - Seconds QEMU has to greet and to answer each command, and a cancelled job to end.
    type: float
    default: 30
attributes:
  check_mode:
    support: full
    details: In check mode QEMU is only queried; the result says what would be done (RV(action)).
  diff_mode:
    support: full
    details: The disk's mirror before and after (its job, export and status, or null).
  platform:
    platforms: posix
    details: The hypervisor host, where the VM's QMP socket is.
notes:
  - The export must be reachable from the hypervisor; havend's NBD listener has no TLS yet, so keep the path
    between the hypervisor and the source node on a trusted network.
  - In V(write-blocking) mode the guest's writes wait for the export. A connection that hangs without breaking (a
    black hole, no reset) makes them wait until TCP gives up; put the source node close to the hypervisor, or use
    V(background).
seealso:
  - module: haven.dr.qemu_mirror_info
  - module: haven.dr.protected_server
  - name: QEMU's blockdev-mirror
    description: The QMP command the job is started with.
    link: https://qemu-project.gitlab.io/qemu/interop/qemu-qmp-ref.html#command-QMP-block-core.blockdev-mirror
"""

EXAMPLES = r"""
# url, token and ca_path of the source node come from HAVEN_URL, HAVEN_TOKEN and HAVEN_CA_PATH
# here (haven.dr.protection_group and haven.dr.protected_server, admin scope); the mirror runs on
# the hypervisor the VM runs on, over the VM's QMP socket (its -qmp unix:PATH,server=on,wait=off).
- name: The size of the web server's disk as its VM sees it
  haven.dr.qemu_mirror_info:
    qmp_socket: "{{ web1_qmp_socket }}"
    device: vda
  delegate_to: "{{ web1_hypervisor }}"
  register: web1_vda

- name: The CRM's consistency group, with the disk of its application server
  haven.dr.protection_group:
    name: crm
    volumes:
      - {name: crm-app, path: crm/app.img, size: 536870912, server: crm-app1.example.com}

- name: The web server's disk in the same group, its volume as big as the VM's disk
  haven.dr.protected_server:
    name: crm-web1.example.com
    group: crm
    disks:
      - {name: crm-web1-vda, path: crm/web1-vda.img, size: "{{ web1_vda.disk.virtual_size }}"}
  register: web1

- name: Mirror the running VM's disk onto its export, waiting until every write reaches it
  haven.dr.qemu_mirror:
    qmp_socket: "{{ web1_qmp_socket }}"
    device: vda
    export: "{{ web1.server.disks[0].uri }}"
  delegate_to: "{{ web1_hypervisor }}"
  register: mirrored

- name: Show the progress of the initial copy
  ansible.builtin.debug:
    msg: "{{ mirrored.progress_lines }}"

- name: Again - the job already mirrors the disk there, nothing changes
  haven.dr.qemu_mirror:
    qmp_socket: "{{ web1_qmp_socket }}"
    device: vda
    export: "{{ web1.server.disks[0].uri }}"
  delegate_to: "{{ web1_hypervisor }}"

- name: Stop mirroring (the VM goes on on its local disk)
  haven.dr.qemu_mirror:
    qmp_socket: "{{ web1_qmp_socket }}"
    device: vda
    state: absent
  delegate_to: "{{ web1_hypervisor }}"

- name: Then stop replicating the disk
  haven.dr.protected_server:
    name: crm-web1.example.com
    state: absent
"""

RETURN = r"""
action:
  description:
    - What the task did (in check mode, would do) - V(none), V(started), V(resumed) (a paused job resumed),
      V(restarted) (a job that had ended, or that failed again once resumed, replaced by a new full copy),
      V(replaced) (O(force)), V(cancelled), V(removed) (a leftover NBD node removed).
  returned: success
  type: str
  sample: started
disk:
  description: The VM's disk O(device) names.
  returned: success
  type: dict
  contains:
    device:
      description: Its device id (the qdev id), else its drive name, else its node name - what the job is named after.
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
      sample: /var/lib/vms/db1/vda.qcow2
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
  description: The disk's mirror job after the task (in check mode, as before), null when there is none.
  returned: success
  type: dict
  contains:
    job:
      description: The QEMU job's id.
      returned: success
      type: str
      sample: haven-mirror-vda
    node:
      description: The NBD block node of the export.
      returned: success
      type: str
      sample: haven-nbd-vda
    export:
      description: Where it mirrors to (the NBD node's export), null when its node is gone.
      returned: success
      type: str
      sample: nbd://src1.example.com:10809/db1-vda
    status:
      description: QEMU's job status (C(running) while copying, C(ready) once in step, C(standby) or C(paused) when paused, C(concluded) once ended).
      returned: success
      type: str
      sample: ready
    ready:
      description: Whether the job reached C(ready) once.
      returned: success
      type: bool
      sample: true
    io_status:
      description: QEMU's C(io-status) of the job (C(ok), C(failed) after a write to the export failed, C(nospace)).
      returned: success
      type: str
      sample: ok
    bytes:
      description: Bytes copied so far (QEMU's C(offset)).
      returned: success
      type: int
      sample: 21474836480
    total:
      description: Bytes to copy so far (QEMU's C(len); it grows with the guest's writes).
      returned: success
      type: int
      sample: 21474836480
    eta_seconds:
      description: Seconds until the copy is done at the rate seen while waiting (null when unknown or done).
      returned: success
      type: float
      sample: 12.5
    error:
      description: QEMU's error of a job that ended, else null.
      returned: success
      type: str
      sample: null
progress_lines:
  description: The job's progress seen while waiting, one line each time it changed.
  returned: when the task waited
  type: list
  elements: str
  sample: ["vda to nbd://src1.example.com:10809/db1-vda: 8388608 of 21474836480 bytes (0 %) after 1 s"]
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError, HavenTimeout
from ansible_collections.haven.dr.plugins.module_utils._qmp import (
    ENDED,
    PAUSED,
    QmpCommandError,
    Session,
    canonical,
    describe_job,
    disk_info,
    disk_key,
    failed_paused,
    in_step,
    job_view,
    look,
    names_of,
    node_export,
    parse_export,
    unreachable,
)
from ansible_collections.haven.dr.plugins.module_utils._waiter import wait

RESUME_PROBE_SECONDS = 30.0  # how long a resumed job may take to reconnect before a new copy


class Mirror(object):
    """The module's run: the disk, its job and node, the plan, the changes."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.qmp = Session(self.p["qmp_socket"], self.p["qmp_timeout"])
        self.progress = []

    # -- reading

    def look(self, qmp):
        """(disk, job, node) as QEMU has them now."""
        block, job, node = look(qmp, self.p["device"])
        self.job_id, self.node_name = names_of(block)
        return block, job, node

    def node_export(self, node):
        return node_export(node)

    def job_now(self, qmp):
        jobs = [j for j in qmp.execute("query-block-jobs") if j.get("device") == self.job_id]
        return jobs[0] if jobs else None

    # -- changing

    def remove(self, qmp, job, node, force):
        """The job cancelled (if it runs) and dismissed, the node deleted."""
        if job is not None:
            if job.get("status") not in ENDED:
                qmp.execute("block-job-cancel", {"device": self.job_id, "force": bool(force)})
                ok, job, elapsed = wait(
                    lambda: self.job_now(qmp),
                    lambda j: j is None or j.get("status") in ENDED,
                    self.p["qmp_timeout"],
                    0.5,
                    first=0.05,
                )
                if not ok:
                    raise HavenError(
                        "the mirror job %s did not end within %.0f s of its cancel (%s)"
                        % (self.job_id, elapsed, describe_job(job))
                    )
            if job is not None and job.get("status") == "concluded":
                qmp.execute("job-dismiss", {"id": self.job_id})
        if node is not None:
            qmp.execute("blockdev-del", {"node-name": self.node_name})

    def start(self, qmp, block):
        server, export = parse_export(self.p["export"])
        add = {"driver": "nbd", "node-name": self.node_name, "server": server, "export": export}
        if self.p["reconnect_delay"]:
            add["reconnect-delay"] = self.p["reconnect_delay"]
        try:
            qmp.execute("blockdev-add", add)
        except QmpCommandError as exc:
            raise HavenError("cannot open the export %s from QEMU: %s" % (self.p["export"], exc.desc))
        try:
            size = disk_info(block)["virtual_size"]
            nodes = [n for n in qmp.execute("query-named-block-nodes") if n.get("node-name") == self.node_name]
            got = ((nodes[0].get("image") or {}).get("virtual-size")) if nodes else None
            if got is not None and size is not None and got != size:
                raise HavenError(
                    "the export %s has %d bytes, the disk %s %d: the source node's volume must be as big as the "
                    "disk's virtual size" % (self.p["export"], got, disk_key(block), size)
                )
            inserted = block.get("inserted") or {}
            mirror = {
                "job-id": self.job_id,
                "device": block.get("device") or inserted.get("node-name"),
                "target": self.node_name,
                "sync": "full",
                "copy-mode": self.p["copy_mode"],
                "on-source-error": "report",
                "on-target-error": self.p["on_target_error"],
                "auto-dismiss": False,  # a job that ended stays to say why (the next run reads it)
            }
            if self.p["speed"]:
                mirror["speed"] = self.p["speed"]
            try:
                qmp.execute("blockdev-mirror", mirror)
            except QmpCommandError as exc:
                jobs = ", ".join(
                    "%s (%s, %s)" % (j.get("device"), j.get("type"), j.get("status"))
                    for j in qmp.execute("query-block-jobs")
                )
                raise HavenError(
                    "cannot mirror %s: %s (the VM's block jobs: %s)" % (disk_key(block), exc.desc, jobs or "none")
                )
        except BaseException:
            try:
                qmp.execute("blockdev-del", {"node-name": self.node_name})
            except HavenError:
                pass
            raise

    # -- waiting

    def wait_ready(self, since_action):
        """Until the job is in step; the progress lines. A job that pauses on
        an error right after a resume is replaced once (``since_action``)."""
        p = self.p
        background = p["copy_mode"] == "background"
        seen = {"t0": None, "d0": 0, "eta": None}
        resumed = [since_action == "resumed"]
        started = time.time()

        def fetch():
            return self.qmp.run(self.job_now)

        def ready(job):
            if job is None:
                raise HavenError("the mirror job %s of %s is gone (dismissed by someone?)" % (self.job_id, p["device"]))
            if job.get("status") in ENDED:
                raise HavenError(
                    "the mirror of %s to %s failed: %s" % (p["device"], p["export"], job.get("error") or "it ended")
                )
            if failed_paused(job):
                if resumed[0] and time.time() - started < RESUME_PROBE_SECONDS:
                    # QEMU reconnects to the export in the background (backing off up to 16 s): resume
                    # again until it has, within the probe's time
                    self.qmp.run(self.resume)
                    return False
                if resumed[0]:
                    raise _Restart()
                raise HavenError(
                    "the mirror of %s to %s paused on a write error to the export (io-status %s): the export is "
                    "unreachable or refuses writes; the VM goes on on its local disk and the next run resumes the "
                    "job" % (p["device"], p["export"], job.get("io-status"))
                )
            return in_step(job, background)

        def on_poll(job, elapsed):
            if job is None:
                return
            done = job.get("offset") or 0
            if seen["t0"] is None:
                seen["t0"], seen["d0"] = elapsed, done
            else:
                t0, d0 = seen["t0"], seen["d0"]
                rate = (done - d0) / (elapsed - t0) if elapsed > t0 else 0
                left = (job.get("len") or 0) - done
                seen["eta"] = (left / rate) if rate > 0 and left > 0 else None
            line = "%s to %s: %s" % (p["device"], p["export"], describe_job(job, eta=seen["eta"]))
            if not self.progress or self.progress[-1].split(" after ")[0] != line:
                self.progress.append("%s after %.0f s" % (line, elapsed))
                self.module.log("haven.dr.qemu_mirror: " + self.progress[-1])

        try:
            ok, job, elapsed = wait(fetch, ready, p["wait_timeout"], p["wait_interval"], on_poll, first=0.1)
        except _Restart:
            return None
        if not ok:
            raise HavenTimeout(
                "after %.0f s the mirror of %s to %s is not ready: %s"
                % (elapsed, p["device"], p["export"], describe_job(job)),
                result={"progress_lines": self.progress, "mirror": job_view(job, self.node_name, self.p["export"])},
            )
        return job_view(job, self.node_name, canonical(p["export"]), seen["eta"] if not in_step(job, False) else None)

    # -- the run

    def plan(self, block, job, node):
        """(action, why) for the wanted state; refusals raise."""
        p = self.p
        if p["state"] == "absent":
            if job is not None:
                return "cancelled", None
            return ("removed", None) if node is not None else ("none", None)
        want = canonical(p["export"])
        if job is None:
            return "started", None
        have = self.node_export(node)
        if job.get("status") in ENDED:
            return "restarted", "the mirror job %s of %s had ended (%s): a new full copy starts" % (
                self.job_id,
                p["device"],
                job.get("error") or "no error",
            )
        if have != want:
            if not p["force"]:
                raise HavenError(
                    "device %s is mirrored to %s by job %s, not to %s: force=true replaces that mirror"
                    % (p["device"], have or "an export whose node is gone", self.job_id, want)
                )
            return "replaced", None
        if job.get("status") in PAUSED:
            return "resumed", None
        return "none", None

    def shown(self, job, node):
        if job is None:
            return None
        return {"job": self.job_id, "export": self.node_export(node), "status": job.get("status")}

    def run(self):
        p = self.p
        if p["state"] == "present":
            if not p["export"]:
                raise HavenError("state=present needs export (the source node's NBD URI of the disk)")
            canonical(p["export"])  # a bad URI fails before anything is done
        if p["state"] == "absent" and not os.path.exists(p["qmp_socket"]):
            self.module.warn(
                "no QMP socket at %s: the VM is not running, so nothing mirrors its disk" % p["qmp_socket"]
            )
            return {"changed": False, "action": "none", "disk": None, "mirror": None}
        block, job, node = self.qmp.run(self.look)
        action, warning = self.plan(block, job, node)
        result = {
            "changed": action != "none",
            "action": action,
            "disk": disk_info(block),
            "mirror": job_view(job, self.node_name, self.node_export(node)),
        }
        if action == "none" and (p["state"] == "absent" or not p["wait"]):
            return result
        after = None
        if p["state"] == "present":
            after = {"job": self.job_id, "export": canonical(p["export"]), "status": "ready"}
        if action != "none" and self.module._diff:
            result["diff"] = {"before": {"mirror": self.shown(job, node)}, "after": {"mirror": after}}
        if self.module.check_mode:
            return result
        if warning:
            self.module.warn(warning)

        def change(qmp):
            if action in ("cancelled", "removed"):
                current_job, current_node = self.job_now(qmp), self._node(qmp)
                force = current_job is not None and current_job.get("io-status", "ok") != "ok"
                self.remove(qmp, current_job, current_node, force)
            elif action == "resumed":
                self.resume(qmp)
            elif action in ("started", "restarted", "replaced"):
                self.replace(qmp, block)

        if action != "none":
            self.qmp.run(change)
        if p["state"] == "absent":
            result["mirror"] = None
            return result
        if p["wait"]:
            try:
                view = self.wait_ready(action)
                if view is None:  # resumed, failed again at once: a new connection, a new full copy
                    self.module.warn(
                        "the resumed mirror job %s of %s failed again at once: a new full copy starts on a new "
                        "connection to the export" % (self.job_id, p["device"])
                    )
                    result["action"] = action = "restarted"
                    self.qmp.run(lambda qmp: self.replace(qmp, block))
                    view = self.wait_ready(action)
            except HavenError as exc:  # what was done before, and what was seen
                seen = dict(result, progress_lines=self.progress)
                seen.update(exc.result or {})
                exc.result = seen
                raise
            result["progress_lines"] = self.progress
        else:
            view = job_view(self.qmp.run(self.job_now), self.node_name, canonical(p["export"]))
        result["mirror"] = view
        return result

    def resume(self, qmp):
        """A paused job resumed (one that is not paused any more is left as it is)."""
        try:
            qmp.execute("block-job-resume", {"device": self.job_id})
        except QmpCommandError as exc:
            if exc.klass != "GenericError":
                raise

    def replace(self, qmp, block):
        """Whatever job and node of the disk there are removed, a new mirror
        started; a job is kept (with what it knows the export misses) while the
        export cannot be reached."""
        job = self.job_now(qmp)
        if job is not None and job.get("status") not in ENDED:
            why = unreachable(parse_export(self.p["export"])[0], self.p["qmp_timeout"])
            if why is not None:
                raise HavenError(
                    "cannot reach the export %s from here (%s): the mirror job %s of %s is left as it is (%s); "
                    "run again once the source node is back"
                    % (self.p["export"], why, self.job_id, self.p["device"], describe_job(job))
                )
        self.remove(qmp, job, self._node(qmp), True)
        self.start(qmp, block)

    def _node(self, qmp):
        nodes = [n for n in qmp.execute("query-named-block-nodes") if n.get("node-name") == self.node_name]
        return nodes[0] if nodes else None


class _Restart(Exception):
    """A resumed job failed again at once (internal)."""


def main():
    module = AnsibleModule(
        argument_spec=dict(
            qmp_socket=dict(type="path", required=True),
            device=dict(type="str", required=True),
            export=dict(type="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            copy_mode=dict(type="str", choices=["write-blocking", "background"], default="write-blocking"),
            on_target_error=dict(type="str", choices=["stop", "report"], default="stop"),
            reconnect_delay=dict(type="int", default=5),
            speed=dict(type="int", default=0),
            force=dict(type="bool", default=False),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="float", default=3600.0),
            wait_interval=dict(type="float", default=1.0),
            qmp_timeout=dict(type="float", default=30.0),
        ),
        required_if=[("state", "present", ["export"])],
        supports_check_mode=True,
    )
    try:
        result = Mirror(module).run()
    except HavenError as exc:
        module.fail_json(msg=str(exc), **(exc.result or {}))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
