-- One row per source record to unify, with the attributes match rules and merge use.
-- Commerce: person parties only (B2C); name from the DirPersonName row valid now; e-mail
-- and phone through LogisticsElectronicAddress filtered by Type; address valid now.
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
)
SELECT 'd365' AS source, CONCAT(c.dataareaid, '-', c.accountnum) AS source_key,
       n.firstname AS first_name, n.lastname AS last_name,
       e.locator AS email, ph.locator AS phone,
       NULLIF(a.street, '') AS street, a.city, a.zipcode AS postal_code, a.countryregionid AS country,
       c.custgroup AS customer_group, c.currency,
       c.createddatetime AS created_ts,
       GREATEST(c.modifieddatetime, p.modifieddatetime) AS modified_ts
FROM silver_custtable c
JOIN silver_dirpartytable p ON p.recid = c.party AND p.instancerelationtype = ${person_party_type}
LEFT JOIN person_name n ON n.person = p.recid
LEFT JOIN silver_logisticselectronicaddress e ON e.recid = p.primarycontactemail AND e.type = 2
LEFT JOIN silver_logisticselectronicaddress ph ON ph.recid = p.primarycontactphone AND ph.type = 1
LEFT JOIN address a ON a.location = p.primaryaddresslocation
UNION ALL
SELECT 'dataverse', k.contactid, k.firstname, k.lastname, k.emailaddress1,
       COALESCE(k.mobilephone, k.telephone1), k.address1_line1, k.address1_city,
       k.address1_postalcode, k.address1_country, CAST(NULL AS STRING), CAST(NULL AS STRING),
       k.createdon, COALESCE(k.modifiedon, k.createdon)
FROM silver_contact k
