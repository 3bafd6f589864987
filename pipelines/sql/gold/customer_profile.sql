-- One row per unified customer. Commerce attributes first (name from the DirPersonName
-- row valid now; e-mail and phone through LogisticsElectronicAddress filtered by Type;
-- the postal address valid now), the linked Dataverse contact fills what is missing.
WITH person_name AS (
    SELECT person, firstname, lastname FROM (
        SELECT person, firstname, lastname,
               ROW_NUMBER() OVER (PARTITION BY person ORDER BY validfrom DESC) AS rn
        FROM silver_dirpersonname
        WHERE validfrom <= CURRENT_TIMESTAMP AND validto > CURRENT_TIMESTAMP
    ) n WHERE rn = 1
),
address AS (
    SELECT location, street, city, zipcode, countryregionid FROM (
        SELECT location, TRIM(CONCAT(COALESCE(streetnumber, ''), ' ', COALESCE(street, ''))) AS street,
               city, zipcode, countryregionid,
               ROW_NUMBER() OVER (PARTITION BY location ORDER BY validfrom DESC) AS rn
        FROM silver_logisticspostaladdress
        WHERE validfrom <= CURRENT_TIMESTAMP AND validto > CURRENT_TIMESTAMP
    ) a WHERE rn = 1
),
commerce AS (
    SELECT m.customer_id, n.firstname, n.lastname, e.locator AS email, ph.locator AS phone,
           a.street, a.city, a.zipcode AS postal_code, a.countryregionid AS country,
           c.custgroup, c.currency, c.createddatetime AS created_ts,
           ROW_NUMBER() OVER (PARTITION BY m.customer_id ORDER BY c.createddatetime, m.source_key) AS rn
    FROM silver_custtable c
    JOIN gold_customer_source_map m
      ON m.source = 'd365' AND m.source_key = CONCAT(c.dataareaid, '-', c.accountnum)
    JOIN silver_dirpartytable p ON p.recid = c.party
    LEFT JOIN person_name n ON n.person = p.recid
    LEFT JOIN silver_logisticselectronicaddress e ON e.recid = p.primarycontactemail AND e.type = 2
    LEFT JOIN silver_logisticselectronicaddress ph ON ph.recid = p.primarycontactphone AND ph.type = 1
    LEFT JOIN address a ON a.location = p.primaryaddresslocation
),
contact AS (
    SELECT m.customer_id, k.firstname, k.lastname, k.emailaddress1 AS email,
           COALESCE(k.mobilephone, k.telephone1) AS phone, k.address1_line1 AS street,
           k.address1_city AS city, k.address1_postalcode AS postal_code,
           k.address1_country AS country, k.createdon AS created_ts,
           ROW_NUMBER() OVER (PARTITION BY m.customer_id ORDER BY k.createdon, k.contactid) AS rn
    FROM silver_contact k
    JOIN gold_customer_source_map m ON m.source = 'dataverse' AND m.source_key = k.contactid
),
lineage AS (
    SELECT customer_id, COUNT(*) AS source_count,
           CONCAT_WS(',', MAX(CASE WHEN source = 'd365' THEN 'd365' END),
                     MAX(CASE WHEN source = 'dataverse' THEN 'dataverse' END),
                     MAX(CASE WHEN source = 'generic' THEN 'generic' END)) AS sources
    FROM gold_customer_source_map WHERE source <> 'generic' GROUP BY customer_id
)
SELECT l.customer_id,
       COALESCE(c.firstname, k.firstname) AS first_name,
       COALESCE(c.lastname, k.lastname) AS last_name,
       NULLIF(TRIM(CONCAT(COALESCE(c.firstname, k.firstname, ''), ' ',
                          COALESCE(c.lastname, k.lastname, ''))), '') AS full_name,
       COALESCE(c.email, k.email) AS email,
       COALESCE(c.phone, k.phone) AS phone,
       COALESCE(c.street, k.street) AS street,
       COALESCE(c.city, k.city) AS city,
       COALESCE(c.postal_code, k.postal_code) AS postal_code,
       COALESCE(c.country, k.country) AS country,
       c.custgroup AS customer_group,
       c.currency AS currency,
       LEAST(COALESCE(c.created_ts, k.created_ts), COALESCE(k.created_ts, c.created_ts)) AS created_ts,
       CAST(l.source_count AS BIGINT) AS source_count,
       l.sources
FROM lineage l
LEFT JOIN commerce c ON c.customer_id = l.customer_id AND c.rn = 1
LEFT JOIN contact k ON k.customer_id = l.customer_id AND k.rn = 1
