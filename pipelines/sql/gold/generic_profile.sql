-- Profiles of generic customers with no Dynamics record: only what transactions tell.
SELECT m.customer_id, CAST(NULL AS STRING) AS first_name, CAST(NULL AS STRING) AS last_name,
       CAST(NULL AS STRING) AS full_name, CAST(NULL AS STRING) AS email, CAST(NULL AS STRING) AS phone,
       CAST(NULL AS STRING) AS street, CAST(NULL AS STRING) AS city, CAST(NULL AS STRING) AS postal_code,
       CAST(NULL AS STRING) AS country, CAST(NULL AS STRING) AS customer_group,
       CAST(NULL AS STRING) AS currency, MIN(t.ts) AS created_ts, CAST(1 AS BIGINT) AS source_count,
       'generic' AS sources
FROM gold_customer_source_map m
JOIN silver_generic_transactions t ON t.customer_id = m.source_key
WHERE m.source = 'generic'
GROUP BY m.customer_id
