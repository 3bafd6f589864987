-- Generic customers: only an id and the time of their first transaction.
SELECT 'generic' AS source, customer_id AS source_key,
       CAST(NULL AS STRING) AS first_name, CAST(NULL AS STRING) AS last_name,
       CAST(NULL AS STRING) AS email, CAST(NULL AS STRING) AS phone, CAST(NULL AS STRING) AS street,
       CAST(NULL AS STRING) AS city, CAST(NULL AS STRING) AS postal_code,
       CAST(NULL AS STRING) AS country, CAST(NULL AS STRING) AS customer_group,
       CAST(NULL AS STRING) AS currency, MIN(ts) AS created_ts, MAX(ts) AS modified_ts
FROM silver_generic_transactions
WHERE customer_id IS NOT NULL
GROUP BY customer_id
