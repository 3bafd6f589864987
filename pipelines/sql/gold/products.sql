SELECT itemid AS item_id, namealias AS name, itemgroupid AS category FROM (
    SELECT itemid, namealias, itemgroupid,
           ROW_NUMBER() OVER (PARTITION BY itemid ORDER BY versionnumber DESC) AS rn
    FROM silver_inventtable
) p WHERE rn = 1
