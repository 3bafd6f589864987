"""Turn simulated persons and events into source-table change rows (and the clean truth).

Why rows are built per block of persons: every record of a person (accounts, addresses,
orders, contact, cases) is derived from that person's traits and simulated events, so a
block is self-contained and memory stays bounded at 1M customers. Ids that must be unique
across blocks come from `Counters`, carried from block to block.

Internal representation (before `writer.py` formats CSV): one Arrow table per source
table with exactly the declared columns, dateTime columns as int64 epoch seconds, plus
two hidden columns: `_emit` (SinkModifiedOn / modifiedon: decides which sync folder the
row lands in) and `_person` (person id, -1 for rows of nobody, used to drop the future
rows of erased persons).

Record-id scheme (so an increment can delete an erased person's rows from the truth
alone): for account number k (`C` + 7 digits, `Counters.account`),
custtable.recid = dirpartytable.recid = RECID_BASE + k; dirpersonname, postal address,
logistics location and electronic address recids are RECID_BASE + 2k (+1 for the second
name / address after a rename / move, the contact location, and the phone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from c360ml.sources.tables import SourceTable, source_table
from c360ml.synth import vocab as v
from c360ml.synth.params import (
    CALL_CENTER_CHANNEL,
    CH_CALL_CENTER,
    CH_STORE,
    CHANNEL_NAMES,
    FO_MAX_EPOCH,
    ONLINE_CHANNEL,
    RECID_BASE,
    STORE_CHANNEL_BASE,
    STORES,
    LakeShape,
    ProcessParams,
)
from c360ml.synth.process import KIND_CONTACT_ONLY, KIND_NAMES, KIND_ORGANISATION, SimResult, Traits

DAY = 86_400
TABLE_NO = {  # stable number per F&O table, used in the GUID-shaped Id
    "custtable": 1,
    "dirpartytable": 2,
    "dirpersonname": 3,
    "logisticslocation": 4,
    "logisticspostaladdress": 5,
    "logisticselectronicaddress": 6,
    "salestable": 7,
    "salesline": 8,
    "retailtransactiontable": 9,
    "retailtransactionsalestrans": 10,
    "inventtable": 11,
}
LATE_TABLES = {"salestable", "salesline", "retailtransactiontable", "retailtransactionsalestrans"}
HIDDEN = ("_emit", "_person")


@dataclass
class Counters:
    """Running numbers carried across person blocks so ids stay unique and dense."""

    account: int = 0
    order: int = 0
    line: int = 0
    pos: int = 0
    pos_line: int = 0
    rma: int = 0
    ident: int = 0  # DirPartyTable party numbers, LogisticsLocation ids

    def take(self, name: str, n: int) -> np.ndarray:
        """The next n numbers of counter `name` (1-based)."""
        first = getattr(self, name)
        setattr(self, name, first + n)
        return np.arange(first + 1, first + n + 1, dtype=np.int64)


@dataclass(frozen=True)
class Catalogue:
    """Products: ids, list prices, categories and a popularity law."""

    item_id: pa.Array
    price: np.ndarray
    category: np.ndarray
    cum_popularity: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(self.cum_popularity, rng.random(n) * self.cum_popularity[-1])


@dataclass(frozen=True)
class Context:
    """Fixed facts every block needs: time origin, process and lake shape, catalogue."""

    start_epoch: int  # epoch seconds of day 0 (start date, midnight UTC)
    n_days: int  # simulated days (history + future)
    p: ProcessParams
    shape: LakeShape
    catalogue: Catalogue


@dataclass
class Block:
    """Rows of one person block: source tables and truth frames."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    truth: dict[str, pa.Table] = field(default_factory=dict)


def make_catalogue(rng: np.random.Generator, shape: LakeShape) -> Catalogue:
    n = shape.n_items
    price = np.round(np.exp(rng.normal(3.2, 0.8, n)), 0) - 0.01
    weights = 1.0 / (np.arange(n) + 10.0) ** 0.9
    return Catalogue(
        item_id=v.padded("I", np.arange(1, n + 1), 5),
        price=np.maximum(price, 1.99),
        category=rng.integers(0, min(shape.n_categories, len(v.CATEGORIES)), n),
        cum_popularity=np.cumsum(rng.permutation(weights)),
    )


def inventtable_rows(ctx: Context) -> pa.Table:
    """The product catalogue, created long before the history starts."""
    cat = ctx.catalogue
    n = len(cat.price)
    created = np.full(n, ctx.start_epoch - 800 * DAY)
    category = v.take(v.CATEGORIES, cat.category)
    cols = {
        "itemid": cat.item_id,
        "namealias": v.join(category, "-", v.padded("", np.arange(1, n + 1), 5)),
        "itemgroupid": category,
        "product": RECID_BASE + 100_000 + np.arange(n),
    }
    rng = np.random.default_rng(0)
    return fo_frame(
        "inventtable",
        cols,
        RECID_BASE + np.arange(n),
        created,
        created,
        "usrt",
        np.full(n, -1),
        rng,
    )


# ----------------------------------------------------------------------------- framing


def _to_arrow(value, cdm: str, n: int) -> pa.Array:
    """A column value (None, scalar, numpy or Arrow) as the internal Arrow type."""
    typ = {
        "dateTime": pa.int64(),
        "dateTimeOffset": pa.int64(),
        "int64": pa.int64(),
        "int32": pa.int64(),
        "decimal": pa.float64(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
    }.get(cdm, pa.string())
    if value is None:
        return pa.nulls(n, typ)
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        return value.cast(typ)
    if np.isscalar(value):
        return (
            pa.array(np.full(n, value)).cast(typ)
            if typ != pa.string()
            else pa.repeat(pa.scalar(str(value)), n)
        )
    return pa.array(np.asarray(value)).cast(typ)


def _frame(table: SourceTable, cols: dict, emit: np.ndarray, person: np.ndarray) -> pa.Table:
    n = len(emit)
    arrays = [_to_arrow(cols.get(c.name), c.cdm_type, n) for c in table.columns]
    arrays += [
        pa.array(np.asarray(emit, dtype=np.int64)),
        pa.array(np.asarray(person, dtype=np.int64)),
    ]
    return pa.Table.from_arrays(arrays, names=[*table.names, *HIDDEN])


def _sink_lag(rng: np.random.Generator, n: int, late_share: float) -> np.ndarray:
    """Seconds between a change and its arrival in the sink (a few late by days)."""
    lag = rng.integers(30, 1800, n)
    late = rng.random(n) < late_share
    return lag + late * rng.integers(1, 11, n) * DAY


def _sink_created(created, modified, sink_mod: np.ndarray) -> np.ndarray:
    """When the record first reached the sink: this row's arrival for a first version."""
    created = np.asarray(created, dtype=np.int64)
    first = np.asarray(modified, dtype=np.int64) == created
    return np.where(first, sink_mod, np.minimum(created + 600, sink_mod))


def fo_frame(
    name: str,
    cols: dict,
    recid: np.ndarray,
    created: np.ndarray,
    modified: np.ndarray,
    dataareaid,
    person: np.ndarray,
    rng: np.random.Generator,
    is_delete: bool = False,
    late_share: float = 0.0,
) -> pa.Table:
    """Finance & operations change rows: the Synapse system columns around `cols`."""
    n = len(recid)
    recid = np.asarray(recid, dtype=np.int64)
    modified = np.asarray(modified, dtype=np.int64)
    sink_mod = modified + _sink_lag(rng, n, late_share if name in LATE_TABLES else 0.0)
    version = modified * 1000 + rng.integers(0, 1000, n)
    system = {
        "Id": v.record_ids(TABLE_NO[name], recid),
        "SinkCreatedOn": _sink_created(created, modified, sink_mod),
        "SinkModifiedOn": sink_mod,
        "sysrowversion": version,
        "versionnumber": version,
        "IsDelete": np.full(n, is_delete),
        "recid": recid,
        "createddatetime": created,
        "modifieddatetime": modified,
        "dataareaid": dataareaid,
    }
    return _frame(source_table("d365", name), {**cols, **system}, sink_mod, person)


def dv_frame(
    name: str,
    cols: dict,
    row_id: pa.Array,
    modified: np.ndarray,
    person: np.ndarray,
    rng: np.random.Generator,
    is_delete: bool = False,
) -> pa.Table:
    """Dataverse change rows: Id = the row's GUID, versionnumber grows with modifiedon."""
    n = len(row_id)
    modified = np.asarray(modified, dtype=np.int64)
    sink_mod = modified + _sink_lag(rng, n, 0.0)
    created = cols["createdon"]
    system = {
        "Id": row_id,
        "SinkCreatedOn": _sink_created(created, modified, sink_mod),
        "SinkModifiedOn": sink_mod,
        "versionnumber": modified * 1000 + rng.integers(0, 1000, n),
        "IsDelete": np.full(n, is_delete),
        "modifiedon": modified,
    }
    return _frame(source_table("dataverse", name), {**cols, **system}, sink_mod, person)


def _take(cols: dict, idx: np.ndarray) -> dict:
    """The rows `idx` of every column of a column dict (scalars pass through)."""
    out = {}
    for k, val in cols.items():
        if isinstance(val, pa.Array | pa.ChunkedArray):
            out[k] = val.take(pa.array(idx, type=pa.int64()))
        elif isinstance(val, np.ndarray):
            out[k] = val[idx]
        else:
            out[k] = val
    return out


def _concat(frames: list[pa.Table]) -> pa.Table:
    return pa.concat_tables([f for f in frames if f.num_rows] or frames[:1])


# ----------------------------------------------------------------------------- persons


@dataclass
class People:
    """Names, contact data and address of each person of a block (clean values)."""

    first: pa.Array
    last: pa.Array
    name: pa.Array
    email: pa.Array
    area: pa.Array
    phone_line: np.ndarray
    street_no: pa.Array
    street: pa.Array
    city: np.ndarray  # index into vocab.CITIES
    zipcode: pa.Array
    birthdate: np.ndarray  # epoch seconds (midnight), -1 unknown
    first_idx: np.ndarray  # index into vocab.first_names()


def draw_people(rng: np.random.Generator, t: Traits, ctx: Context) -> People:
    n = len(t)
    _, fi = v.draw_first_names(rng, n)
    first, last = v.take(v.first_names(), fi), v.draw_last_names(rng, n)
    org = t.kind == KIND_ORGANISATION
    org_name = v.join(
        v.take(v.ORG_WORDS, rng.integers(0, len(v.ORG_WORDS), n)),
        " ",
        v.take(v.ORG_SUFFIXES, rng.integers(0, len(v.ORG_SUFFIXES), n)),
    )
    name = v.where(org, org_name, v.join(first, " ", last))
    local = v.where(
        org,
        v.join("purchasing.", v.padded("", t.person_id, 7)),
        v.join(
            pc.utf8_lower(first), ".", pc.utf8_lower(last), v.padded("", t.person_id % 10_000, 4)
        ),
    )
    email = v.join(local, "@", v.take(v.DOMAINS, rng.integers(0, len(v.DOMAINS), n)))
    city = rng.integers(0, len(v.CITIES), n)
    area = v.take([c[4] for c in v.CITIES], city)
    zipcode = v.join(
        v.take([c[3] for c in v.CITIES], city), v.padded("", rng.integers(0, 100, n), 2)
    )
    birth_days = rng.integers(-365 * 70, -365 * 18, n)
    birthdate = np.where(rng.random(n) < 0.8, ctx.start_epoch + birth_days * DAY, -1)
    return People(
        first=first,
        last=last,
        name=name,
        email=email,
        area=area,
        phone_line=rng.integers(2_000_000, 10_000_000, n),  # exchange 200-999, line
        street_no=pc.cast(pa.array(rng.integers(1, 9999, n)), pa.string()),
        street=v.take(v.STREETS, rng.integers(0, len(v.STREETS), n)),
        city=city,
        zipcode=zipcode,
        birthdate=birthdate,
        first_idx=fi,
    )


@dataclass
class Accounts:
    """Commerce customer accounts of a block (one or two per Commerce person)."""

    pos: np.ndarray  # person position in the block
    seq: np.ndarray  # account number k (global)
    created: np.ndarray  # epoch seconds
    dataareaid: pa.Array
    accountnum: pa.Array
    key: pa.Array  # "<dataareaid>-<accountnum>"
    first_of_person: np.ndarray  # per person: account position or -1
    second_of_person: np.ndarray  # per person: account position or -1


def draw_accounts(
    rng: np.random.Generator, t: Traits, ctx: Context, counters: Counters
) -> Accounts:
    n = len(t)
    has1 = t.n_accounts >= 1
    pos = np.concatenate([np.flatnonzero(has1), np.flatnonzero(t.n_accounts == 2)])
    second = np.arange(len(pos)) >= has1.sum()
    order = np.argsort(pos, kind="stable")
    pos, second = pos[order], second[order]
    created = ctx.start_epoch + t.entry_day[pos].astype(np.int64) * DAY + t.created_sec[pos]
    created = created + second * rng.integers(30, 400, len(pos)) * DAY
    seq = counters.take("account", len(pos))
    area = np.where(rng.random(len(pos)) < ctx.shape.ussi_share, "ussi", "usrt")
    area[second] = area[np.searchsorted(pos, pos[second])]  # same legal entity for both
    dataareaid = v.strs(area)
    accountnum = v.padded("C", seq, 7)
    first_of, second_of = np.full(n, -1), np.full(n, -1)
    first_of[pos[~second]] = np.flatnonzero(~second)
    second_of[pos[second]] = np.flatnonzero(second)
    return Accounts(
        pos,
        seq,
        created,
        dataareaid,
        accountnum,
        v.join(dataareaid, "-", accountnum),
        first_of,
        second_of,
    )


@dataclass(frozen=True)
class _AccountHistory:
    """Which accounts change after creation, and when (one draw per account).

    Drawn together up front so every table of the party model sees the same rename,
    move and update of an account: the old and new rows must agree across tables.
    """

    u: np.ndarray  # (6, m) uniforms: phone, rename, move, update, staff group, VIP/alias
    org: np.ndarray
    has_phone: np.ndarray
    renamed: np.ndarray
    moved: np.ndarray
    updated: np.ndarray
    t_rename: np.ndarray
    t_move: np.ndarray
    t_update: np.ndarray


def _account_history(
    rng: np.random.Generator, t: Traits, acc: Accounts, sh: LakeShape
) -> _AccountHistory:
    m = len(acc.pos)
    org = t.kind[acc.pos] == KIND_ORGANISATION
    created = acc.created
    u = rng.random((6, m))
    t_rename = created + rng.integers(30, 900, m) * DAY + rng.integers(0, DAY, m)
    t_move = created + rng.integers(30, 900, m) * DAY + rng.integers(0, DAY, m)
    t_update = created + rng.integers(30, 900, m) * DAY + rng.integers(0, DAY, m)
    return _AccountHistory(
        u=u,
        org=org,
        has_phone=u[0] >= sh.no_phone_share,
        renamed=~org & (u[1] < sh.rename_share),
        moved=u[2] < sh.move_share,
        updated=u[3] < sh.custtable_update_share,
        t_rename=t_rename,
        t_move=t_move,
        t_update=t_update,
    )


class _AccountRows:
    """Change rows of the per-account F&O tables, collected table by table.

    Every row belongs to one account: its legal entity and person follow from the
    account's position, so callers name only the accounts (`idx`) a version applies to.
    """

    def __init__(self, rng: np.random.Generator, t: Traits, acc: Accounts):
        self.rng = rng
        self.acc = acc
        self.who = t.person_id[acc.pos]
        self.out: dict[str, list[pa.Table]] = {}

    def add(self, name, cols, recid, created, modified, idx, **kw) -> None:
        c = _take(cols, idx)
        area = self.acc.dataareaid.take(pa.array(idx, type=pa.int64()))
        self.out.setdefault(name, []).append(
            fo_frame(
                name,
                c,
                recid[idx],
                created[idx],
                modified[idx],
                area,
                self.who[idx],
                self.rng,
                **kw,
            )
        )

    def tables(self) -> dict[str, pa.Table]:
        return {name: _concat(frames) for name, frames in self.out.items()}


def customer_tables(
    rng: np.random.Generator, t: Traits, people: People, acc: Accounts, ctx: Context
) -> tuple[dict[str, pa.Table], dict[str, np.ndarray]]:
    """CustTable, the party model and its address/contact-information history."""
    h = _account_history(rng, t, acc, ctx.shape)
    tk = {k: _take({k: val}, acc.pos)[k] for k, val in vars(people).items()}
    rows = _AccountRows(rng, t, acc)
    _custtable_rows(rows, acc, h)
    _party_rows(rows, rng, acc, h, tk)
    _location_rows(rows, acc)
    _postal_address_rows(rows, rng, acc, h, tk)
    _electronic_address_rows(rows, rng, acc, h, tk)
    flags = {"renamed": h.renamed, "moved": h.moved, "has_phone": h.has_phone}
    return rows.tables(), flags


def _custtable_rows(rows: _AccountRows, acc: Accounts, h: _AccountHistory) -> None:
    """Each account as created, and a later group/blocked change for a few (VIP or blocked)."""
    m = len(acc.pos)
    rec1 = RECID_BASE + acc.seq
    group = np.where(h.org, "WHOLESALE", np.where(h.u[4] < 0.01, "STAFF", "RETAIL"))
    cust = {
        "accountnum": acc.accountnum,
        "party": rec1,
        "custgroup": v.strs(group),
        "currency": "USD",
        "blocked": np.zeros(m, dtype=np.int64),
    }
    rows.add("custtable", cust, rec1, acc.created, acc.created, np.arange(m))
    cust_upd = dict(
        cust,
        custgroup=v.where(h.u[5] < 0.5, pa.scalar("VIP"), cust["custgroup"]),
        blocked=(h.u[5] >= 0.5).astype(np.int64),
    )
    rows.add("custtable", cust_upd, rec1, acc.created, h.t_update, np.flatnonzero(h.updated))


def _party_rows(
    rows: _AccountRows, rng: np.random.Generator, acc: Accounts, h: _AccountHistory, tk: dict
) -> None:
    """DirPartyTable and DirPersonName: a rename closes the old name and opens a new one.

    Organisations have a party but no person name, and are never renamed.
    """
    m = len(acc.pos)
    created, t_rename = acc.created, h.t_rename
    rec1 = RECID_BASE + acc.seq
    rec2 = RECID_BASE + 2 * acc.seq
    new_last = v.draw_last_names(rng, m)
    party = {
        "partynumber": v.padded("P", acc.seq, 9),
        "name": tk["name"],
        "namealias": v.null_where(h.u[5] < 0.01, tk["last"]),
        "knownas": None,
        "languageid": "en-us",
        "instancerelationtype": np.where(h.org, 2077, 13271),
        "primaryaddresslocation": rec2,
        "primarycontactemail": rec2,
        "primarycontactphone": np.where(h.has_phone, rec2 + 1, 0),
    }
    rows.add("dirpartytable", party, rec1, created, created, np.arange(m))
    ren = np.flatnonzero(h.renamed)
    party_ren = dict(party, name=v.join(tk["first"], " ", new_last), namealias=new_last)
    rows.add("dirpartytable", party_ren, rec1, created, t_rename, ren)

    pname = {
        "person": rec1,
        "firstname": tk["first"],
        "middlename": None,
        "lastname": tk["last"],
        "validfrom": created,
        "validto": np.full(m, FO_MAX_EPOCH),
    }
    rows.add("dirpersonname", pname, rec2, created, created, np.flatnonzero(~h.org))
    rows.add("dirpersonname", dict(pname, validto=t_rename), rec2, created, t_rename, ren)
    pname_new = dict(pname, lastname=new_last, validfrom=t_rename)
    rows.add("dirpersonname", pname_new, rec2 + 1, t_rename, t_rename, ren)


def _location_rows(rows: _AccountRows, acc: Accounts) -> None:
    """Two LogisticsLocations per account: the home (postal) and the contact location."""
    m = len(acc.pos)
    rec2 = RECID_BASE + 2 * acc.seq
    allx = np.arange(m)
    loc = {
        "locationid": v.padded("L", 2 * acc.seq, 10),
        "description": "Home",
        "ispostaladdress": np.ones(m, dtype=np.int64),
    }
    rows.add("logisticslocation", loc, rec2, acc.created, acc.created, allx)
    loc2 = {
        "locationid": v.padded("L", 2 * acc.seq + 1, 10),
        "description": "Contact",
        "ispostaladdress": np.zeros(m, dtype=np.int64),
    }
    rows.add("logisticslocation", loc2, rec2 + 1, acc.created, acc.created, allx)


def _postal_address_rows(
    rows: _AccountRows, rng: np.random.Generator, acc: Accounts, h: _AccountHistory, tk: dict
) -> None:
    """The home address; a move closes it (validto) and opens the new address's record."""
    m = len(acc.pos)
    created, t_move = acc.created, h.t_move
    rec2 = RECID_BASE + 2 * acc.seq
    city = tk["city"]
    addr = {
        "location": rec2,
        "street": tk["street"],
        "streetnumber": tk["street_no"],
        "city": v.take([c[0] for c in v.CITIES], city),
        "county": v.take([c[1] for c in v.CITIES], city),
        "state": v.take([c[2] for c in v.CITIES], city),
        "zipcode": tk["zipcode"],
        "countryregionid": "USA",
        "validfrom": created,
        "validto": np.full(m, FO_MAX_EPOCH),
    }
    rows.add("logisticspostaladdress", addr, rec2, created, created, np.arange(m))
    mv = np.flatnonzero(h.moved)
    rows.add("logisticspostaladdress", dict(addr, validto=t_move), rec2, created, t_move, mv)
    new_city = rng.integers(0, len(v.CITIES), m)
    addr_new = dict(
        addr,
        street=v.take(v.STREETS, rng.integers(0, len(v.STREETS), m)),
        streetnumber=pc.cast(pa.array(rng.integers(1, 9999, m)), pa.string()),
        city=v.take([c[0] for c in v.CITIES], new_city),
        county=v.take([c[1] for c in v.CITIES], new_city),
        state=v.take([c[2] for c in v.CITIES], new_city),
        zipcode=v.join(v.take([c[3] for c in v.CITIES], new_city), "001"),
        validfrom=t_move,
    )
    rows.add("logisticspostaladdress", addr_new, rec2 + 1, t_move, t_move, mv)


def _electronic_address_rows(
    rows: _AccountRows, rng: np.random.Generator, acc: Accounts, h: _AccountHistory, tk: dict
) -> None:
    """E-mail (every account, a few in mixed case) and phone (unless the account has none)."""
    m = len(acc.pos)
    rec2 = RECID_BASE + 2 * acc.seq
    mixed = rng.random(m) < 0.03
    email = v.where(mixed, pc.utf8_capitalize(tk["email"]), tk["email"])
    phone = v.phone_formats(tk["area"], tk["phone_line"], np.where(rng.random(m) < 0.8, 0, 1))
    el = {
        "locator": email,
        "type": np.full(m, 2),
        "location": rec2 + 1,
        "isprimary": np.ones(m, dtype=np.int64),
        "ismobilephone": np.zeros(m, dtype=np.int64),
    }
    rows.add("logisticselectronicaddress", el, rec2, acc.created, acc.created, np.arange(m))
    ph = {
        "locator": phone,
        "type": np.full(m, 1),
        "location": rec2 + 1,
        "isprimary": np.ones(m, dtype=np.int64),
        "ismobilephone": (rng.random(m) < 0.6).astype(np.int64),
    }
    has_phone = np.flatnonzero(h.has_phone)
    rows.add("logisticselectronicaddress", ph, rec2 + 1, acc.created, acc.created, has_phone)


# ----------------------------------------------------------------------------- orders


@dataclass
class Orders:
    """One row per simulated purchase (and per return) with its order-level facts."""

    person: np.ndarray  # position in block
    account: np.ndarray  # position in Accounts
    ts: np.ndarray  # epoch seconds
    channel: np.ndarray  # CH_*
    cancelled: np.ndarray
    is_return: np.ndarray
    origin: np.ndarray  # for returns: index of the returned order, else -1


def order_rows(
    rng: np.random.Generator, t: Traits, sim: SimResult, acc: Accounts, ctx: Context
) -> Orders:
    """Order-level facts of purchases and of their returns (returns appended after)."""
    n = len(sim.buy_idx)
    sod = rng.integers(1, DAY - 1, n)
    first_sod = t.created_sec[sim.buy_idx] + rng.integers(60, 1800, n)
    sod = np.where(sim.buy_first, first_sod, sod)
    ts = ctx.start_epoch + sim.buy_day.astype(np.int64) * DAY + sod
    account = acc.first_of_person[sim.buy_idx]
    second = acc.second_of_person[sim.buy_idx]
    use2 = (second >= 0) & (ts > acc.created[np.maximum(second, 0)]) & (rng.random(n) < 0.5)
    account = np.where(use2, second, account)
    ret = np.flatnonzero(sim.buy_return_day >= 0)
    ret_ts = (
        ctx.start_epoch
        + sim.buy_return_day[ret].astype(np.int64) * DAY
        + rng.integers(1, DAY - 1, len(ret))
    )
    return Orders(
        person=np.concatenate([sim.buy_idx, sim.buy_idx[ret]]),
        account=np.concatenate([account, account[ret]]),
        ts=np.concatenate([ts, ret_ts]),
        channel=np.concatenate([sim.buy_channel, sim.buy_channel[ret]]),
        cancelled=np.concatenate([sim.buy_cancelled, np.zeros(len(ret), dtype=bool)]),
        is_return=np.r_[np.zeros(n, dtype=bool), np.ones(len(ret), dtype=bool)],
        origin=np.r_[np.full(n, -1), ret],
    )


@dataclass
class Lines:
    order: np.ndarray
    linenum: np.ndarray
    item: np.ndarray
    qty: np.ndarray
    price: np.ndarray
    disc: np.ndarray
    amount: np.ndarray


def line_rows(rng: np.random.Generator, t: Traits, o: Orders, ctx: Context) -> Lines:
    """Lines of sales (1 + Poisson(basket)) and of returns (first line + some others)."""
    sales = np.flatnonzero(~o.is_return)
    k = 1 + rng.poisson(t.basket[o.person[sales]])
    order = np.repeat(sales, k)
    linenum = np.arange(len(order)) - np.repeat(np.cumsum(k) - k, k) + 1
    item = ctx.catalogue.sample(rng, len(order))
    qty = np.select([rng.random(len(order)) < 0.85, rng.random(len(order)) < 0.7], [1, 2], 3)
    price = ctx.catalogue.price[item]
    discounted = rng.random(len(o.ts)) < t.discount[o.person]
    pct = np.where(discounted, rng.choice([0.1, 0.15, 0.2, 0.25, 0.3], len(o.ts)), 0.0)
    disc = np.round(qty * price * pct[order], 2)
    sale = Lines(
        order, linenum, item, qty.astype(float), price, disc, np.round(qty * price - disc, 2)
    )
    # returns: copy lines of the returned order, negated; the first line always comes back
    rets = np.flatnonzero(o.is_return)
    origin_of = np.full(len(o.ts), -1)
    origin_of[o.origin[rets]] = rets
    back = origin_of[sale.order]
    keep = (back >= 0) & ((sale.linenum == 1) | (rng.random(len(order)) < 0.5))
    idx = np.flatnonzero(keep)
    ret = Lines(
        back[idx],
        sale.linenum[idx],
        sale.item[idx],
        -sale.qty[idx],
        sale.price[idx],
        -sale.disc[idx],
        -sale.amount[idx],
    )
    ret.linenum = _renumber(ret.order)
    return Lines(*(np.concatenate([getattr(sale, f), getattr(ret, f)]) for f in vars(sale)))


def _renumber(order: np.ndarray) -> np.ndarray:
    """1..k within each order id (input grouped by order)."""
    if not len(order):
        return order
    starts = np.r_[0, np.flatnonzero(np.diff(order)) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    return np.arange(len(order)) - np.repeat(starts, counts) + 1


@dataclass(frozen=True)
class _SalesOrders:
    """The sales-channel (online, call centre) orders of a block, as SalesTable headers.

    Their lines need the header's ids, times and cancellation: a cancelled order can take
    its lines with it, so the lines are built from this rather than from `Orders` alone.
    """

    sel: np.ndarray  # positions in Orders
    head: dict  # SalesTable columns of the first version
    ts: np.ndarray
    area: pa.Array
    who: np.ndarray
    is_ret: np.ndarray
    cancelled: np.ndarray
    at_once: np.ndarray  # cancelled when placed (no later status change)
    t2: np.ndarray  # time of the later status change
    drop_lines: np.ndarray  # uniform deciding whether a later cancellation deletes lines


def sales_tables(
    rng: np.random.Generator,
    t: Traits,
    o: Orders,
    lines: Lines,
    acc: Accounts,
    ctx: Context,
    counters: Counters,
) -> tuple[dict[str, pa.Table], pa.Array]:
    """SalesTable (with status changes and later cancellations) and SalesLine rows."""
    sel = np.flatnonzero(o.channel != CH_STORE)
    order_no = np.full(len(o.ts), -1)
    order_no[sel] = counters.take("order", len(sel))
    salesid_all = v.padded("SO-", np.maximum(order_no, 0), 9)
    orders, salestable = _sales_headers(rng, t, o, acc, ctx, counters, sel, order_no, salesid_all)
    salesline = _sales_lines(rng, orders, o, lines, ctx, counters)
    order_ids = v.null_where(
        order_no < 0, v.join("SO:", acc.dataareaid.take(pa.array(o.account)), "-", salesid_all)
    )
    return {"salestable": salestable, "salesline": salesline}, order_ids


def _sales_headers(
    rng: np.random.Generator,
    t: Traits,
    o: Orders,
    acc: Accounts,
    ctx: Context,
    counters: Counters,
    sel: np.ndarray,
    order_no: np.ndarray,
    salesid_all: pa.Array,
) -> tuple[_SalesOrders, pa.Table]:
    """SalesTable rows: each order as placed, then its invoice/delivery or cancellation.

    A return is created invoiced and an order cancelled at once has no second version;
    every other order changes status a few days later (cancellations sooner).
    """
    late = ctx.shape.late_share
    who = t.person_id[o.person[sel]]
    area = acc.dataareaid.take(pa.array(o.account[sel]))
    ts = o.ts[sel]
    recid = RECID_BASE + order_no[sel]
    is_ret = o.is_return[sel]
    cancelled = o.cancelled[sel]
    m = len(sel)
    u = rng.random((3, m))
    at_once = cancelled & (u[0] < 0.3)
    rma = v.padded("RMA-", counters.take("rma", m), 8)
    head = {
        "salesid": salesid_all.take(pa.array(sel)),
        "custaccount": acc.accountnum.take(pa.array(o.account[sel])),
        "salesstatus": np.where(is_ret, 3, np.where(at_once, 4, 1)),
        "salestype": np.where(is_ret, 4, 3),
        "currencycode": "USD",
        "retailchanneltable": np.where(
            o.channel[sel] == CH_CALL_CENTER, CALL_CENTER_CHANNEL, ONLINE_CHANNEL
        ),
        "returnitemnum": v.null_where(~is_ret, rma),
        "returnreasoncodeid": v.null_where(
            ~is_ret, v.take(v.RETURN_REASONS, rng.integers(0, len(v.RETURN_REASONS), m))
        ),
    }
    frames = [fo_frame("salestable", head, recid, ts, ts, area, who, rng, late_share=late)]
    later = np.flatnonzero(~is_ret & ~at_once)
    t2 = ts + np.where(cancelled, rng.integers(600, 5 * DAY, m), rng.integers(DAY, 4 * DAY, m))
    status2 = np.where(cancelled, 4, np.where(u[1] < 0.85, 3, 2))
    c2 = _take(dict(head, salesstatus=status2), later)
    frames.append(
        fo_frame(
            "salestable",
            c2,
            recid[later],
            ts[later],
            t2[later],
            area.take(pa.array(later)),
            who[later],
            rng,
            late_share=late,
        )
    )
    orders = _SalesOrders(sel, head, ts, area, who, is_ret, cancelled, at_once, t2, u[2])
    return orders, _concat(frames)


def _sales_lines(
    rng: np.random.Generator,
    s: _SalesOrders,
    o: Orders,
    lines: Lines,
    ctx: Context,
    counters: Counters,
) -> pa.Table:
    """SalesLine rows of the sales-channel orders, the deletes of cancelled orders' lines
    and orphan lines (whose header never arrives), as a real export has them."""
    late = ctx.shape.late_share
    pos_in_sel = np.full(len(o.ts), -1)
    pos_in_sel[s.sel] = np.arange(len(s.sel))
    li = np.flatnonzero(pos_in_sel[lines.order] >= 0)
    lo = pos_in_sel[lines.order[li]]
    nl = len(li)
    lrec = RECID_BASE + counters.take("line", nl)
    lcols = {
        "salesid": s.head["salesid"].take(pa.array(lo)),
        "linenum": lines.linenum[li].astype(float),
        "itemid": ctx.catalogue.item_id.take(pa.array(lines.item[li])),
        "salesqty": lines.qty[li],
        "salesprice": lines.price[li],
        "lineamount": lines.amount[li],
        "linedisc": lines.disc[li],
        "costprice": np.round(lines.price[li] * 0.6, 2),
        "currencycode": "USD",
        "salesstatus": np.ones(nl, dtype=np.int64),
        "returnstatus": np.where(s.is_ret[lo], 4, 0),
    }
    lts = s.ts[lo]
    area = s.area.take(pa.array(lo))
    frames = [fo_frame("salesline", lcols, lrec, lts, lts, area, s.who[lo], rng, late_share=late)]
    # half of the later-cancelled orders also lose their lines (delete rows)
    gone = np.flatnonzero(s.cancelled[lo] & ~s.at_once[lo] & (s.drop_lines[lo] < 0.5))
    frames.append(
        fo_frame(
            "salesline",
            _take(lcols, gone),
            lrec[gone],
            lts[gone],
            s.t2[lo][gone] + 60,
            s.area.take(pa.array(lo[gone])),
            s.who[lo][gone],
            rng,
            is_delete=True,
        )
    )
    # orphan lines: a header that never arrives
    orph = np.flatnonzero(rng.random(nl) < ctx.shape.orphan_line_share)
    ocols = dict(_take(lcols, orph), salesid=v.padded("SO-X", counters.take("order", len(orph)), 8))
    frames.append(
        fo_frame(
            "salesline",
            ocols,
            RECID_BASE + counters.take("line", len(orph)),
            lts[orph],
            lts[orph],
            s.area.take(pa.array(lo[orph])),
            np.full(len(orph), -1),
            rng,
        )
    )
    return _concat(frames)


@dataclass(frozen=True)
class _PosTransactions:
    """The POS transactions of a block: the persons' store orders, then anonymous walk-ins.

    Transactions 0..len(sel)-1 are the store orders `sel` (positions in Orders), the
    `n_anon` after them belong to nobody (no account, legal entity usrt).
    """

    sel: np.ndarray
    n_anon: int
    pos_of: np.ndarray  # per order: its transaction, -1 if not a store order
    orig: np.ndarray  # per transaction: the returned transaction, -1 if not a return
    is_ret: np.ndarray
    seq: np.ndarray
    store: np.ndarray
    store_s: pa.Array
    term_s: pa.Array
    txid: pa.Array
    ts: np.ndarray
    voided: np.ndarray
    custaccount: pa.Array
    area: pa.Array
    who: np.ndarray


def pos_tables(
    rng: np.random.Generator,
    t: Traits,
    o: Orders,
    lines: Lines,
    acc: Accounts,
    ctx: Context,
    counters: Counters,
) -> tuple[dict[str, pa.Table], pa.Array]:
    """POS transactions (store sales, store returns, anonymous walk-ins) and their lines."""
    tx = _pos_transactions(rng, t, o, acc, ctx, counters)
    tl = _pos_lines(rng, tx, lines, ctx)
    header = _pos_header_rows(rng, tx, tl, ctx)
    body = _pos_line_rows(rng, tx, tl, ctx, counters)
    n_all = len(o.ts)
    order_ids = pa.nulls(n_all, pa.string())
    if len(tx.sel):
        full = np.full(n_all, 0)
        full[tx.sel] = np.arange(len(tx.sel))
        order_ids = v.null_where(tx.pos_of < 0, v.join("POS:", tx.txid.take(pa.array(full))))
    return {"retailtransactiontable": header, "retailtransactionsalestrans": body}, order_ids


def _pos_transactions(
    rng: np.random.Generator,
    t: Traits,
    o: Orders,
    acc: Accounts,
    ctx: Context,
    counters: Counters,
) -> _PosTransactions:
    """Store, terminal, id, time and account of every POS transaction.

    A person shops at a home store, sometimes at another one; a return goes back to the
    store of its sale. Walk-ins fall anywhere in the time range of the block's orders.
    """
    n_all = len(o.ts)
    sel = np.flatnonzero(o.channel == CH_STORE)
    # a few anonymous walk-ins: extra transactions of nobody, same time range
    n_anon = int(round(len(sel) * ctx.shape.anonymous_pos_share))
    m = len(sel) + n_anon
    home = rng.integers(0, len(STORES), len(t))
    store = np.concatenate([home[o.person[sel]], rng.integers(0, len(STORES), n_anon)])
    away = rng.random(m) < 0.15
    store = np.where(away, rng.integers(0, len(STORES), m), store)
    # a return goes back to the store of its sale
    is_ret = np.r_[o.is_return[sel], np.zeros(n_anon, dtype=bool)]
    pos_of = np.full(n_all, -1)
    pos_of[sel] = np.arange(len(sel))
    orig = np.r_[pos_of[np.maximum(o.origin[sel], 0)], np.full(n_anon, -1)]
    store[is_ret] = store[orig[is_ret]]
    terminal = rng.integers(1, 5, m)
    seq = counters.take("pos", m)
    store_s = v.take(STORES, store)
    term_s = v.padded("T", terminal, 2)
    span = max(1, int(o.ts.max() - ctx.start_epoch) // DAY + 1) if n_all else 1
    anon_ts = (
        ctx.start_epoch + rng.integers(0, span, n_anon) * DAY + rng.integers(1, DAY - 1, n_anon)
    )
    voided = np.r_[o.cancelled[sel], rng.random(n_anon) < ctx.p.void_pos]
    acct = np.r_[o.account[sel], np.zeros(n_anon, dtype=np.int64)]
    anon = np.r_[np.zeros(len(sel), bool), np.ones(n_anon, bool)]
    custaccount = v.null_where(
        anon, acc.accountnum.take(pa.array(acct)) if len(acc.pos) else pa.nulls(m, pa.string())
    )
    area = v.where(
        anon,
        pa.scalar("usrt"),
        acc.dataareaid.take(pa.array(acct)) if len(acc.pos) else pa.repeat("usrt", m),
    )
    return _PosTransactions(
        sel=sel,
        n_anon=n_anon,
        pos_of=pos_of,
        orig=orig,
        is_ret=is_ret,
        seq=seq,
        store=store,
        store_s=store_s,
        term_s=term_s,
        txid=v.join(store_s, "-", term_s, "-", v.padded("", seq, 9)),
        ts=np.r_[o.ts[sel], anon_ts],
        voided=voided,
        custaccount=custaccount,
        area=area,
        who=np.r_[t.person_id[o.person[sel]], np.full(n_anon, -1)],
    )


def _pos_lines(rng: np.random.Generator, tx: _PosTransactions, lines: Lines, ctx: Context) -> Lines:
    """The lines of the POS transactions (`order` = transaction): the persons' store-order
    lines, then 1-3 single-unit, undiscounted lines per walk-in."""
    li = np.flatnonzero(tx.pos_of[lines.order] >= 0)
    ka = rng.integers(1, 4, tx.n_anon)
    ao = len(tx.sel) + np.repeat(np.arange(tx.n_anon), ka)
    a_item = ctx.catalogue.sample(rng, len(ao))
    return Lines(
        order=np.r_[tx.pos_of[lines.order[li]], ao],
        linenum=np.r_[lines.linenum[li], _renumber(ao)],
        item=np.r_[lines.item[li], a_item],
        qty=np.r_[lines.qty[li], np.ones(len(ao))],
        price=np.r_[lines.price[li], ctx.catalogue.price[a_item]],
        disc=np.r_[lines.disc[li], np.zeros(len(ao))],
        amount=np.r_[lines.amount[li], ctx.catalogue.price[a_item]],
    )


def _pos_header_rows(
    rng: np.random.Generator, tx: _PosTransactions, tl: Lines, ctx: Context
) -> pa.Table:
    """RetailTransactionTable rows, with totals summed from the transaction's lines."""
    m = len(tx.ts)
    lo = tl.order
    gross = np.round(np.bincount(lo, tl.qty * tl.price, minlength=m), 2)
    discamt = np.round(np.bincount(lo, tl.disc, minlength=m), 2)
    day0 = (tx.ts - ctx.start_epoch) // DAY
    loyalty = v.null_where(rng.random(m) < 0.6, v.padded("LC", tx.seq, 10))
    head = {
        "transactionid": tx.txid,
        "store": tx.store_s,
        "terminal": tx.term_s,
        "channel": STORE_CHANNEL_BASE + tx.store,
        "custaccount": tx.custaccount,
        "transdate": ctx.start_epoch + day0 * DAY,
        "transtime": (tx.ts - ctx.start_epoch) % DAY,
        "type": np.full(m, 2),
        "entrystatus": tx.voided.astype(np.int64),
        "grossamount": gross,
        "netamount": np.round(gross - discamt, 2),
        "discamount": discamt,
        "numberofitems": np.bincount(lo, tl.qty, minlength=m),
        "currency": "USD",
        "loyaltycardid": loyalty,
    }
    recid = RECID_BASE + tx.seq
    late = ctx.shape.late_share
    return fo_frame(
        "retailtransactiontable", head, recid, tx.ts, tx.ts, tx.area, tx.who, rng, late_share=late
    )


def _pos_line_rows(
    rng: np.random.Generator, tx: _PosTransactions, tl: Lines, ctx: Context, counters: Counters
) -> pa.Table:
    """RetailTransactionSalesTrans rows; a return line names the returned transaction."""
    lo = tl.order
    ret_tx = v.null_where(~tx.is_ret[lo], tx.txid.take(pa.array(np.maximum(tx.orig[lo], 0))))
    lcols = {
        "transactionid": tx.txid.take(pa.array(lo)),
        "linenum": tl.linenum.astype(float),
        "itemid": ctx.catalogue.item_id.take(pa.array(tl.item)),
        "qty": tl.qty,
        "price": tl.price,
        "netamount": tl.amount,
        "discamount": tl.disc,
        "returnnosale": np.zeros(len(lo), dtype=np.int64),
        "returntransactionid": ret_tx,
        "transactionstatus": tx.voided[lo].astype(np.int64),
        "store": tx.store_s.take(pa.array(lo)),
        "terminal": tx.term_s.take(pa.array(lo)),
    }
    lrec = RECID_BASE + counters.take("pos_line", len(lo))
    return fo_frame(
        "retailtransactionsalestrans",
        lcols,
        lrec,
        tx.ts[lo],
        tx.ts[lo],
        tx.area.take(pa.array(lo)),
        tx.who[lo],
        rng,
        late_share=ctx.shape.late_share,
    )


# ----------------------------------------------------------------------------- dataverse


def contact_rows(
    rng: np.random.Generator, t: Traits, people: People, acc: Accounts, ctx: Context
) -> tuple[pa.Table, pa.Array]:
    """Dataverse contacts with the dirt dual-write and people add (case, nicknames, formats)."""
    n = len(t)
    idx = np.flatnonzero(t.has_contact)
    m = len(idx)
    contactid_all = pa.nulls(n, pa.string())
    ids = v.guids(rng, m)
    if m:
        full = np.zeros(n, dtype=np.int64)
        full[idx] = np.arange(m)
        contactid_all = v.null_where(~t.has_contact, ids.take(pa.array(full)))
    p = _take(vars(people), idx)
    first_acc = acc.first_of_person[idx]
    base_created = ctx.start_epoch + t.entry_day[idx].astype(np.int64) * DAY + t.created_sec[idx]
    created = np.where(first_acc >= 0, base_created + rng.integers(60, 3600, m), base_created)
    u = rng.random((10, m))
    first, last = p["first"], p["last"]
    nick = v.take([v.NICKNAMES.get(f, f) for f in v.first_names()], p["first_idx"])
    first = v.where(u[0] < 0.03, nick, first)
    typo = v.join(
        pc.utf8_slice_codeunits(first, 0, 1),
        pc.utf8_slice_codeunits(first, 2, 3),
        pc.utf8_slice_codeunits(first, 1, 2),
        pc.utf8_slice_codeunits(first, 3, 99),
    )
    first = v.where(u[1] < 0.01, typo, first)
    first = v.where(
        u[2] < 0.05, pc.utf8_upper(first), v.where(u[2] > 0.95, pc.utf8_lower(first), first)
    )
    last = v.where(u[3] < 0.05, pc.utf8_upper(last), last)
    first = v.null_where(u[4] < 0.02, first)
    last = v.null_where(u[4] > 0.99, last)
    fullname = pc.utf8_trim_whitespace(
        pc.binary_join_element_wise(pc.fill_null(first, ""), pc.fill_null(last, ""), " ")
    )
    email = p["email"]
    email = v.where(
        u[5] < 0.1, pc.utf8_upper(email), v.where(u[5] > 0.92, pc.utf8_capitalize(email), email)
    )
    email = v.where(u[6] < 0.05, v.join(" ", email, "  "), email)
    email = v.null_where(u[6] > 0.97, email)
    fmt = rng.integers(0, 5, m)
    phone = v.phone_formats(p["area"], p["phone_line"], fmt)
    mobile = v.null_where(
        u[7] < 0.5,
        v.phone_formats(
            p["area"], p["phone_line"] // 10_000 * 10_000 + (p["phone_line"] + 17) % 10_000, fmt
        ),
    )
    cols = {
        "contactid": ids,
        "firstname": first,
        "lastname": last,
        "fullname": v.null_where(np.asarray(pc.equal(fullname, "")), fullname),
        "emailaddress1": email,
        "telephone1": v.null_where(u[7] > 0.9, phone),
        "mobilephone": mobile,
        "address1_line1": v.join(p["street_no"], " ", p["street"]),
        "address1_city": v.take([c[0] for c in v.CITIES], p["city"]),
        "address1_postalcode": p["zipcode"],
        "address1_country": v.where(u[8] < 0.5, pa.scalar("US"), pa.scalar("United States")),
        "birthdate": np.where(p["birthdate"] >= 0, p["birthdate"], np.iinfo(np.int64).min),
        "createdon": created,
        "statecode": (u[9] < 0.03).astype(np.int64),
        "donotemail": u[8] < 0.1,
        "donotbulkemail": u[9] < 0.2,
    }
    cols["birthdate"] = pa.array(cols["birthdate"], mask=p["birthdate"] < 0)
    who = t.person_id[idx]
    frames = [dv_frame("contact", cols, ids, created, who, rng)]
    upd = np.flatnonzero(rng.random(m) < ctx.shape.contact_update_share)
    t_upd = created + rng.integers(10, 700, m) * DAY
    c2 = dict(
        cols,
        donotbulkemail=~cols["donotbulkemail"],
        telephone1=v.phone_formats(p["area"], p["phone_line"], (fmt + 1) % 5),
    )
    c2 = _take(c2, upd)
    frames.append(dv_frame("contact", c2, ids.take(pa.array(upd)), t_upd[upd], who[upd], rng))
    return _concat(frames), contactid_all


def incident_rows(
    rng: np.random.Generator, t: Traits, sim: SimResult, contact_of: pa.Array, ctx: Context
) -> tuple[pa.Table, pa.Table]:
    """Support cases (with status changes), mistaken deleted cases and unlinked cases."""
    sh = ctx.shape
    n = len(sim.case_idx)
    n_del = int(round(n * sh.deleted_incident_share))
    n_unl = int(round(n * sh.unlinked_incident_share))
    holders = np.flatnonzero(t.has_contact)
    del_who = holders[rng.integers(0, len(holders), n_del)] if len(holders) else np.zeros(0, int)
    m = n + n_del + n_unl
    ids = v.guids(rng, m)
    pos = np.r_[sim.case_idx, del_who, np.zeros(n_unl, dtype=np.int64)]
    day = np.r_[sim.case_day, rng.integers(0, ctx.n_days, n_del + n_unl)].astype(np.int64)
    created = ctx.start_epoch + day * DAY + rng.integers(1, DAY - 1, m)
    customer = contact_of.take(pa.array(pos)) if len(t) else pa.nulls(m, pa.string())
    unlinked = np.arange(m) >= n + n_del
    customer = v.where(unlinked, v.guids(rng, m), customer)
    who = np.where(unlinked, -1, t.person_id[pos] if len(t) else -1)
    u = rng.random((2, m))
    ctype = rng.integers(1, 4, m)
    prio = rng.choice([1, 2, 3], m, p=[0.2, 0.6, 0.2])
    cols = {
        "incidentid": ids,
        "customerid": customer,
        "title": v.take(v.CASE_TITLES, rng.integers(0, len(v.CASE_TITLES), m)),
        "casetypecode": ctype,
        "prioritycode": prio,
        "createdon": created,
        "statecode": np.zeros(m, dtype=np.int64),
    }
    frames = [dv_frame("incident", cols, ids, created, who, rng)]
    real = np.arange(m) < n
    final = np.where(u[0] < 0.9, 1, np.where(u[0] < 0.95, 2, 0))
    closes = np.flatnonzero((real | unlinked) & (final > 0))
    t2 = created + rng.integers(2 * 3600, 14 * DAY, m)
    frames.append(
        dv_frame(
            "incident",
            _take(dict(cols, statecode=final), closes),
            ids.take(pa.array(closes)),
            t2[closes],
            who[closes],
            rng,
        )
    )
    dele = np.flatnonzero(~real & ~unlinked)
    frames.append(
        dv_frame(
            "incident",
            _take(cols, dele),
            ids.take(pa.array(dele)),
            created[dele] + rng.integers(600, 6 * 3600, len(dele)),
            who[dele],
            rng,
            is_delete=True,
        )
    )
    r = np.flatnonzero(real)
    truth = pa.table(
        {
            "person_id": pa.array(t.person_id[pos[r]] if len(t) else np.zeros(0, np.int64)),
            "incident_id": ids.take(pa.array(r)),
            "contact_id": customer.take(pa.array(r)),
            "ts": _ts(created[r]),
            "casetypecode": pa.array(ctype[r]),
            "prioritycode": pa.array(prio[r]),
            "final_statecode": pa.array(np.where(final[r] > 0, final[r], 0)),
        }
    )
    return _concat(frames), truth


def _ts(epoch: np.ndarray) -> pa.Array:
    return pa.array(
        np.asarray(epoch, dtype=np.int64) * 1_000_000, type=pa.timestamp("us", tz="UTC")
    )


# ----------------------------------------------------------------------------- block


def build_block(
    rng: np.random.Generator, t: Traits, sim: SimResult, ctx: Context, counters: Counters
) -> Block:
    """Every source row and truth frame of one person block."""
    people = draw_people(rng, t, ctx)
    acc = draw_accounts(rng, t, ctx, counters)
    block = Block()
    cust, flags = customer_tables(rng, t, people, acc, ctx)
    block.tables.update(cust)
    orders = order_rows(rng, t, sim, acc, ctx)
    lines = line_rows(rng, t, orders, ctx)
    sales, sales_ids = sales_tables(rng, t, orders, lines, acc, ctx, counters)
    pos, pos_ids = pos_tables(rng, t, orders, lines, acc, ctx, counters)
    block.tables.update(sales)
    block.tables.update(pos)
    contact, contact_of = contact_rows(rng, t, people, acc, ctx)
    incident, cases = incident_rows(rng, t, sim, contact_of, ctx)
    block.tables["contact"] = contact
    block.tables["incident"] = incident
    order_id = pc.coalesce(sales_ids, pos_ids)
    net = np.round(np.bincount(lines.order, lines.amount, minlength=len(orders.ts)), 2)
    block.truth["purchases"] = pa.table(
        {
            "person_id": pa.array(t.person_id[orders.person]),
            "order_id": order_id,
            "ts": _ts(orders.ts),
            "net_amount": pa.array(net),
            "channel": v.take([CHANNEL_NAMES[k] for k in sorted(CHANNEL_NAMES)], orders.channel),
            "is_return": pa.array(orders.is_return),
            "cancelled": pa.array(orders.cancelled),
            "source_key": acc.key.take(pa.array(orders.account)),
            "origin_order_id": v.null_where(
                orders.origin < 0, order_id.take(pa.array(np.maximum(orders.origin, 0)))
            ),
        }
    )
    block.truth["cases"] = cases
    block.truth["persons"] = persons_frame(t, sim, acc, flags, ctx)
    block.truth["person_keys"] = person_keys_frame(t, acc, contact_of)
    block.tables["generic"] = generic_rows(t, orders, lines, order_id, ctx)
    return block


def persons_frame(t: Traits, sim: SimResult, acc: Accounts, flags: dict, ctx: Context) -> pa.Table:
    """Every latent parameter of each person, its dropout and record flags."""
    cols = {k: pa.array(val) for k, val in t.columns().items()}
    cols["kind"] = v.take([KIND_NAMES[k] for k in sorted(KIND_NAMES)], t.kind)
    created = ctx.start_epoch + t.entry_day.astype(np.int64) * DAY + t.created_sec
    cols["created"] = _ts(created)
    dropped = sim.dropout_day < ctx.n_days
    cols["dropout_day"] = pa.array(sim.dropout_day, mask=~dropped)
    cols["dropout_ts"] = pa.array(
        ctx.start_epoch * 1_000_000 + sim.dropout_day.astype(np.int64) * DAY * 1_000_000,
        type=pa.timestamp("us", tz="UTC"),
        mask=~dropped,
    )
    for name, flag in flags.items():  # per account -> any account of the person
        per = np.zeros(len(t), dtype=bool)
        per[acc.pos[flag]] = True
        cols[name] = pa.array(per)
    first = acc.first_of_person
    cols["account_seq"] = pa.array(np.where(first >= 0, acc.seq[np.maximum(first, 0)], -1))
    second = acc.second_of_person
    cols["account2_seq"] = pa.array(np.where(second >= 0, acc.seq[np.maximum(second, 0)], -1))
    return pa.table(cols)


def person_keys_frame(t: Traits, acc: Accounts, contact_of: pa.Array) -> pa.Table:
    """person_id -> every source key: d365 accounts, the Dataverse contact, the generic id."""
    has = np.flatnonzero(t.has_contact)
    buyers = np.flatnonzero(t.kind != KIND_CONTACT_ONLY)
    return pa.table(
        {
            "person_id": pa.array(
                np.r_[t.person_id[acc.pos], t.person_id[has], t.person_id[buyers]]
            ),
            "source": pa.array(
                ["d365"] * len(acc.pos) + ["dataverse"] * len(has) + ["generic"] * len(buyers)
            ),
            "source_key": pa.concat_arrays(
                [
                    acc.key,
                    contact_of.take(pa.array(has, type=pa.int64())),
                    generic_id(t.person_id[buyers]),
                ]
            ),
        }
    )


def generic_id(person_id: np.ndarray) -> pa.Array:
    return v.padded("G", person_id, 8)


def generic_rows(t: Traits, o: Orders, lines: Lines, order_id: pa.Array, ctx: Context) -> pa.Table:
    """Line-level transactions of the generic (non-Dynamics) path: valid orders and returns."""
    keep = np.flatnonzero(~o.cancelled[lines.order])
    order = lines.order[keep]
    ts = o.ts[order]
    return pa.table(
        {
            "customer_id": generic_id(t.person_id[o.person[order]]),
            "timestamp": pa.array(ts),
            "amount": pa.array(lines.amount[keep]),
            "order_id": order_id.take(pa.array(order)),
            "product_id": ctx.catalogue.item_id.take(pa.array(lines.item[keep])),
            "is_return": pa.array(o.is_return[order]),
            "_emit": pa.array(ts),
            "_person": pa.array(t.person_id[o.person[order]]),
        }
    )
