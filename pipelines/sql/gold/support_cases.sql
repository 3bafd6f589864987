-- Dataverse incidents keyed by customer_id through the backstamp; a case whose contact
-- has no profile keeps customer_id NULL (counted as unlinked, not dropped).
SELECT i.incidentid AS case_id, m.customer_id, i.createdon AS created_ts,
       CAST(i.casetypecode AS STRING) AS case_type,
       CASE i.prioritycode WHEN 1 THEN 'high' WHEN 2 THEN 'normal' WHEN 3 THEN 'low'
            ELSE CAST(i.prioritycode AS STRING) END AS priority,
       i.title,
       CASE i.statecode WHEN 0 THEN 'active' WHEN 1 THEN 'resolved' WHEN 2 THEN 'cancelled'
            ELSE 'unknown' END AS status
FROM silver_incident i
LEFT JOIN gold_customer_source_map m ON m.source = 'dataverse' AND m.source_key = i.customerid
