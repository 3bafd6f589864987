-- Generic transactions as order lines, tied to the orders as order_lines.sql ties them.
-- A line's number orders its order's rows by every column (rows that tie are the same
-- line twice), nulls last written out: DuckDB puts them last, Spark first.
WITH all_orders AS (  -- every order with its quarantine reason (null when in gold/orders)
    SELECT order_id, CAST(NULL AS STRING) AS quarantine_reason FROM gold_orders
    UNION ALL
    SELECT order_id, quarantine_reason FROM quarantine_orders
)
SELECT CONCAT('GEN:', t.order_id) AS order_id,
       CAST(ROW_NUMBER() OVER (PARTITION BY t.order_id ORDER BY t.ts NULLS LAST, t.product_id NULLS LAST,
                                   t.amount NULLS LAST, t.is_return NULLS LAST) AS BIGINT) AS line,
       COALESCE(t.product_id, 'unknown') AS item_id, CAST(NULL AS STRING) AS category,
       CAST(CASE WHEN t.is_return THEN -1 ELSE 1 END AS DOUBLE) AS qty, ABS(t.amount) AS unit_price,
       t.amount AS net_amount, t.is_return,
       CASE WHEN o.quarantine_reason IS NOT NULL THEN CONCAT('order quarantined: ', o.quarantine_reason)
            END AS quarantine_reason
FROM silver_generic_transactions t
JOIN all_orders o ON o.order_id = CONCAT('GEN:', t.order_id)
