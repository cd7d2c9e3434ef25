"""The replication link's codec, shared by both ends: frames without I/O
(``link.wire``), a session's opening as records (``link.hello``: ``Hello``,
``Welcome``, checked key by key) and reading whole frames from a connection
(``link.stream``).

Neither end's package imports the other's: the source (``havend.ship``) and
the target (``havend.target``) both speak through this one. Nothing here is
persisted.
"""
