"""c360ml's deletion vectors against those written by Delta on the JVM.

Every reader tested elsewhere (delta-rs, Sail) is a Rust one, so a layout error both share
would pass unseen. The expected bytes below are the deletion vectors in the test tables
of the delta-rs project (crates/test/tests/data: table-with-dv-small,
cdf-table-with-cdc-and-dvs, table_with_deletion_logs), written by Databricks Runtime:
each is one vector of a `deletion_vector_<uuid>.bin` file (after its version byte and
4-byte size; before its CRC), with the row positions it deletes. c360ml's serializer must
write the same bytes for the same positions, and its Z85 must spell the file's UUID as the
JVM spelled it in the log.
"""

from __future__ import annotations

import uuid
import zlib

import numpy as np
import pytest

from c360ml.storage import deletion_vectors

JVM_WRITTEN = [
    ([6], "d1d339640100000000000000000000003a3000000100000000000000100000000600"),
    ([2, 3], "d1d339640100000000000000000000003a30000001000000000001001000000002000300"),
    ([1], "d1d339640100000000000000000000003a3000000100000000000000100000000100"),
    ([0], "d1d339640100000000000000000000003a3000000100000000000000100000000000"),
    ([0, 1, 2], "d1d339640100000000000000000000003a300000010000000000020010000000000001000200"),
    ([7], "d1d339640100000000000000000000003a3000000100000000000000100000000700"),
    ([5], "d1d339640100000000000000000000003a3000000100000000000000100000000500"),
    ([0, 9], "d1d339640100000000000000000000003a30000001000000000001001000000000000900"),
    ([2], "d1d339640100000000000000000000003a3000000100000000000000100000000200"),
    ([2, 79], "d1d339640100000000000000000000003a30000001000000000001001000000002004f00"),
]
# table-with-dv-small's vector file: its CRC, and the log's name for the file's UUID
SMALL_CRC = 0x2A671846
SMALL_UUID = "61d16c75-6994-46b7-a15b-8b538852e50e"
SMALL_Z85 = "vBn[lx{q8@P<9BNH/isA"


@pytest.mark.parametrize(("positions", "expected"), JVM_WRITTEN)
def test_our_vector_is_byte_for_byte_the_jvms(positions, expected):
    assert deletion_vectors.serialize(np.array(positions)).hex() == expected
    # in any order, with duplicates (a union of old and new positions)
    shuffled = np.array(positions[::-1] + positions)
    assert deletion_vectors.serialize(shuffled).hex() == expected


def test_the_descriptor_counts_and_sizes_as_the_jvm_does():
    positions, expected = JVM_WRITTEN[7]  # table-with-dv-small: sizeInBytes 36, cardinality 2
    found = deletion_vectors.descriptor(np.array(positions))
    assert (found["sizeInBytes"], found["cardinality"], found["storageType"]) == (36, 2, "i")
    assert zlib.crc32(bytes.fromhex(expected)) == SMALL_CRC  # the bytes the JVM checksummed


def test_z85_spells_as_the_jvm():
    assert deletion_vectors.z85(uuid.UUID(SMALL_UUID).bytes) == SMALL_Z85


def test_a_file_with_our_vector_has_wide_bounds_as_the_jvms(tmp_path):
    """table-with-dv-small's add with a vector says `"tightBounds":false`: its min and max
    still count the deleted rows. Without it a reader may answer a min or max from the
    statistics (Sail does: min 0 for a table whose rows 0-99 are deleted)."""
    import json

    import pyarrow as pa

    from c360ml.storage.lake import Lake

    lake = Lake(tmp_path / "lake")
    lake.write(pa.table({"k": np.arange(1_000)}), "gold", "t")
    files, _ = lake.live_files("gold", "t")
    lake.delete_and_append("gold", "t", deletes={files[0]: np.arange(100)})
    log = [
        json.loads(line)
        for path in sorted((tmp_path / "lake" / "gold" / "t" / "_delta_log").glob("*.json"))
        for line in path.read_text().splitlines()
    ]
    stats = [json.loads(a["add"]["stats"]) for a in log if a.get("add", {}).get("deletionVector")]
    assert stats == [{**stats[0], "tightBounds": False}] and stats[0]["minValues"] == {"k": 0}
    assert sorted(lake.read("gold", "t")["k"].to_pylist()) == list(range(100, 1_000))
