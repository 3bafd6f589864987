-- Unify (identity map): one Commerce person account = one customer; a Dataverse contact
-- joins the Commerce customer with the same normalised e-mail (the oldest account when
-- several share it); other contacts become contact-only profiles. customer_id is an
-- opaque hash of the record that founds the profile, so it is stable across refreshes.
WITH party_email AS (
    SELECT p.recid AS party, e.locator AS email
    FROM silver_dirpartytable p
    JOIN silver_logisticselectronicaddress e
      ON e.recid = p.primarycontactemail AND e.type = 2
),
commerce AS (
    SELECT CONCAT(c.dataareaid, '-', c.accountnum) AS source_key,
           pe.email,
           c.createddatetime AS created_ts
    FROM silver_custtable c
    JOIN silver_dirpartytable p
      ON p.recid = c.party AND p.instancerelationtype = ${person_party_type}
    LEFT JOIN party_email pe ON pe.party = c.party
),
commerce_ids AS (
    SELECT source_key, email, CONCAT('C', SUBSTR(MD5(CONCAT('d365:', source_key)), 1, 16)) AS customer_id,
           ROW_NUMBER() OVER (PARTITION BY email ORDER BY created_ts, source_key) AS email_rank
    FROM commerce
),
contacts AS (
    SELECT k.contactid AS source_key, k.emailaddress1 AS email, c.customer_id AS linked_id
    FROM silver_contact k
    LEFT JOIN commerce_ids c ON c.email = k.emailaddress1 AND c.email_rank = 1
)
SELECT 'd365' AS source, source_key, customer_id FROM commerce_ids
UNION ALL
SELECT 'dataverse' AS source, source_key,
       COALESCE(linked_id, CONCAT('C', SUBSTR(MD5(CONCAT('dataverse:', source_key)), 1, 16))) AS customer_id
FROM contacts
