"""The write journal of a consistency group: every captured write, in order, durably.

One journal per consistency group holds one sequence for all the group's
volumes, so a database volume and its log volume are shipped in one write
order. The source node appends a record for each write it acknowledges and
makes them durable in groups (one ``fdatasync`` for many records); the shipper
reads them from the target's last durable sequence; records the target has
acknowledged are released.

On-disk format (all integers little-endian), in the group's journal directory:

``superblock``
    Two 4 KiB slots, A at offset 0 and B at 4096, written alternately so one is
    always whole. A slot::

        magic "HVNJSUPR" | u32 version | u32 crc32c (of the slot with this field 0)
        u64 generation | 16 bytes group UUID
        u64 segment size | u32 max segments | u32 reserved
        u64 tail segment index | u64 tail seq   (oldest record still kept)
        u64 head segment index | u64 head offset | u64 head seq  (a recovery hint)

    The valid slot with the highest generation wins. The head is a hint where to
    start scanning (written at each segment roll and on close); the scan, not
    the hint, decides where the journal ends.

``seg-<index, 16 hex digits>.log``
    Preallocated segments of a fixed size, created under a temporary name,
    fsynced, renamed and the directory fsynced. A 64-byte header::

        magic "HVNJSEG1" | u32 version | u32 crc32c | u64 index | u64 first seq

    then records, each 8-byte aligned::

        magic "HJR1" | u32 crc32c (of the header after this field, and the payload)
        u16 kind | u16 volume | u32 payload length
        u64 seq | u64 offset | u64 length | u64 timestamp (ns since the epoch)
        u64 durable (the journal's durable seq when the record was written)
        payload, zero-padded to a multiple of 8

Sequences are consecutive: a record whose seq is not the previous one plus one
is not part of the journal.

Recovery (``havend.journal.recovery``) scans from the head hint. At the first
invalid record it looks at every valid record after it: if one of them says
(in its ``durable`` field) that the missing seq had already been made durable,
acknowledged data was lost and the journal is *corrupt*: reported with its
segment, offset and seq, never applied. Otherwise it is a *torn tail* (a crash
before the group commit's fdatasync, so nothing from there on was ever
acknowledged): it is zeroed and appends resume there.
"""

from havend.journal.journal import Journal, JournalFull
from havend.journal.record import Kind, Record

__all__ = ["Journal", "JournalFull", "Kind", "Record"]
