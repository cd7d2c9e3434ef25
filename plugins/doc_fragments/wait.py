# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The twin of plugins/module_utils/_argspec.py wait_argspec(): change both together.
    DOCUMENTATION = r"""
options:
  wait:
    description:
      - Whether to wait until the operation has ended on the node, reporting its progress.
      - With V(false) the task returns as soon as havend has started the operation.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait. When they run out the task fails and returns what was seen last;
        the operation goes on on the node.
    type: float
    default: 3600
  wait_interval:
    description:
      - Seconds between two polls of the operation.
    type: float
    default: 1
"""
