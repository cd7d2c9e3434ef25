"""havend: the block replication service of haven.dr.

Packages, one concern each:

- ``havend.nbd``: the NBD server, the data plane's front door (sans-IO protocol
  in ``nbd.protocol``, asyncio transport in ``nbd.server``).
- ``havend.volume``: the local block store behind an export.
"""

from __future__ import annotations

__version__ = "0.1.0"
