-- Every order from both Commerce paths, before the known-customer split (gold.py keeps
-- rows with a customer_id and quarantines the rest with `quarantine_reason`).
-- Sales orders: totals from their lines; POS: the transaction header's own totals.
-- `order_accounts` is order_accounts.sql's result. A nullable part of a key is
-- COALESCEd to '': DuckDB's CONCAT skips a NULL, Spark's returns NULL.
WITH line_totals AS (
    SELECT dataareaid, salesid,
           SUM(salesqty * salesprice) AS gross_amount, SUM(COALESCE(linedisc, 0)) AS discount_amount,
           SUM(lineamount) AS net_amount, SUM(ABS(salesqty)) AS item_count
    FROM silver_salesline GROUP BY dataareaid, salesid
),
raw_orders AS (
    SELECT CONCAT('SO:', COALESCE(s.dataareaid, ''), '-', s.salesid) AS order_id,
           CONCAT(COALESCE(s.dataareaid, ''), '-', s.custaccount) AS account_key,
           s.createddatetime AS order_ts,
           CASE WHEN s.retailchanneltable IN (${call_center_channels}) THEN 'call-center'
                ELSE 'online' END AS channel,
           CAST(NULL AS STRING) AS store,
           s.currencycode AS currency,
           COALESCE(l.gross_amount, 0) AS gross_amount,
           COALESCE(l.discount_amount, 0) AS discount_amount,
           COALESCE(l.net_amount, 0) AS net_amount,
           COALESCE(l.item_count, 0) AS item_count,
           (s.salestype = 4 OR COALESCE(l.net_amount, 0) < 0) AS is_return,
           CASE s.salesstatus WHEN 1 THEN 'open' WHEN 2 THEN 'delivered' WHEN 3 THEN 'invoiced'
                WHEN 4 THEN 'cancelled' ELSE 'unknown' END AS status,
           s.salesstatus = 4 AS is_cancelled
    FROM silver_salestable s
    LEFT JOIN line_totals l ON l.dataareaid = s.dataareaid AND l.salesid = s.salesid
    UNION ALL
    SELECT CONCAT('POS:', t.transactionid) AS order_id,
           CASE WHEN t.custaccount IS NULL THEN NULL ELSE CONCAT(COALESCE(t.dataareaid, ''), '-', t.custaccount) END,
           t.createddatetime, 'store', t.store, t.currency,
           t.grossamount, COALESCE(t.discamount, 0), t.netamount, COALESCE(t.numberofitems, 0),
           t.netamount < 0,
           CASE WHEN t.entrystatus = 1 THEN 'voided' ELSE 'completed' END,
           t.entrystatus = 1
    FROM silver_retailtransactiontable t
)
SELECT o.order_id, a.customer_id, o.order_ts, o.channel, o.store, o.currency,
       CAST(o.gross_amount AS DOUBLE) AS gross_amount,
       CAST(o.discount_amount AS DOUBLE) AS discount_amount,
       CAST(o.net_amount AS DOUBLE) AS net_amount,
       CAST(o.item_count AS DOUBLE) AS item_count,
       o.is_return, o.status, o.is_cancelled,
       CASE WHEN a.customer_id IS NOT NULL THEN NULL
            WHEN o.account_key IS NULL THEN 'anonymous transaction (no customer account)'
            WHEN NOT COALESCE(a.known, FALSE) THEN 'unknown customer account'
            WHEN a.party_type <> ${person_party_type} THEN 'customer is not a person party'
            ELSE 'customer has no profile' END AS quarantine_reason
FROM raw_orders o
LEFT JOIN order_accounts a ON a.account_key = o.account_key
