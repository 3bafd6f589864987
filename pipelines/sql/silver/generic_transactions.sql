-- Generic transactions: no change feed, so silver is the distinct typed rows (an exact
-- duplicate line delivered twice counts once). Rows without customer, time or amount
-- are not dropped here: gold.py sends them to quarantine with the missing column named.
-- The optional columns are null where the mapping or the file lacks them (ingest checks
-- the required ones) and get their defaults here: one order per customer and instant, a
-- return when the amount is negative; gold names a missing product "unknown".
-- Run by DuckDB and by Spark: `timestamp_text` is the instant as text, which the two
-- dialects cast differently; each engine's view makes it (silver.TIMESTAMP_TEXT).
SELECT DISTINCT TRIM(customer_id) AS customer_id, timestamp AS ts, CAST(amount AS DOUBLE) AS amount,
       COALESCE(NULLIF(TRIM(order_id), ''), CONCAT(TRIM(customer_id), '@', timestamp_text)) AS order_id,
       NULLIF(TRIM(product_id), '') AS product_id,
       COALESCE(is_return, amount < 0) AS is_return
FROM generic_canonical
