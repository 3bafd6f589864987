"""Lake tables as DuckDB views over their live Parquet files."""

from __future__ import annotations

import pyarrow as pa
from deltalake import write_deltalake

from c360ml.medallion.sql import duckdb_connection, register
from c360ml.storage.lake import Lake


def test_view_reads_live_files_only_by_column_name_and_empty_tables(tmp_path):
    lake = Lake(tmp_path)
    where = str(lake.path("silver", "t"))
    lake.path("silver").mkdir(parents=True)
    write_deltalake(where, pa.table({"k": [1, 2], "v": ["a", "b"]}))
    write_deltalake(where, pa.table({"k": [3], "v": ["c"], "w": [1.5]}), mode="append",
                    schema_mode="merge")  # fmt: skip
    write_deltalake(
        where, pa.table({"k": [9], "v": ["z"]}), mode="overwrite", schema_mode="overwrite"
    )
    write_deltalake(where, pa.table({"v": ["d"], "k": [4], "w": [2.5]}), mode="append",
                    schema_mode="merge")  # fmt: skip
    write_deltalake(str(lake.path("silver", "e")), pa.table({"k": pa.array([], pa.int64())}))
    con = duckdb_connection()
    register(con, lake, "silver_t", "silver", "t")
    register(con, lake, "silver_e", "silver", "e")
    rows = con.sql("SELECT k, v, w FROM silver_t ORDER BY k").fetchall()
    assert rows == [(4, "d", 2.5), (9, "z", None)]  # the live version, columns by name
    assert con.sql("SELECT COUNT(*) FROM silver_e").fetchall() == [(0,)]
