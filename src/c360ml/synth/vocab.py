"""Word lists and vectorised string helpers for the synthetic lake.

Why pyarrow compute for strings: building millions of ids, e-mails and phone numbers with
Python f-strings would dominate a 1M-customer run; Arrow kernels do it in C++.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NICKNAMES = {
    "Robert": "Bob",
    "William": "Bill",
    "Elizabeth": "Liz",
    "Richard": "Dick",
    "Joseph": "Joe",
    "Thomas": "Tom",
    "Christopher": "Chris",
    "Daniel": "Dan",
    "Matthew": "Matt",
    "Anthony": "Tony",
    "Michael": "Mike",
    "Jennifer": "Jen",
    "Margaret": "Peggy",
    "Katherine": "Kate",
    "Samantha": "Sam",
    "Benjamin": "Ben",
    "Alexander": "Alex",
    "Nicholas": "Nick",
    "Patricia": "Pat",
    "Steven": "Steve",
}
# Person names: weighted tables of the US population (names_en_us.csv, extracted from Faker
# 40.54.0's en_US person provider, MIT, names_en_us.LICENSE; its first names are the top
# names of the 1960s-90s by sex from the Social Security Administration, its surnames the
# top 1,000 of the 2000 US Census, each weighted by how many people carry it).
NAME_TABLE = "names_en_us.csv"
# The census's top 1,000 surnames are carried by about 42% of the population; the rest
# carry a long tail of rarer ones. The tail is drawn here with a frequency falling as
# 1/rank from rank 1,001 to TAIL_RANKS, which meets the top table's last frequency and
# makes most tail surnames rare even among a million people.
TOP_SURNAME_SHARE = 0.42
TAIL_RANKS = 125_000
_TAIL_PARTS = (
    "Bar Kel Mor Dal Hen Lin Ros Wes Tal Fen Gar Hal Ker Lom Nor Pel Quin Rad Sel Tor Vel "
    "Wen Yar Zel Ash Brim Cal Dro Elk Fal Gil Hol Ivar Jor Kas Lur Mav Nev Orl Pax Rud Sal "
    "Tam Ulm Var Wol Cor Bel Dun Hart Mil Pra Sten Tro Ved",
    "_ a e i o u an el in or ra le ni ven dor mar ber lin ton ker sel wal rin",
    "son sen berg burg ski sky ley ly ton man mann er ers ick ock ez es ard ward field ford "
    "wood well worth ham by dale ridge brook stone more land ing ington hurst combe lock "
    "lin kins kin ette ier ot ini elli etti ova enko uk ich ovic strom quist gren lund hed "
    "holm dahl ner rich bert mond ray vey sby ston sham ridge cott croft stead vale garth "
    "wick thorpe den don ner ter bury fort mont ville mer han gan lan nan ran tan van yan "
    "sing ling ring ting rick nick dick lick mick kirk",
)


@dataclass(frozen=True)
class NameTable:
    """Names with the cumulative share of people carrying them (for inverse-CDF draws)."""

    names: tuple[str, ...]
    cdf: np.ndarray  # ascending, last value 1.0

    def draw(self, u: np.ndarray) -> np.ndarray:
        """Index of the name each uniform draw u in [0, 1) falls on."""
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.names) - 1)


def _table(rows: list[tuple[str, float]]) -> NameTable:
    weights = np.array([w for _, w in rows], dtype=np.float64)
    return NameTable(tuple(n for n, _ in rows), np.cumsum(weights) / weights.sum())


@functools.cache
def name_tables() -> dict[str, NameTable]:
    """The female, male and surname tables of NAME_TABLE (read on first use, not at import)."""
    rows: dict[str, list[tuple[str, float]]] = {"female": [], "male": [], "last": []}
    with resources.files(__package__).joinpath(NAME_TABLE).open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows[row["list"]].append((row["name"], float(row["weight"])))
    return {k: _table(v) for k, v in rows.items()}


@functools.cache
def first_names() -> tuple[str, ...]:
    """Female then male first names: the values a first-name index points into."""
    t = name_tables()
    return t["female"].names + t["male"].names


@functools.cache
def tail_surnames() -> tuple[str, ...]:
    """TAIL_RANKS - 1000 made-up surnames, distinct and none in the census table, in a fixed
    order (rank 1,001 first), composed from three syllable lists."""
    a, b, c = (p.split() for p in _TAIL_PARTS)
    top = set(name_tables()["last"].names)
    seen: dict[str, None] = {}
    for k in range(len(a) * len(b) * len(c)):
        i, j, m = k % len(a), (k // len(a)) % len(b), k // (len(a) * len(b))
        name = a[i] + b[j].strip("_") + c[m]
        if name not in top:
            seen.setdefault(name)
    names = tuple(seen)[: TAIL_RANKS - 1000]
    if len(names) < TAIL_RANKS - 1000:
        raise ValueError(
            f"tail surname syllables give {len(names)} names, need {TAIL_RANKS - 1000}"
        )
    return names


def draw_first_names(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_female, index into first_names()) for n people: half female, half male, each
    name as frequent as in its sex's table (a first name's frequency depends on sex)."""
    female = rng.random(n) < 0.5
    u = rng.random(n)
    t = name_tables()
    idx = np.where(female, t["female"].draw(u), len(t["female"].names) + t["male"].draw(u))
    return female, idx


def draw_last_names(rng: np.random.Generator, n: int) -> pa.Array:
    """n surnames: TOP_SURNAME_SHARE of people from the census table by its weights, the
    rest from the 1/rank tail (inverse CDF of a continuous 1/rank density on the ranks)."""
    u = rng.random(n)
    top = u < TOP_SURNAME_SHARE
    census = name_tables()["last"]
    top_idx = census.draw(np.where(top, u / TOP_SURNAME_SHARE, 0.0))
    tail_u = np.where(top, 0.0, (u - TOP_SURNAME_SHARE) / (1 - TOP_SURNAME_SHARE))
    tail_rank = np.floor(1000 * (TAIL_RANKS / 1000) ** tail_u).astype(np.int64)  # 1000 ..
    tail_idx = np.clip(tail_rank - 1000, 0, TAIL_RANKS - 1001)
    words = census.names + tail_surnames()
    return take(words, np.where(top, top_idx, len(census.names) + tail_idx))


ORG_WORDS = (
    "Acme Globex Initech Umbrella Stark Wayne Wonka Soylent Hooli Vandelay Massive Cyberdyne "
    "Tyrell Oscorp Aperture Gringotts Dunder Prestige Sterling Pied Bluth Monarch Nakatomi"
).split()
ORG_SUFFIXES = ("LLC", "Inc.", "Corp", "Ltd", "Group", "Supply Co")
STREETS = (
    "Main St",
    "Oak Ave",
    "Pine St",
    "Maple Ave",
    "Cedar Ln",
    "Elm St",
    "Washington Blvd",
    "Lake Dr",
    "Hill Rd",
    "Park Ave",
    "Sunset Blvd",
    "Broadway",
    "River Rd",
    "Church St",
    "Market St",
    "Spring St",
    "Center St",
    "Highland Ave",
)
CITIES = (  # city, county, state, zip prefix, area code
    ("Houston", "Harris", "TX", "770", "713"),
    ("Seattle", "King", "WA", "981", "206"),
    ("New York", "New York", "NY", "100", "212"),
    ("Chicago", "Cook", "IL", "606", "312"),
    ("Boston", "Suffolk", "MA", "021", "617"),
    ("Denver", "Denver", "CO", "802", "303"),
    ("Miami", "Miami-Dade", "FL", "331", "305"),
    ("San Francisco", "San Francisco", "CA", "941", "415"),
    ("Austin", "Travis", "TX", "787", "512"),
    ("Portland", "Multnomah", "OR", "972", "503"),
    ("Atlanta", "Fulton", "GA", "303", "404"),
    ("Phoenix", "Maricopa", "AZ", "850", "602"),
)
DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "proton.me")
CATEGORIES = (
    "APPAREL SHOES ACCESSORIES HOME KITCHEN OUTDOOR SPORTS TOYS BEAUTY ELECTRONICS BOOKS "
    "GARDEN PET BABY JEWELRY GROCERY OFFICE TOOLS"
).split()
RETURN_REASONS = ("DAMAGED", "WRONGSIZE", "NOTNEEDED", "LATE", "DEFECT")
CASE_TITLES = (
    "Where is my order",
    "Damaged item",
    "Refund request",
    "Wrong size delivered",
    "Loyalty points missing",
    "Billing question",
    "Product question",
    "Cannot log in",
)


def strs(values) -> pa.Array:
    """A pyarrow string array from a list or numpy array of str."""
    return pa.array(values, type=pa.string())


def take(words, idx: np.ndarray) -> pa.Array:
    """words[idx] as an Arrow string array."""
    return strs(list(words)).take(pa.array(np.asarray(idx, dtype=np.int64)))


def padded(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """prefix + zero-padded decimal number, e.g. padded("C", [12], 7) -> "C0000012"."""
    digits = pc.utf8_lpad(
        pc.cast(pa.array(np.asarray(numbers, dtype=np.int64)), pa.string()), width, "0"
    )
    return join(prefix, digits) if prefix else digits


def join(*parts) -> pa.Array:
    """Element-wise concatenation of string arrays and scalars (null if any part is null)."""
    return pc.binary_join_element_wise(*parts, "")


def where(mask: np.ndarray, a, b) -> pa.Array:
    """mask ? a : b for Arrow arrays/scalars."""
    return pc.if_else(pa.array(np.asarray(mask, dtype=bool)), a, b)


def null_where(mask: np.ndarray, values: pa.Array) -> pa.Array:
    """values with nulls where mask is true."""
    return pc.if_else(pa.array(np.asarray(mask, dtype=bool)), pa.scalar(None, values.type), values)


def guids(rng: np.random.Generator, n: int) -> pa.Array:
    """n random GUID strings (lower-case 8-4-4-4-12), built from one byte buffer."""
    if n == 0:
        return pa.array([], type=pa.string())
    hexes = np.frombuffer(rng.bytes(16 * n).hex().encode(), dtype=np.uint8).reshape(n, 32)
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    for dst, src in ((0, 0), (9, 8), (14, 12), (19, 16), (24, 20)):
        width = {0: 8, 9: 4, 14: 4, 19: 4, 24: 12}[dst]
        out[:, dst : dst + width] = hexes[:, src : src + width]
    return pc.cast(pa.array(out.view("S36").ravel()), pa.string())


def record_ids(table_no: int, recid: np.ndarray) -> pa.Array:
    """The Synapse `Id` of a finance & operations row: a GUID-shaped image of its RecId."""
    return join(f"{table_no:08x}-0000-4000-8000-", padded("", recid, 12))


def phone_formats(area: pa.Array, number: np.ndarray, fmt: np.ndarray) -> pa.Array:
    """Phone numbers in `area`, `number` the seven digits after it (exchange and line), in
    one of five formats per row (the dirt contacts carry). Seven digits, not a fixed
    exchange: at a million persons four digits per area code left fewer numbers than
    households, and the phone rule could not tell people apart."""
    exchange, last4 = padded("", number // 10_000, 3), padded("", number % 10_000, 4)
    variants = [
        join("(", area, ") ", exchange, "-", last4),
        join("+1 ", area, " ", exchange, " ", last4),
        join(area, ".", exchange, ".", last4),
        join(area, exchange, last4),
        join(area, "-", exchange, "-", last4),
    ]
    out = variants[0]
    for k in range(1, len(variants)):
        out = where(fmt == k, variants[k], out)
    return out
