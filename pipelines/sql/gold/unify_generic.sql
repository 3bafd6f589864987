-- Generic source: one customer per distinct customer_id of the transactions file.
SELECT DISTINCT 'generic' AS source, customer_id AS source_key,
       CONCAT('C', SUBSTR(MD5(CONCAT('generic:', customer_id)), 1, 16)) AS customer_id
FROM silver_generic_transactions
WHERE customer_id IS NOT NULL
