-- Valid-from/valid-to status of each gold order, rebuilt from the bronze change feed
-- (every version, not just the current one), so features can ask what the status was
-- at a past cutoff. A version is valid from its source modification time. Nulls sort
-- last, written out: DuckDB's default, not Spark's. The parts of a key are COALESCEd to
-- '' (bronze is not validated): DuckDB's CONCAT skips a NULL, Spark's returns NULL.
WITH versions AS (
    SELECT CONCAT('SO:', COALESCE(dataareaid, ''), '-', COALESCE(salesid, '')) AS entity_id,
           CASE salesstatus WHEN 1 THEN 'open' WHEN 2 THEN 'delivered' WHEN 3 THEN 'invoiced'
                WHEN 4 THEN 'cancelled' ELSE 'unknown' END AS status,
           salesstatus = 4 AS is_cancelled,
           createddatetime AS created_ts,
           COALESCE(modifieddatetime, createddatetime) AS changed_ts, versionnumber
    FROM bronze_d365_salestable WHERE NOT COALESCE(IsDelete, FALSE)
    UNION ALL
    SELECT CONCAT('POS:', COALESCE(transactionid, '')),
           CASE WHEN entrystatus = 1 THEN 'voided' ELSE 'completed' END,
           entrystatus = 1, createddatetime,
           COALESCE(modifieddatetime, createddatetime), versionnumber
    FROM bronze_d365_retailtransactiontable WHERE NOT COALESCE(IsDelete, FALSE)
),
ranked AS (
    -- one pass: each version's first row (by modified time), and which row is the first
    SELECT v.entity_id, v.status, v.is_cancelled, v.versionnumber, v.created_ts, v.changed_ts,
           ROW_NUMBER() OVER w AS pos, LAG(v.versionnumber) OVER w AS previous_version
    FROM versions v JOIN gold_orders o ON o.order_id = v.entity_id
    WINDOW w AS (PARTITION BY v.entity_id ORDER BY v.versionnumber NULLS LAST, v.changed_ts NULLS LAST)
)
SELECT entity_id, status, is_cancelled,
       -- the first version is valid from the order's creation, whatever its modified time
       CASE WHEN pos = 1 THEN LEAST(created_ts, changed_ts) ELSE changed_ts END AS valid_from,
       LEAD(changed_ts) OVER (PARTITION BY entity_id ORDER BY versionnumber NULLS LAST) AS valid_to
FROM ranked
WHERE previous_version IS NULL OR previous_version <> versionnumber
