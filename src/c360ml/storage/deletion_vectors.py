"""Delta deletion vectors: row positions as the protocol's inline descriptor.

Why: delta-rs (1.6) reads deletion vectors and keeps them through its own merges,
deletes, optimize and vacuum, but writes none: every row-level change rewrites whole
files. A 1% refresh changes rows in every file of the big silver and gold tables (status
changes, erased and re-linked customers lie everywhere), so each one rewrote the table.
`c360ml.storage.lake` writes these descriptors in its own commits (merge on read); any Delta
reader (delta-rs' DataFusion scan, Spark, DuckDB's delta extension) applies them.

Format (Delta PROTOCOL.md, "Deletion Vector Format"): the magic number 1681511377, then
a 64-bit "RoaringBitmapArray" (a count of 32-bit Roaring bitmaps, each with its high 32
bits as key, in the portable Roaring serialization: array containers up to 4,096
values per 65,536 rows, bitmap containers above), stored inline as Z85 text.
"""

from __future__ import annotations

import numpy as np

MAGIC = 1681511377
SERIAL_COOKIE_NO_RUNCONTAINER = 12346
ARRAY_MAX = 4096  # a container with more values is a 65,536-bit bitmap
Z85 = np.frombuffer(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#",
    np.uint8,
)


def _roaring32(low: np.ndarray) -> bytes:
    """Portable serialization of one 32-bit Roaring bitmap (sorted unique uint32)."""
    keys, starts = np.unique(low >> 16, return_index=True)
    ends = np.append(starts[1:], len(low))
    cards = ends - starts
    header = np.empty(2 * len(keys), "<u2")
    header[0::2], header[1::2] = keys, cards - 1
    bodies = []
    for start, end in zip(starts, ends, strict=True):
        values = (low[start:end] & 0xFFFF).astype("<u2")
        if end - start <= ARRAY_MAX:
            bodies.append(values.tobytes())
        else:
            bits = np.zeros(1 << 16, bool)
            bits[values] = True
            bodies.append(np.packbits(bits, bitorder="little").tobytes())
    head = 8 + 4 * len(keys) + 4 * len(keys)  # cookie, count, key/cardinality, offsets
    offsets = head + np.concatenate([[0], np.cumsum([len(b) for b in bodies])[:-1]])
    return b"".join(
        [
            np.array([SERIAL_COOKIE_NO_RUNCONTAINER, len(keys)], "<u4").tobytes(),
            header.tobytes(),
            offsets.astype("<u4").tobytes(),
            *bodies,
        ]
    )


def serialize(positions: np.ndarray) -> bytes:
    """The deletion vector of these row positions (any order, duplicates allowed)."""
    rows = np.unique(np.asarray(positions, np.uint64))
    highs, starts = np.unique(rows >> np.uint64(32), return_index=True)
    ends = np.append(starts[1:], len(rows))
    parts = [np.array([MAGIC], "<i4").tobytes(), np.array([len(highs)], "<i8").tobytes()]
    for high, start, end in zip(highs, starts, ends, strict=True):
        parts.append(np.array([high], "<u4").tobytes())
        parts.append(_roaring32((rows[start:end] & np.uint64(0xFFFFFFFF)).astype(np.uint32)))
    return b"".join(parts)


def z85(data: bytes) -> str:
    """Z85 text of the bytes, zero-padded to a multiple of 4 (the descriptor's size is
    the unpadded one)."""
    padded = data + b"\0" * (-len(data) % 4)
    words = np.frombuffer(padded, ">u4").astype(np.uint64)
    digits = np.empty((len(words), 5), np.uint8)
    for i in range(4, -1, -1):
        digits[:, i] = Z85[(words % 85).astype(np.intp)]
        words //= 85
    return digits.tobytes().decode("ascii")


def descriptor(positions: np.ndarray) -> dict:
    """The `deletionVector` field of an add action deleting these row positions."""
    data = serialize(positions)
    return {
        "storageType": "i",
        "pathOrInlineDv": z85(data),
        "sizeInBytes": len(data),
        "cardinality": int(len(np.unique(positions))),
    }
