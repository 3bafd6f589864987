"""Word lists and vectorised string helpers for the synthetic lake.

Why pyarrow compute for strings: building millions of ids, e-mails and phone numbers with
Python f-strings would dominate a 1M-customer run; Arrow kernels do it in C++.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FIRST_NAMES = (
    "James Mary Robert Patricia John Jennifer Michael Linda William Elizabeth David Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily "
    "Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa "
    "Timothy Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia "
    "Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry "
    "Pamela Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory "
    "Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine Dennis "
    "Maria Jerry Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Nathan Joyce Henry "
    "Virginia Douglas Victoria Zachary Kelly Peter Lauren Kyle Christina Ethan Joan Walter "
    "Evelyn Noah Judith Jeremy Megan Christian Andrea Keith Cheryl Roger Hannah Terry Jacqueline"
).split()
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
LAST_NAMES = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez "
    "Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson "
    "White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott "
    "Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter "
    "Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris "
    "Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly "
    "Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza "
    "Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross Foster Jimenez Powell"
).split()
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


def phone_formats(area: pa.Array, line: np.ndarray, fmt: np.ndarray) -> pa.Array:
    """Phone numbers 555-xxxx in one of five formats per row (the dirt contacts carry)."""
    last4 = padded("", line, 4)
    variants = [
        join("(", area, ") 555-", last4),
        join("+1 ", area, " 555 ", last4),
        join(area, ".555.", last4),
        join(area, "555", last4),
        join(area, "-555-", last4),
    ]
    out = variants[0]
    for k in range(1, len(variants)):
        out = where(fmt == k, variants[k], out)
    return out
