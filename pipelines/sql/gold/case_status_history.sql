-- Valid-from/valid-to status of each support case, from the bronze change feed. Nulls
-- sort last, written out: DuckDB's default, not Spark's.
WITH versions AS (
    SELECT incidentid AS entity_id,
           CASE statecode WHEN 0 THEN 'active' WHEN 1 THEN 'resolved' WHEN 2 THEN 'cancelled'
                ELSE 'unknown' END AS status,
           statecode = 2 AS is_cancelled,
           COALESCE(modifiedon, createdon) AS changed_ts, versionnumber,
           ROW_NUMBER() OVER (PARTITION BY incidentid, versionnumber ORDER BY SinkModifiedOn NULLS LAST) AS dup
    FROM bronze_dataverse_incident WHERE NOT COALESCE(IsDelete, FALSE)
)
SELECT v.entity_id, v.status, v.is_cancelled, v.changed_ts AS valid_from,
       LEAD(v.changed_ts) OVER (PARTITION BY v.entity_id ORDER BY v.versionnumber NULLS LAST) AS valid_to
FROM versions v JOIN gold_support_cases c ON c.case_id = v.entity_id
WHERE v.dup = 1
