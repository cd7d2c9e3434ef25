"""NBD: how protected servers' writes enter havend.

``protocol`` is the sans-IO server side of the NBD protocol (bytes in, events
and replies out), ``constants`` its wire numbers, ``server`` the asyncio
adapter that serves :class:`havend.volume.FileVolume` exports on TCP and UNIX
sockets. Nothing here is persisted: the on-disk format is the volume itself, a
raw image byte for byte.
"""
