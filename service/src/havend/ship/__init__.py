"""The source side of replication: capture writes into the group journal
(``ship.source``), commit them in groups, and ship them to the target
(``ship.shipper``) in the frames of ``link.wire``.
"""

from havend.ship.shipper import FailoverRefused, Shipper, ShipperSettings
from havend.ship.source import SourceGroup, group_dir

__all__ = ["FailoverRefused", "Shipper", "ShipperSettings", "SourceGroup", "group_dir"]
