-- What gold/orders needs to know of each Commerce account: its customer_id (the
-- backstamp), whether custtable knows it, and its party type. Registered as the view
-- `order_accounts` for orders.sql; gold also keeps it (state/gold/order_accounts) to find
-- the accounts whose orders a refresh must recompute.
SELECT COALESCE(a.account_key, m.source_key) AS account_key, m.customer_id,
       a.account_key IS NOT NULL AS known, a.instancerelationtype AS party_type
FROM (SELECT CONCAT(c.dataareaid, '-', c.accountnum) AS account_key, p.instancerelationtype
      FROM silver_custtable c LEFT JOIN silver_dirpartytable p ON p.recid = c.party) a
FULL OUTER JOIN (SELECT source_key, customer_id FROM gold_customer_source_map WHERE source = 'd365') m
     ON m.source_key = a.account_key
