# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Providers that run a recovery plan's servers (internal use only).

``get_provider("qemu", state_dir=..., image=...)`` or
``get_provider("libvirt", uri="qemu:///system", state_dir=..., image=...)``
returns one; the
interface is :class:`._base.Provider` (see docs/providers.md).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.haven.dr.plugins.module_utils.providers._base import ProviderError

KINDS = ("qemu", "libvirt")


def get_provider(kind, **options):
    """The provider ``kind`` (one of :data:`KINDS`) made with ``options``."""
    if kind == "qemu":
        from ansible_collections.haven.dr.plugins.module_utils.providers.qemu import QemuProvider

        return QemuProvider(**options)
    if kind == "libvirt":
        from ansible_collections.haven.dr.plugins.module_utils.providers.libvirt import LibvirtProvider

        return LibvirtProvider(**options)
    raise ProviderError(
        str(kind), "get_provider", "unknown provider (known: %s)" % ", ".join(KINDS), "provider"
    )
