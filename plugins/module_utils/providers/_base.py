# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The interface every provider implements (internal use only).

A provider runs the servers of a recovery plan: it creates a VM from block
devices (NBD URIs of the target node's exports), powers it on and off,
pauses it, attaches it to networks, says its state, runs a command in it
through its guest agent (``guest_exec``) and destroys it. The plan
engine talks to providers only through this class.

Rules every provider keeps:

- every call takes ``timeout`` (seconds) and raises :class:`ProviderTimeout`
  naming the VM (or network) and what did not happen in time;
- every call is idempotent: creating what exists with the same spec, powering
  on what runs, destroying what is gone all succeed and change nothing; each
  call returns True when it changed something, False when not;
- state lives outside the process (on disk, in the hypervisor), so a new
  process - a retry of a failed task - finds the VMs and networks of an
  earlier one.

A *server* is a dict::

    {"name": "db1",                # unique per provider
     "memory": 256,                # MiB
     "cpus": 1,
     "role": "tcp:5432",           # what a tiny guest runs (qemu provider)
     "nics": [{"network": "drill", "ip": "10.0.0.2/24", "gateway": "10.0.0.1"}],
     "options": {...}}             # provider specific

*disks* is a list of NBD URIs (``nbd://host:port/export``) or dicts
``{"uri": ..., "readonly": False}``, the first one the boot disk.

A *network* is a dict ``{"name": "drill", "cidr": "10.0.0.0/24",
"isolated": True}``: an isolated network has no route to anywhere else.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError

# VM states that status() reports
ABSENT = "absent"  # no such VM
STOPPED = "stopped"  # created, not running (never started, powered off, crashed)
RUNNING = "running"
PAUSED = "paused"
STATES = (ABSENT, STOPPED, RUNNING, PAUSED)


class ProviderError(HavenError):
    """A provider call failed: ``name`` is the VM (or network, ``kind``) it
    was about, ``action`` the call (create, power_on...)."""

    def __init__(self, name, action, message, kind="vm", result=None):
        super().__init__(
            "%s %r: %s: %s" % (kind, name, action, message), result=result
        )
        self.name = name
        self.kind = kind
        self.action = action


class ProviderTimeout(ProviderError):
    """A provider call ran out of time; the message says what did not happen."""


def vm_name(server):
    """The VM name of ``server``: a name, a server dict, or an object with ``name``
    (the plan engine's ``Server``)."""
    if isinstance(server, str):
        return server
    if isinstance(server, dict):
        return server.get("name")
    return getattr(server, "name", server)


def disk_uri(disk):
    """(uri, readonly) of one entry of ``disks``."""
    if isinstance(disk, dict):
        return disk["uri"], bool(disk.get("readonly", False))
    return disk, False


class Provider:
    """What the plan engine calls. Subclasses implement every method."""

    #: the provider's name in a plan (``provider: qemu``)
    name = None

    # --- VMs -------------------------------------------------------------

    def create(self, server, disks, timeout):
        """Define the VM ``server["name"]`` from ``disks``, powered off.
        The same spec again: no change. A changed spec of a stopped VM
        replaces it; of a running one is an error."""
        raise NotImplementedError

    def power_on(self, name, timeout):
        """Start the VM (a paused one resumes); returns once it runs."""
        raise NotImplementedError

    def power_off(self, name, timeout):
        """Stop the VM: a clean shutdown (ACPI) if it comes in time, then a
        hard stop; returns once it is stopped."""
        raise NotImplementedError

    def pause(self, name, timeout):
        """Freeze the VM's CPUs (its disks and memory stay)."""
        raise NotImplementedError

    def resume(self, name, timeout):
        """Unfreeze a paused VM."""
        raise NotImplementedError

    def status(self, name, timeout):
        """``{"name", "state", ...}``, ``state`` one of :data:`STATES`."""
        raise NotImplementedError

    def destroy(self, name, timeout):
        """Stop the VM if it runs and remove everything of it; a missing VM is fine."""
        raise NotImplementedError

    def attach_network(self, name, nic, timeout):
        """Add ``nic`` (``{"network", "ip", "gateway"}``) to the VM's NICs."""
        raise NotImplementedError

    def list(self, timeout):
        """Names of the VMs this provider knows (for clean-up after a crash)."""
        raise NotImplementedError

    def guest_exec(self, name, argv, timeout):
        """Run ``argv`` (``argv[0]`` the program) inside the running VM through
        its guest agent and wait for it to exit: ``{"rc", "stdout",
        "stderr"}`` (rc the exit status; 128 + N when signal N killed it).
        An agent that does not answer, or a process that does not exit,
        within ``timeout`` is a :class:`ProviderTimeout`. A provider without
        a guest agent raises :class:`ProviderError` (this default)."""
        raise ProviderError(
            vm_name(name), "guest_exec", "the %s provider has no guest agent" % (self.name or "this")
        )

    # --- networks --------------------------------------------------------

    def create_network(self, network, timeout):
        """Create the network (see the module docstring); the same again: no change."""
        raise NotImplementedError

    def destroy_network(self, name, timeout):
        """Remove the network; a missing network is fine."""
        raise NotImplementedError
