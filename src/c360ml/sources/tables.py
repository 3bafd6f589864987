"""Declarations of the source tables c360ml reads, as the source systems export them.

Declared once: the generator writes these columns (and their CDM data types into
`model.json`), ingest maps the CDM types to Arrow, silver reads the same names. Column
names are as Synapse Link writes them: table columns lower case, the Synapse system
columns (`Id`, `SinkCreatedOn`, `SinkModifiedOn`, `IsDelete`) in their own casing.
Facts behind the choices are in `shared/reference/d365.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# CDM data type (model.json `dataType`) -> Arrow type of the bronze column.
CDM_TO_ARROW: dict[str, pa.DataType] = {
    "guid": pa.string(),
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int64(),
    "decimal": pa.float64(),  # amounts are float64 throughout the lake (one choice, kept)
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "dateTime": pa.timestamp("us", tz="UTC"),
    "dateTimeOffset": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class Column:
    name: str
    cdm_type: str  # one of CDM_TO_ARROW's keys

    @property
    def arrow_type(self) -> pa.DataType:
        return CDM_TO_ARROW[self.cdm_type]


@dataclass(frozen=True)
class SourceTable:
    """A table as its source exports it; `key` identifies a row across change versions."""

    source: str  # "d365" (finance & operations) or "dataverse"
    name: str  # lower-case export name, also the folder name in landing/ and bronze/
    columns: tuple[Column, ...]  # in export (CSV) order
    key: tuple[str, ...]  # the row's identity across versions in the change feed
    # Tables gold patches: the columns naming the gold entity (an order, a support case) a
    # row belongs to. Silver logs them for every row a merge changes
    # (`state/silver/<table>_changes`), so that gold knows which entities a build changed.
    change_key: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.arrow_type) for c in self.columns])

    def model_json_entity(self) -> dict:
        return {
            "$type": "LocalEntity",
            "name": self.name,
            "attributes": [{"name": c.name, "dataType": c.cdm_type} for c in self.columns],
        }


def _cols(spec: str) -> tuple[Column, ...]:
    """Parse 'name:type name:type ...' so each table is declared on a few lines."""
    return tuple(Column(*item.split(":")) for item in spec.split())


# Synapse Link system columns of finance & operations tables (append-only change feed).
FO_SYSTEM = (
    "Id:guid SinkCreatedOn:dateTime SinkModifiedOn:dateTime sysrowversion:int64 "
    "versionnumber:int64 IsDelete:boolean recid:int64 createddatetime:dateTime "
    "modifieddatetime:dateTime dataareaid:string "
)
# Synapse Link system columns of Dataverse tables.
DV_SYSTEM = (
    "Id:guid SinkCreatedOn:dateTime SinkModifiedOn:dateTime versionnumber:int64 IsDelete:boolean "
)


def _fo(
    name: str, spec: str, key: tuple[str, ...] = ("recid",), change_key: tuple[str, ...] = ()
) -> SourceTable:
    return SourceTable("d365", name, _cols(FO_SYSTEM + spec), key, change_key)


def _dv(
    name: str, spec: str, key: tuple[str, ...], change_key: tuple[str, ...] = ()
) -> SourceTable:
    return SourceTable("dataverse", name, _cols(DV_SYSTEM + spec), key, change_key)


SALES_ORDER, POS_ORDER = ("dataareaid", "salesid"), ("transactionid",)  # order keys

D365_TABLES: tuple[SourceTable, ...] = (
    _fo(
        "custtable", "accountnum:string party:int64 custgroup:string currency:string blocked:int64"
    ),
    _fo(
        "dirpartytable",
        "partynumber:string name:string namealias:string knownas:string languageid:string "
        "instancerelationtype:int64 primaryaddresslocation:int64 primarycontactemail:int64 "
        "primarycontactphone:int64",
    ),
    _fo(
        "dirpersonname",
        "person:int64 firstname:string middlename:string lastname:string "
        "validfrom:dateTime validto:dateTime",
    ),
    _fo("logisticslocation", "locationid:string description:string ispostaladdress:int64"),
    _fo(
        "logisticspostaladdress",
        "location:int64 street:string streetnumber:string city:string county:string "
        "state:string zipcode:string countryregionid:string validfrom:dateTime validto:dateTime",
    ),
    # type: 1 phone, 2 e-mail (others exist: URL, telex, fax)
    _fo(
        "logisticselectronicaddress",
        "locator:string type:int64 location:int64 isprimary:int64 ismobilephone:int64",
    ),
    # salesstatus: 1 open, 2 delivered, 3 invoiced, 4 canceled; salestype: 3 sales, 4 returned item
    _fo(
        "salestable",
        "salesid:string custaccount:string salesstatus:int64 salestype:int64 "
        "currencycode:string retailchanneltable:int64 returnitemnum:string "
        "returnreasoncodeid:string",
        change_key=SALES_ORDER,
    ),
    _fo(
        "salesline",
        "salesid:string linenum:decimal itemid:string salesqty:decimal salesprice:decimal "
        "lineamount:decimal linedisc:decimal costprice:decimal currencycode:string "
        "salesstatus:int64 returnstatus:int64",
        change_key=SALES_ORDER,
    ),
    # type: 2 sales; entrystatus: 0 normal, 1 voided; channel -> store's channel RecId
    _fo(
        "retailtransactiontable",
        "transactionid:string store:string terminal:string channel:int64 custaccount:string "
        "transdate:dateTime transtime:int64 type:int64 entrystatus:int64 grossamount:decimal "
        "netamount:decimal discamount:decimal numberofitems:decimal currency:string "
        "loyaltycardid:string",
        change_key=POS_ORDER,
    ),
    _fo(
        "retailtransactionsalestrans",
        "transactionid:string linenum:decimal itemid:string qty:decimal price:decimal "
        "netamount:decimal discamount:decimal returnnosale:int64 returntransactionid:string "
        "transactionstatus:int64 store:string terminal:string",
        change_key=POS_ORDER,
    ),
    _fo("inventtable", "itemid:string namealias:string itemgroupid:string product:int64"),
)

DATAVERSE_TABLES: tuple[SourceTable, ...] = (
    _dv(
        "contact",
        "contactid:guid firstname:string lastname:string fullname:string "
        "emailaddress1:string telephone1:string mobilephone:string address1_line1:string "
        "address1_city:string address1_postalcode:string address1_country:string "
        "birthdate:dateTime createdon:dateTime modifiedon:dateTime statecode:int64 "
        "donotemail:boolean donotbulkemail:boolean",
        key=("contactid",),
    ),
    # statecode: 0 active, 1 resolved, 2 cancelled
    _dv(
        "incident",
        "incidentid:guid customerid:guid title:string casetypecode:int64 prioritycode:int64 "
        "createdon:dateTime modifiedon:dateTime statecode:int64",
        key=("incidentid",),
        change_key=("incidentid",),
    ),
)

SOURCE_TABLES: dict[tuple[str, str], SourceTable] = {
    (t.source, t.name): t for t in D365_TABLES + DATAVERSE_TABLES
}


def source_table(source: str, name: str) -> SourceTable:
    try:
        return SOURCE_TABLES[(source, name.lower())]
    except KeyError:
        known = ", ".join(f"{s}/{n}" for s, n in SOURCE_TABLES)
        raise KeyError(f"unknown source table {source}/{name}; known: {known}") from None
