"""The source side of replication: capture writes into the group journal
(``ship.source``), commit them in groups, and ship them to the target
(``ship.shipper``) in the frames of ``ship.wire``.
"""
