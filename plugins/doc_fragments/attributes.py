# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Every module: it runs where Ansible runs it and talks to the node over HTTPS.
    # Used with ansible.builtin.action_common_attributes, which describes the attributes.
    DOCUMENTATION = r"""
attributes:
  platform:
    platforms: all
"""

    # A module that reads only.
    INFO_MODULE = r"""
attributes:
  check_mode:
    support: full
    details: It changes nothing on the node, in check mode or not.
  diff_mode:
    support: none
"""

    # A module that changes something on the node.
    CHANGES = r"""
attributes:
  check_mode:
    support: full
    details: In check mode the node is read and nothing is changed; the result says what would change.
  diff_mode:
    support: full
"""
