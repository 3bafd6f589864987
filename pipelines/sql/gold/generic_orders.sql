-- Generic transactions as orders (one per order_id) with the same columns as orders.sql.
SELECT CONCAT('GEN:', t.order_id) AS order_id, m.customer_id, MIN(t.ts) AS order_ts,
       'unknown' AS channel, CAST(NULL AS STRING) AS store, CAST(NULL AS STRING) AS currency,
       SUM(CASE WHEN t.amount > 0 THEN t.amount ELSE 0 END) AS gross_amount,
       CAST(0 AS DOUBLE) AS discount_amount, SUM(t.amount) AS net_amount,
       CAST(COUNT(*) AS DOUBLE) AS item_count,
       (BOOL_OR(t.is_return) AND SUM(t.amount) <= 0) OR SUM(t.amount) < 0 AS is_return,
       'completed' AS status, FALSE AS is_cancelled,
       CASE WHEN m.customer_id IS NULL THEN 'missing customer_id' END AS quarantine_reason
FROM silver_generic_transactions t
LEFT JOIN gold_customer_source_map m ON m.source = 'generic' AND m.source_key = t.customer_id
GROUP BY t.order_id, m.customer_id
