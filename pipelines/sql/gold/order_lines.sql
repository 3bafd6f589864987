-- Lines of both order kinds; `quarantine_reason` set for orphan lines and for lines of
-- orders that gold/orders quarantined (gold.py splits on it). A nullable part of a key
-- is COALESCEd to '' (as orders.sql does): DuckDB's CONCAT skips a NULL, Spark's returns NULL.
WITH all_orders AS (  -- every order with its quarantine reason (null when in gold/orders)
    SELECT order_id, CAST(NULL AS STRING) AS quarantine_reason FROM gold_orders
    UNION ALL
    SELECT order_id, quarantine_reason FROM quarantine_orders
),
lines AS (
    SELECT CONCAT('SO:', COALESCE(l.dataareaid, ''), '-', l.salesid) AS order_id, CAST(l.linenum AS BIGINT) AS line,
           l.itemid AS item_id, l.salesqty AS qty, l.salesprice AS unit_price,
           l.lineamount AS net_amount, l.salesqty < 0 AS is_return
    FROM silver_salesline l
    UNION ALL
    SELECT CONCAT('POS:', t.transactionid), CAST(t.linenum AS BIGINT), t.itemid, t.qty, t.price,
           t.netamount, (t.qty < 0 OR t.netamount < 0)
    FROM silver_retailtransactionsalestrans t
)
SELECT l.order_id, l.line, l.item_id, p.itemgroupid AS category,
       CAST(l.qty AS DOUBLE) AS qty, CAST(l.unit_price AS DOUBLE) AS unit_price,
       CAST(l.net_amount AS DOUBLE) AS net_amount, l.is_return,
       CASE WHEN o.order_id IS NULL THEN 'orphan line (no order header)'
            WHEN o.quarantine_reason IS NOT NULL THEN CONCAT('order quarantined: ', o.quarantine_reason)
            END AS quarantine_reason
FROM lines l
LEFT JOIN all_orders o ON o.order_id = l.order_id
LEFT JOIN silver_inventtable p ON p.itemid = l.item_id
