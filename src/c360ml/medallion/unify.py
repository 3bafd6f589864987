"""Unify: the only stage that assigns customer_id (silver -> unify -> gold).

Records of the same person across Commerce accounts and Dataverse contacts are matched
by the rules of `pipelines/unify.yaml` (exact keys with blocking, then fuzzy names
inside small blocks), clustered as connected components of the matched pairs, and
merged attribute by attribute. Ids are stable: a cluster keeps the id its records had;
on a merge the oldest id survives and the others are redirected; on a split the part
holding the oldest record keeps the id. Outputs: `gold/customer_source_map` (the
backstamp), `gold/customer_profile`, `gold/customer_id_redirects`, `gold/unify_report`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import BaseModel, ConfigDict
from rapidfuzz import fuzz, process
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from c360ml.config import Settings, load_yaml_model
from c360ml.medallion.checks import validate_arrow
from c360ml.medallion.gold import lake_versions, replace_rows
from c360ml.medallion.sql import connect, duckdb_connection, register, run_sql, sql_text
from c360ml.schemas import CustomerIdRedirects, CustomerProfile, CustomerSourceMap, columns
from c360ml.storage.inputs import last_record, stamp
from c360ml.storage.lake import Lake
from c360ml.storage.lease import writes_lake

log = logging.getLogger(__name__)

MATCH_FIELDS = (
    "email",
    "phone",
    "last_name",
    "full_name",
    "postal_code",
    "last_initial",
    "street",
)
RECORDS_TOTAL = "_records"  # the row of a frequency table that counts all records


# ---------------------------------------------------------------- typed rules


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FuzzySpec(_Strict):
    field: Literal["full_name", "last_name", "email"]  # compared inside each block
    scorer: Literal["token_sort_ratio", "ratio", "token_set_ratio"] = "token_sort_ratio"
    threshold: float  # 0-100; pairs scoring at least this match


class CommonValues(_Strict):
    """Term-frequency evidence of a fuzzy rule: a match on a common value (a frequent name)
    is weaker evidence than one on a rare value, so it needs more agreeing fields.

    A record's value is common where the records sharing its `per` value (its postal
    code) are expected to hold more than `max_expected` records with the value by chance:
    share of `field`'s value among all records x records of the `per` value. Without
    `per` (a household's phone), where more than `max_expected` other records carry it.
    A pair with a common value at either end links only if one of `require_any` agrees.
    Frequencies are counted from the data by the build that has no state yet, and kept
    (state/unify/frequencies) for later builds to decide the same way."""

    field: Literal[MATCH_FIELDS] = "full_name"  # whose value's frequency is counted
    per: Literal[MATCH_FIELDS] | None = "postal_code"  # the crowd it may be common in
    max_expected: float  # expected records with the value by chance, above it: common
    require_any: list[Literal[MATCH_FIELDS]]  # present on both records and equal: one of


class MatchRule(_Strict):
    name: str  # reported per rule
    exact: list[Literal[MATCH_FIELDS]]  # equal and non-empty on both records (the block)
    fuzzy: FuzzySpec | None = None  # optional similarity test inside the block
    # fuzzy rules only: a pair is vetoed when every one of these fields is present on both
    # records and differs (two namesakes in one postal code with their own e-mail and phone)
    veto_if_all_differ: list[Literal[MATCH_FIELDS]] = []
    common: CommonValues | None = None  # fuzzy rules only: more evidence on common values


class MergePolicy(_Strict):
    source_priority: list[str]  # order of sources for by_source_priority attributes
    most_recent: list[str]  # attributes taken from the most recently modified record
    by_source_priority: list[str]  # attributes taken by source priority


class UnifyRules(_Strict):
    junk_fields: list[Literal[MATCH_FIELDS]] = ["email", "phone"]  # identifiers checked for junk
    junk_max_records: int = 4  # identifier values shared by more records are not matched on
    max_block_size: int = 200  # fuzzy rules skip larger blocks (reported)
    # rules with `common`: when the records number more or fewer than the kept frequencies
    # were counted on by over this share, they are counted again and all records unified
    recount_frequencies_share: float = 0.2
    rules: list[MatchRule]  # applied in order
    merge: MergePolicy  # how a cluster's attributes become one profile


def load_rules(path: Path) -> UnifyRules:
    rules = load_yaml_model(path, UnifyRules, "unify rules")
    for rule in rules.rules:
        if rule.common is not None and rule.fuzzy is None:
            raise ValueError(f"{path}: rule {rule.name}: common needs a fuzzy rule")
    return rules


def frequency_fields(rules: UnifyRules) -> list[str]:
    """The fields whose value frequencies the rules' `common` tests read."""
    specs = [r.common for r in rules.rules if r.common is not None]
    return list(dict.fromkeys(f for c in specs for f in (c.field, c.per) if f is not None))


# ---------------------------------------------------------------- pure stages


def _fold(text: pd.Series) -> pd.Series:
    """Case- and accent-folded, letters/digits/spaces only: 'José  O'Neil' -> 'jose oneil'.

    Vectorised in Arrow over the distinct values (names repeat a lot): NFKD, drop what
    is not ASCII (the accents), lower case, keep [a-z0-9 ], collapse spaces.
    """
    values = pa.array(text.astype(object), pa.string())
    encoded = values.dictionary_encode()
    names = encoded.dictionary
    names = pc.utf8_normalize(names, "NFKD")
    names = pc.replace_substring_regex(names, r"[^\x00-\x7f]", "")
    names = pc.ascii_lower(names)
    names = pc.replace_substring_regex(names, r"[^a-z0-9 ]", "")
    names = pc.utf8_trim(pc.replace_substring_regex(names, r" +", " "), " ")
    names = pc.if_else(pc.equal(names, ""), pa.scalar(None, pa.string()), names)
    # One Python string per distinct name, shared by its records (a trailing None for
    # the missing ones, indexed by -1): far less memory than one object per record.
    distinct = np.append(names.to_numpy(zero_copy_only=False), None)
    index = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return pd.Series(distinct[index], index=text.index, dtype=object)


def prepare_records(records: pd.DataFrame) -> pd.DataFrame:
    """Add the normalised match fields; `record` is a dense 0..n-1 index."""
    out = records.reset_index(drop=True)  # a new frame: the caller's is not changed
    out["record"] = np.arange(len(out))
    return match_fields(out)


def match_fields(out: pd.DataFrame) -> pd.DataFrame:
    """`out` (a frame of records, changed in place and returned) with the normalised match
    fields `m_<field>` of `MATCH_FIELDS`. Row by row, so any batch of records gives the
    same values (the Spark engine runs it on its workers, batch by batch).

    In Arrow, not pandas' per-value string methods, which take twice as long at scale.
    """
    first, last = _fold(out["first_name"]), _fold(out["last_name"])
    out["m_last_name"] = last
    first, last = _arrow(first), _arrow(last)
    full = pc.binary_join_element_wise(pc.fill_null(first, ""), pc.fill_null(last, ""), " ")
    out["m_full_name"] = _series(pc.utf8_trim_whitespace(full))
    del first, full
    out["m_email"] = _series(pc.utf8_lower(pc.utf8_trim_whitespace(_arrow(out["email"]))))
    out["m_phone"] = _series(pc.utf8_trim_whitespace(_arrow(out["phone"])))
    postal = pc.replace_substring(pc.utf8_upper(_arrow(out["postal_code"])), " ", "")
    out["m_postal_code"] = _series(postal)
    out["m_last_initial"] = _series(pc.utf8_slice_codeunits(last, 0, 1))
    out["m_street"] = _street(out["street"])
    return out


# USPS standard suffix and direction abbreviations (Publication 28): one spelling of each
STREET_WORDS = {
    "street": "st", "avenue": "ave", "road": "rd", "drive": "dr", "lane": "ln",
    "boulevard": "blvd", "court": "ct", "place": "pl", "terrace": "ter", "circle": "cir",
    "highway": "hwy", "parkway": "pkwy", "square": "sq", "apartment": "apt", "suite": "ste",
    "north": "n", "south": "s", "east": "e", "west": "w",
}  # fmt: skip


def _street(text: pd.Series) -> pd.Series:
    """Folded as names are, with the usual words abbreviated one way ('12 Main Street' and
    '12 MAIN ST.' agree), over the distinct values."""
    folded = _fold(text)
    values = pa.array(folded.to_numpy(dtype=object), pa.string()).dictionary_encode()
    words = values.dictionary
    for word, short in STREET_WORDS.items():
        words = pc.replace_substring_regex(words, rf"\b{word}\b", short)
    distinct = np.append(words.to_numpy(zero_copy_only=False), None)
    index = values.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return pd.Series(distinct[index], index=text.index, dtype=object)


def _arrow(text: pd.Series) -> pa.Array:
    return pa.array(text.astype(object), pa.string())


def _series(values: pa.Array) -> pd.Series:
    """Arrow strings as a pandas object column, empty text as None (the match fields)."""
    nulled = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    return pd.Series(nulled.to_numpy(zero_copy_only=False), dtype=object)


def junk_values(records: pd.DataFrame, name: str, max_records: int) -> set[str]:
    """Values of a field shared by more records than max_records (a shared store phone).
    Counted by Arrow, twice as fast as pandas' value_counts on millions of e-mails."""
    counts = pc.value_counts(pa.array(records[f"m_{name}"].to_numpy(), pa.string()))
    many = pc.greater(counts.field("counts"), max_records)
    return set(counts.field("values").filter(many).drop_null().to_pylist())


FREQUENCY_SCHEMA = pa.schema([("field", pa.string()), ("value", pa.int64()), ("count", pa.int64())])


def value_hashes(values: pd.Series) -> pd.Series:
    """A 64-bit hash per value (pandas' fixed-key SipHash), null where missing: the
    frequency state keeps hashes, not names, so it holds no one's personal data. The one
    definition of a value's hash: DuckDB's build and the Spark engine's workers both
    call it (`hash_fields`), so their counts and the kept state agree."""
    present = values.notna().to_numpy()
    hashes = np.zeros(len(values), dtype=np.int64)
    if present.any():
        hashes[present] = pd.util.hash_array(values.to_numpy(dtype=object)[present]).view(np.int64)
    return pd.Series(pd.arrays.IntegerArray(hashes, ~present), index=values.index)


def hash_fields(out: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """`out` (records with their match fields, changed in place and returned) with
    `h_<field>`, the `value_hashes` of `m_<field>`, for each of `fields`: what
    `frequency_sql` counts and `common_sql` looks up. Row by row, as `match_fields`."""
    for name in fields:
        out[f"h_{name}"] = value_hashes(out[f"m_{name}"])
    return out


def frequency_sql(records: str, fields: list[str]) -> str:
    """The value counts (FREQUENCY_SCHEMA: field, value hash, records carrying it) of the
    relation `records` (with `h_<field>`, `hash_fields`) and its number of records (field
    RECORDS_TOTAL), as SQL both engines run: one definition of what is counted."""
    parts = [
        f"SELECT '{RECORDS_TOTAL}' AS field, CAST(0 AS BIGINT) AS value, COUNT(*) AS count "
        f"FROM {records}"
    ]
    parts += [
        f"SELECT '{name}' AS field, h_{name} AS value, COUNT(*) AS count FROM {records} "
        f"WHERE h_{name} IS NOT NULL GROUP BY h_{name}"
        for name in fields
    ]
    return "\nUNION ALL\n".join(parts)


def common_sql(spec: CommonValues, records: str, frequencies: str, key: str) -> str:
    """(`key`, is_common) per row of `records` (with `h_<field>`): whether its value of
    `spec.field` is common among the records of its `spec.per` value (see
    `CommonValues`), by the counts `frequencies` (`frequency_sql`'s): a value they do not
    hold (new since they were counted) counts as rare. SQL both engines run; the
    arithmetic is in doubles in the order numpy would do it, so both decide alike."""
    limit = f"CAST('{float(spec.max_expected)!r}' AS DOUBLE)"

    def counted(alias: str, name: str) -> str:
        return (
            f" LEFT JOIN {frequencies} {alias} ON {alias}.field = '{name}'"
            f" AND {alias}.value = r.h_{name}"
        )

    if spec.per is None:  # the other records that carry the value
        test = f"COALESCE(f.count, 0) - 1 > {limit}"
        joins = counted("f", spec.field)
    else:
        test = f"CAST(COALESCE(f.count, 0) AS DOUBLE) / t.total * COALESCE(p.count, 0) > {limit}"
        joins = (
            counted("f", spec.field)
            + counted("p", spec.per)
            + " CROSS JOIN (SELECT GREATEST(COALESCE(SUM(count), 0), 1) AS total"
            + f" FROM {frequencies} WHERE field = '{RECORDS_TOTAL}') t"
        )
    return f"SELECT r.{key} AS {key}, {test} AS is_common FROM {records} r{joins}"


def common_pass_sql(spec: CommonValues, flag: str, column: str, left: str, right: str) -> str:
    """The SQL condition (both engines) under which a pair of rows `left`, `right` may link
    by a `common` test: neither is on a common value (boolean column `flag`), or one of
    `require_any` (column `column.format(field)`: a value or its hash) is present on both
    and equal."""
    same = [f"{left}.{column.format(f)} = {right}.{column.format(f)}" for f in spec.require_any]
    agree = " OR ".join(same) or "FALSE"
    return f"(NOT ({left}.{flag} OR {right}.{flag}) OR COALESCE({agree}, FALSE))"


def _hashed(records: pd.DataFrame, fields: list[str]) -> pa.Table:
    """Row number `i` and `h_<field>` of `records`, for DuckDB to run the shared SQL on."""
    columns = {f"h_{f}": pa.array(value_hashes(records[f"m_{f}"]), pa.int64()) for f in fields}
    return pa.table({"i": pa.array(np.arange(len(records)), pa.int64()), **columns})


def value_frequencies(records: pd.DataFrame, fields: list[str]) -> pa.Table:
    """(field, value hash, count): how many records carry each value of each field, and
    the number of records (field RECORDS_TOTAL): what `common_flags` reads
    (`frequency_sql`, run by DuckDB)."""
    con = duckdb_connection()
    con.register("records_", _hashed(records, fields))
    counted = con.sql(frequency_sql("records_", fields)).to_arrow_table()
    con.close()
    return counted.cast(FREQUENCY_SCHEMA)


def counted_hashes(records: pd.DataFrame, fields: list[str]) -> pa.Table:
    """(source, source_key, `h_<field>` of each of `fields`) per record: the hashes a record
    adds to `value_frequencies` (the kept `COUNTED`)."""
    keys = {k: pa.array(records[k].to_numpy(), pa.string()) for k in ("source", "source_key")}
    hashes = _hashed(records, fields).drop_columns(["i"])
    return pa.table({**keys, **{n: hashes[n] for n in hashes.column_names}})


def common_flags(records: pd.DataFrame, spec: CommonValues, freq: pa.Table) -> np.ndarray:
    """Per record, whether its value of `spec.field` is common among the records of its
    `spec.per` value (`common_sql`, run by DuckDB over the frequencies `freq`)."""
    fields = [f for f in (spec.field, spec.per) if f is not None]
    con = duckdb_connection()
    con.register("records_", _hashed(records, fields))
    con.register("frequencies_", freq)
    found = con.sql(common_sql(spec, "records_", "frequencies_", "i")).fetchnumpy()
    con.close()
    flags = np.zeros(len(records), dtype=bool)
    flags[found["i"]] = found["is_common"]
    return flags


@dataclass
class RulePairs:
    rule: str
    left: np.ndarray
    right: np.ndarray
    junk: dict[str, int] = field(default_factory=dict)  # field -> junk values excluded
    skipped_blocks: int = 0
    common: np.ndarray | None = None  # rules with `common`: per pair, on a common value


FUZZY_CHUNK_PAIRS = 2_000_000  # candidate pairs generated and scored at once


def _block_runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal values in a sorted array."""
    if not len(block):
        return np.array([], np.int64), np.array([], np.int64)
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    return starts, np.diff(np.r_[starts, len(block)])


def _pairs_in_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j, of all pairs inside each run, run by run and row-major
    within a run (the order of a self-merge on the block, filtered to left < right)."""
    before = np.cumsum(lengths) - lengths  # runs need not be adjacent
    pos = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    ends = np.repeat(starts + lengths, lengths)  # the end of each position's run
    partners = ends - pos - 1
    left = np.repeat(pos, partners)
    offset = np.cumsum(partners) - partners
    right = left + 1 + (np.arange(len(left), dtype=np.int64) - np.repeat(offset, partners))
    return left, right


def _codes(values: pd.Series) -> np.ndarray:
    """Integer codes of a column, -1 where missing (equal codes <=> equal values)."""
    return pd.factorize(values, use_na_sentinel=True)[0].astype(np.int32, copy=False)


def _sorted_words(values: np.ndarray) -> np.ndarray:
    """Each string's words sorted and joined by one space (None stays None), computed
    once per distinct value."""
    codes, distinct = pd.factorize(values)
    words = np.array([" ".join(sorted(v.split())) for v in distinct] + [None], dtype=object)
    return words[codes]  # code -1 (missing) picks the trailing None


@dataclass(frozen=True)
class FuzzyValues:
    """The fuzzy field per record as `fuzzy_matches` scores it."""

    values: np.ndarray
    scorer: object
    lengths: np.ndarray | None  # for `ratio`: the values' lengths (0 when missing)


def fuzzy_values(rule: MatchRule, values: np.ndarray) -> FuzzyValues:
    lengths = None
    scorer = getattr(fuzz, rule.fuzzy.scorer)
    if rule.fuzzy.scorer == "token_sort_ratio":
        # token_sort_ratio is ratio on the words sorted: sort each value once here, not
        # once per pair (7x faster on 2M pairs).
        values, scorer = _sorted_words(values), fuzz.ratio
    if scorer is fuzz.ratio:
        lengths = pc.utf8_length(pa.array(values, pa.string())).fill_null(0).to_numpy()
    return FuzzyValues(values, scorer, lengths)


@dataclass(frozen=True)
class CommonTest:
    """A rule's `common` test per record: its flag, and codes of the `require_any` fields
    (equal values equal codes, -1 missing)."""

    flags: np.ndarray
    require_codes: list[np.ndarray]

    def passes(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether each pair may link, whether it is on a common value)."""
        common = self.flags[left] | self.flags[right]
        agree = np.zeros(len(left), dtype=bool)
        for codes in self.require_codes:
            a, c = codes[left], codes[right]
            agree |= (a >= 0) & (a == c)
        return ~common | agree, common


def fuzzy_matches(
    rule: MatchRule,
    scored: FuzzyValues,
    veto_codes: list[np.ndarray],
    left: np.ndarray,
    right: np.ndarray,
    workers: int = -1,
    common: CommonTest | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (left[k], right[k]) that match under a fuzzy rule: not vetoed
    (per veto field, a code per record: equal values equal codes, -1 missing) and
    scoring at least its threshold.

    The cheap tests first: the veto, then for `ratio` the lengths (ratio, a normalised
    Indel similarity, is at most 200 * min(a, b) / (a + b) for lengths a and b), so that
    only pairs that can match are scored: on a large lake the veto and the lengths leave
    a fraction of a broad rule's candidate pairs, and scoring them was the largest part
    of a unify before.
    """
    if veto_codes:
        veto = np.ones(len(left), dtype=bool)
        for codes in veto_codes:
            a, c = codes[left], codes[right]
            veto &= (a >= 0) & (c >= 0) & (a != c)
        left, right = left[~veto], right[~veto]
    if common is not None:
        may, _ = common.passes(left, right)
        left, right = left[may], right[may]
    if scored.lengths is not None:
        a, c = scored.lengths[left], scored.lengths[right]
        near = 200 * np.minimum(a, c) >= rule.fuzzy.threshold * (a + c)
        left, right = left[near], right[near]
    scores = process.cpdist(
        scored.values[left].tolist(),
        scored.values[right].tolist(),
        scorer=scored.scorer,
        score_cutoff=rule.fuzzy.threshold,
        workers=workers,  # rapidfuzz's threads: all cores (-1), or one per Spark task
    )
    hit = scores >= rule.fuzzy.threshold
    return left[hit], right[hit]


def fuzzy_pair_mask(
    rule: MatchRule, left: np.ndarray, right: np.ndarray, workers: int = -1
) -> np.ndarray:
    """Whether each pair (left[k], right[k]) of fuzzy field values (`m_<field>`, none
    missing) matches under a fuzzy rule, as `match_rule` scores it (the veto is the
    caller's): the pairs of an incremental unify (`_fuzzy_partners`) and of the Spark
    engine's blocks (a pandas UDF) are scored by this one function."""
    m = len(left)
    values = np.concatenate([np.asarray(left, dtype=object), np.asarray(right, dtype=object)])
    at = np.arange(m)
    _, hit = fuzzy_matches(rule, fuzzy_values(rule, values), [], at, m + at, workers)
    mask = np.zeros(m, dtype=bool)
    mask[hit - m] = True
    return mask


def _stars(block: np.ndarray, ids: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pairs linking the records `ids` of each block (`block` sorted): each source's
    records to its first one, then each source's first to the block's first. The
    report counts these pairs within and across sources: with a single star per block
    the counts would depend on the records' order (on which record is first)."""
    if not len(ids):
        return ids, ids
    codes = pd.factorize(source[ids])[0]
    order = np.lexsort((codes, block))
    block, ids, codes = block[order], ids[order], codes[order]
    at = np.arange(len(ids))
    new_block = np.r_[True, block[1:] != block[:-1]]
    new_group = new_block | np.r_[True, codes[1:] != codes[:-1]]
    group_head = ids[np.maximum.accumulate(np.where(new_group, at, 0))]
    block_head = ids[np.maximum.accumulate(np.where(new_block, at, 0))]
    across = new_group & ~new_block
    return (
        np.concatenate([group_head[~new_group], block_head[across]]),
        np.concatenate([ids[~new_group], ids[across]]),
    )


def match_rule(
    records: pd.DataFrame,
    rule: MatchRule,
    junk_max: int,
    max_block: int,
    junk_fields: tuple[str, ...] = ("email", "phone"),
    chunk_pairs: int = FUZZY_CHUNK_PAIRS,
    junk: dict[str, set[str]] | None = None,
    block_sizes: np.ndarray | None = None,
    frequencies: pa.Table | None = None,
) -> RulePairs:
    """Candidate pairs of one rule, with blocking on its exact fields.

    Exact-only rules link each block's records by stars (`_stars`: the same connected
    component as all pairs, at linear cost). Fuzzy rules compare all
    pairs inside blocks of at most `max_block` records; the pairs are generated and
    scored a group of blocks at a time (about `chunk_pairs` at once, a block is never
    split) and only the matches are kept, so memory stays bounded whatever the size.
    On a subset of the records (see `unify_changes`), `junk` (the junk values per field)
    and `block_sizes` (per record, its block's size) give what all the records decide.
    A rule with `common` reads the value counts `frequencies` (`value_frequencies`; of
    these records when not given).
    """
    keys = [f"m_{f}" for f in rule.exact]
    usable = records[[*keys, "record"]].dropna(subset=keys)
    guarded = [f for f in rule.exact if f in junk_fields]
    junk = {f: junk_values(records, f, junk_max) if junk is None else junk[f] for f in guarded}
    for f, values in junk.items():
        if values:
            usable = usable[~usable[f"m_{f}"].isin(values)]
    block = usable.groupby(keys, sort=False).ngroup().to_numpy()
    ids = usable["record"].to_numpy()
    del usable
    order = np.argsort(block, kind="stable")
    block, ids = block[order], ids[order]
    del order
    sizes = np.bincount(block) if len(block) else np.array([], dtype=int)
    result = RulePairs(
        rule.name, np.array([], int), np.array([], int), {f: len(v) for f, v in junk.items() if v}
    )
    if rule.fuzzy is None:
        result.left, result.right = _stars(block, ids, records["source"].to_numpy())
        return result
    whole = sizes[block] if block_sizes is None else block_sizes[ids]
    result.skipped_blocks = len(np.unique(block[whole > max_block]))
    values = records[f"m_{rule.fuzzy.field}"].to_numpy(dtype=object)
    # Records of blocks with 2..max_block records (counted before the fuzzy field's
    # missing values are dropped: those pair with nobody but count in the block size).
    keep = (sizes[block] > 1) & (whole <= max_block)
    block, ids = block[keep], ids[keep]
    del whole
    keep = pd.notna(values[ids])
    block, ids = block[keep], ids[keep].astype(np.int64, copy=False)
    del keep
    starts, lengths = _block_runs(block)
    multi = lengths > 1
    starts, lengths = starts[multi], lengths[multi]
    veto_codes = [_codes(records[f"m_{f}"]) for f in rule.veto_if_all_differ]
    common = None
    if rule.common is not None:
        if frequencies is None:
            fields = [f for f in (rule.common.field, rule.common.per) if f is not None]
            frequencies = value_frequencies(records, fields)
        common = CommonTest(
            common_flags(records, rule.common, frequencies),
            [_codes(records[f"m_{f}"]) for f in rule.common.require_any],
        )
    scored = fuzzy_values(rule, values)
    cum = np.cumsum(lengths * (lengths - 1) // 2)
    lefts, rights = [], []
    b = 0
    while b < len(starts):
        done = cum[b - 1] if b else 0
        e = max(int(np.searchsorted(cum, done + chunk_pairs, side="right")), b + 1)
        lpos, rpos = _pairs_in_runs(starts[b:e], lengths[b:e])
        left, right = ids[lpos], ids[rpos]
        del lpos, rpos
        left, right = fuzzy_matches(rule, scored, veto_codes, left, right, common=common)
        lefts.append(left)
        rights.append(right)
        b = e
    if lefts:
        result.left, result.right = np.concatenate(lefts), np.concatenate(rights)
    if common is not None:
        result.common = common.passes(result.left, result.right)[1]
    return result


# ---------------------------------------------------------------- what a build keeps

# Why unify again only what changed: a whole unify (read, prepare, match, cluster, ids,
# merge, write every record) was half of an incremental build for a 1% increment.
# Whether two records are linked depends on little beyond the two: their blocks (one per
# rule), the junk status of their identifiers and, for fuzzy rules, their block's size.
# So `state/unify/records` keeps per record a hash of the record as read, of its block
# key under each rule and of its junk and veto fields, and its fuzzy fields' text; the
# next build compares the records with it and unifies again only the clusters the
# changes can reach (`unify_changes`).
STATE = ("state", "unify", "records")
# The value frequencies the rules' `common` tests read (`value_frequencies`): counted by a
# build without a state (first build, rules changed) and kept, so that every later build,
# incremental or whole, decides with the same frequencies (and they stay equal).
FREQUENCIES = ("state", "unify", "frequencies")
# The records the kept frequencies were counted from, each with the hashes it added
# (`counted_hashes`): how an erasure tells the values only the erased records carried
# (c360ml.medallion.erasure), as they were counted, whatever the records held since. Written with the
# frequencies, both commits recording one COUNT_KEY; its rows of an erased record are
# deleted with the record.
COUNTED = ("state", "unify", "counted")
COUNT_KEY = "c360ml.frequency_count"  # the count a FREQUENCIES and a COUNTED commit are of
STATE_KEY = "c360ml.unify_state"  # the rules (and state format) the state was made with
# The Spark engine's state holds the records' keys only (its hashes are not DuckDB's):
# current for a skip, never compared with by `unify_changes` (see `recorded_state`).
KEYS_ONLY = ":keys"
STATE_FORMAT = 6
REUNIFY_MAX = 0.5  # past this share of the records, unifying all of them is cheaper


def state_digest(rules: UnifyRules) -> str:
    return hashlib.sha256(f"{STATE_FORMAT}|{rules.model_dump_json()}".encode()).hexdigest()


def _state_fields(rules: UnifyRules) -> tuple[list[str], list[str]]:
    """The fields the state keeps a hash of (junk, veto and `common.require_any` fields),
    and the text of (fuzzy fields)."""
    vetoed = [f for r in rules.rules for f in r.veto_if_all_differ]
    vetoed += [f for r in rules.rules if r.common is not None for f in r.common.require_any]
    fuzzy = [r.fuzzy.field for r in rules.rules if r.fuzzy is not None]
    return list(dict.fromkeys([*rules.junk_fields, *vetoed])), list(dict.fromkeys(fuzzy))


def record_state(
    records: pd.DataFrame, rules: UnifyRules, frequencies: pa.Table | None = None
) -> pd.DataFrame:
    """What the next build compares a record with: `record_hash` (the record as read),
    `block_<rule>` (its block key under each rule), `hash_<field>` (its value of each
    junk or veto field), `text_<field>` (of each fuzzy field) and `is_common_<rule>` (of
    rules with `common`: its value is common, by `frequencies`) with `h_<field>` (the
    `value_hashes` those tests read)."""
    hashed, texts = _state_fields(rules)
    keys = {f"block_{r.name}": [f"m_{f}" for f in r.exact] for r in rules.rules}
    keys |= {f"hash_{name}": [f"m_{name}"] for name in hashed}
    used = sorted({c for cols in keys.values() for c in cols})
    # Hashed by DuckDB, shifted into int64 (Delta has no unsigned type) so never negative,
    # null when a field is missing; several times faster than pandas' hash_pandas_object.
    con = duckdb_connection()
    columns = {c: pa.array(records[c].to_numpy(), pa.string()) for c in used}
    con.register("fields_", pa.table(columns | {"i": np.arange(len(records))}))
    del columns
    hashes = con.sql(
        "SELECT "
        + ", ".join(
            f"CASE WHEN {' OR '.join(f'{c} IS NULL' for c in cols)} THEN NULL "
            f"ELSE CAST(hash({', '.join(cols)}) >> 1 AS BIGINT) END AS {name}"
            for name, cols in keys.items()
        )
        + " FROM fields_ ORDER BY i"
    ).to_arrow_table()
    con.close()
    out = records[["source", "source_key", "record_hash"]].reset_index(drop=True)
    for name in keys:
        out[name] = hashes[name].to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    for name in texts:
        out[f"text_{name}"] = records[f"m_{name}"].to_numpy()
    for rule in (r for r in rules.rules if r.common is not None):
        out[f"is_common_{rule.name}"] = common_flags(records, rule.common, frequencies)
    for name in frequency_fields(rules):  # to tell whose flag changed frequencies flip
        out[f"h_{name}"] = value_hashes(records[f"m_{name}"]).array
    return out


def pair_counts(records: pd.DataFrame, pairs: list[RulePairs]) -> dict[str, np.ndarray]:
    """Per record, `within_<rule>` / `across_<rule>`: the rule's pairs the record is the
    right end of, so that the report's counts are sums over records."""
    source = records["source"].to_numpy()
    out = {}
    for p in pairs:
        same = source[p.left] == source[p.right]
        scopes = [("within", same), ("across", ~same)]
        if p.common is not None:  # a rule with `common`: its links on a common value
            scopes.append(("common", p.common))
        for scope, mask in scopes:
            out[f"{scope}_{p.rule}"] = np.bincount(p.right[mask], minlength=len(records))
    return {k: v.astype(np.int32) for k, v in out.items()}


def cluster(n: int, pairs: list[RulePairs]) -> np.ndarray:
    """Connected components of all matched pairs: a cluster label per record."""
    left = np.concatenate([p.left for p in pairs] + [np.array([], int)])
    right = np.concatenate([p.right for p in pairs] + [np.array([], int)])
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def new_id(source: str, key: str, salt: int = 0) -> str:
    """An opaque id founded by one record; deterministic so re-runs agree."""
    text = f"{source}:{key}" if salt == 0 else f"{source}:{key}:{salt}"
    return "C" + hashlib.md5(text.encode()).hexdigest()[:16]


def assign_ids(
    records: pd.DataFrame,
    labels: np.ndarray,
    previous: pd.DataFrame | pa.Table | None,
    today: pd.Timestamp,
    taken: Callable[[pa.Array], set[str]] | None = None,
) -> tuple[pd.Series, pd.DataFrame]:
    """A stable customer_id per cluster, and the redirects of ids retired by merges.

    An old id belongs to the cluster holding its oldest record (so on a split that part
    keeps it); a cluster owning several old ids keeps the oldest and retires the rest.
    Records are ordered by (created_ts, missing last; source; source_key) throughout.
    `taken`: which of some ids are in use beyond `previous` (when only some clusters are
    unified again), so that a new id is none of them.
    The ranking runs in DuckDB: pandas' sorts and joins of millions of key strings were
    the slowest part of a unify.
    """
    con = duckdb_connection()
    frame = records[["source", "source_key", "created_ts"]].assign(cluster=labels)
    con.register("rec", pa.Table.from_pandas(frame, preserve_index=False))
    if previous is None:
        previous = pd.DataFrame({c: pd.Series(dtype=str) for c in columns(CustomerSourceMap)})
    if isinstance(previous, pd.DataFrame):
        previous = pa.Table.from_pandas(previous[columns(CustomerSourceMap)])
    con.register("prev", previous.select(columns(CustomerSourceMap)))
    con.execute(
        """CREATE TEMP TABLE r AS
           SELECT rec.*, p.customer_id AS old_id,
                  ROW_NUMBER() OVER (ORDER BY created_ts ASC NULLS LAST, rec.source,
                                     rec.source_key) AS age_rank
           FROM rec LEFT JOIN prev p USING (source, source_key)"""
    )
    # Each old id's owner: the cluster of its oldest record; each cluster keeps the old id
    # whose owning record is oldest (ties by id).
    con.execute(
        """CREATE TEMP TABLE owner AS
           SELECT old_id, arg_min(cluster, age_rank) AS cluster, MIN(age_rank) AS age_rank
           FROM r WHERE old_id IS NOT NULL GROUP BY old_id;
           CREATE TEMP TABLE chosen AS
           SELECT cluster, arg_min(old_id, (age_rank, old_id)) AS id FROM owner GROUP BY cluster"""
    )
    chosen = con.sql("SELECT * FROM chosen").fetchnumpy()
    retired = con.sql(
        "SELECT old_id, cluster FROM owner ANTI JOIN chosen ON id = old_id ORDER BY age_rank"
    ).fetchnumpy()
    founders = con.sql(
        """SELECT cluster, arg_min(source, age_rank) AS source,
                  arg_min(source_key, age_rank) AS source_key, MIN(age_rank) AS age_rank
           FROM r ANTI JOIN chosen USING (cluster) GROUP BY cluster ORDER BY age_rank"""
    ).fetchnumpy()
    used = set(con.sql("SELECT old_id FROM owner").fetchnumpy()["old_id"].tolist())
    con.close()
    founded = list(
        zip(founders["cluster"], founders["source"], founders["source_key"], strict=True)
    )
    if taken is not None and founded:
        first = pa.array([new_id(src, key) for _, src, key in founded])
        used |= taken(first)
    cluster_id = np.empty(int(labels.max()) + 1 if len(labels) else 0, dtype=object)
    cluster_id[chosen["cluster"]] = chosen["id"]
    for cl, src, key in founded:
        salt, cid = 0, new_id(src, key)
        while cid in used:  # a collision with an existing or already given id: rare
            salt += 1
            cid = new_id(src, key, salt)
        cluster_id[cl] = cid
        used.add(cid)
    redirects = pd.DataFrame(
        {
            "retired_id": retired["old_id"].astype(object),
            "surviving_id": cluster_id[retired["cluster"]],
            "redirected_at": today,
            "reason": "merge",
        }
    )
    return pd.Series(cluster_id[labels], index=records.index), redirects


def _ties_by_key(order: np.ndarray, by: tuple[np.ndarray, ...], keys: np.ndarray) -> np.ndarray:
    """`order` (a sort of the records by the arrays `by`) with each run of records equal
    in all of `by` put in the order of their `keys` (source_key).

    Ties (one customer's records of one source modified at the same instant) are broken
    by source_key, not by the records' order, which no engine promises: the profile is
    the same whichever engine reads the records, in whatever order, in one batch or in
    several. Only the tied records' keys are sorted (few: a sort of every key would cost
    more than the merge)."""
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for values in by:
        ordered = values[order]
        same &= ordered[1:] == ordered[:-1]
    if not same.any():
        return order
    at = np.flatnonzero(np.r_[same, False] | np.r_[False, same])  # positions in a tie
    run = np.cumsum(np.r_[True, ~same])[at]  # non-decreasing: a run keeps its positions
    codes = pd.factorize(keys[order[at]], sort=True)[0]
    out = order.copy()
    out[at] = order[at][np.lexsort((codes, run))]
    return out


def merge_profiles(records: pd.DataFrame, ids: pd.Series, policy: MergePolicy) -> pd.DataFrame:
    """One profile per customer_id by the declared per-attribute policy.

    Each attribute is the first non-null value in the policy's order: most recently
    modified first (records without a modified time last), or by source priority, then
    most recent (then by source_key). Two integer sorts of all records (numpy lexsort over the id codes and
    the keys), then per attribute the first present value of each customer: faster than
    pandas' sorts and group-bys per attribute.
    """
    attributes = list(dict.fromkeys([*policy.most_recent, *policy.by_source_priority]))
    codes, uniques = pd.factorize(ids, sort=False)
    n = len(uniques)
    priority = {s: i for i, s in enumerate(policy.source_priority)}
    ordered = sorted(records["source"].unique(), key=lambda x: (priority.get(x, len(priority)), x))
    rank = records["source"].map({src: i for i, src in enumerate(ordered)}).to_numpy(np.int64)
    modified = pd.to_datetime(records["modified_ts"], utc=True)
    newest = np.where(modified.isna(), np.iinfo(np.int64).max, -modified.to_numpy(np.int64))
    keys = records["source_key"].to_numpy(dtype=object)
    orders = {
        "recent": _ties_by_key(np.lexsort((rank, newest, codes)), (codes, newest, rank), keys),
        "priority": _ties_by_key(np.lexsort((newest, rank, codes)), (codes, newest, rank), keys),
    }
    merged = pd.DataFrame(index=pd.RangeIndex(n))
    for attr in attributes:
        order = orders["recent" if attr in policy.most_recent else "priority"]
        values = records[attr].to_numpy(dtype=object)
        chosen = order[pd.notna(values)[order]]  # records with a value, in the order
        groups = codes[chosen]
        first = np.flatnonzero(np.diff(groups, prepend=-1))  # each customer's first
        column = np.full(n, None, dtype=object)
        column[groups[first]] = values[chosen[first]]
        merged[attr] = column
    merged["created_ts"] = records["created_ts"].groupby(codes).min().reindex(merged.index)
    merged["source_count"] = np.bincount(codes, minlength=n)
    # The distinct sources of each customer in priority order, one string per combination.
    combo = np.zeros(n, dtype=np.int64)
    for i in range(len(ordered)):
        has = np.zeros(n, dtype=bool)
        has[codes[rank == i]] = True
        combo |= has.astype(np.int64) << i
    names = {c: ",".join(s for i, s in enumerate(ordered) if c >> i & 1) for c in np.unique(combo)}
    merged["sources"] = pd.Series(combo).map(names)
    merged["full_name"] = (
        (merged["first_name"].fillna("") + " " + merged["last_name"].fillna(""))
        .str.strip()
        .replace("", None)
    )
    merged["customer_id"] = uniques
    return merged[columns(CustomerProfile)]


def pair_quality(source_map: pd.DataFrame, truth_keys: pd.DataFrame) -> dict[str, float]:
    """Pairwise precision and recall of clusters against a truth (source, source_key ->
    person_id), counted by combinatorics over cluster/person intersections."""
    joined = source_map.merge(truth_keys, on=["source", "source_key"], how="inner")

    def pairs(sizes: pd.Series) -> int:
        n = sizes.to_numpy(dtype=np.int64)
        return int((n * (n - 1) // 2).sum())

    predicted = pairs(joined.groupby("customer_id").size())
    actual = pairs(joined.groupby("person_id").size())
    correct = pairs(joined.groupby(["customer_id", "person_id"]).size())
    return {
        "records": len(joined),
        "predicted_pairs": predicted,
        "true_pairs": actual,
        "precision": correct / predicted if predicted else 1.0,
        "recall": correct / actual if actual else 1.0,
    }


# ---------------------------------------------------------------- a whole unify, or the changes


@dataclass
class RuleTotals:
    """A rule's lines in the report."""

    rule: str
    within: int  # pairs of two records of one source
    across: int
    junk: dict[str, int]  # field -> junk values not matched on
    skipped_blocks: int  # fuzzy blocks over max_block_size
    common: int | None = None  # rules with `common`: pairs on a common value


def report_frame(totals: list[RuleTotals], cluster_sizes: np.ndarray) -> pd.DataFrame:
    """Pairs per rule and scope, junk values excluded, and the cluster-size histogram
    (`cluster_sizes[k]`: the clusters of k records)."""
    rows = []
    for t in totals:
        note = ", ".join(f"{k}: {v} junk values" for k, v in t.junk.items() if v)
        if t.skipped_blocks:
            note += f"; {t.skipped_blocks} oversized blocks"
        for scope, count in (("within source", t.within), ("across sources", t.across)):
            rows.append(
                {"section": "rule", "name": t.rule, "scope": scope, "count": count, "note": note}
            )
        if t.common is not None:  # the rule's links by the frequency band of their value
            rare = t.within + t.across - t.common
            for band, count in (("common value", t.common), ("rare value", rare)):
                rows.append(
                    {
                        "section": "rule by value frequency",
                        "name": t.rule,
                        "scope": band,
                        "count": count,
                        "note": "",
                    }
                )
    for size, n in enumerate(cluster_sizes):
        if n and size:
            rows.append(
                {
                    "section": "cluster size",
                    "name": str(size),
                    "scope": "",
                    "count": int(n),
                    "note": "",
                }
            )
    return pd.DataFrame(rows)


@dataclass
class Unified:
    """What a unify writes: the rows of the records it unified, and the report."""

    source_map: pd.DataFrame
    profiles: pd.DataFrame
    redirects: pd.DataFrame
    state: pd.DataFrame
    report: pd.DataFrame
    frequencies: pa.Table | None = None  # the value counts the `common` tests read
    counted: pa.Table | None = None  # counted by this unify: each record's hashes (COUNTED)
    # Only some clusters unified again: the previous ids whose map and profile rows these
    # replace, and the (source, source_key) whose state rows. None: all records unified.
    retired: pa.Table | None = None
    keys: pa.Table | None = None


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(split_blocks=True)  # no consolidation copy


def _pairs(records: pd.DataFrame, rules: UnifyRules, **given) -> list[RulePairs]:
    return [
        match_rule(
            records,
            rule,
            rules.junk_max_records,
            rules.max_block_size,
            tuple(rules.junk_fields),
            **{k: v.get(rule.name) if k == "block_sizes" else v for k, v in given.items()},
        )
        for rule in rules.rules
    ]


def unify_all(
    table: pa.Table,
    rules: UnifyRules,
    previous: pa.Table | None,
    today: pd.Timestamp,
    frequencies: pa.Table | None = None,
) -> Unified:
    """Match, cluster, give ids and merge every record (`read_records`); the `common`
    tests read `frequencies` (the kept ones), counted from these records when None."""
    records = prepare_records(_frame(table))
    counted = None
    if frequencies is None and frequency_fields(rules):
        frequencies = value_frequencies(records, frequency_fields(rules))
        counted = counted_hashes(records, frequency_fields(rules))
    pairs = _pairs(records, rules, frequencies=frequencies)
    labels = cluster(len(records), pairs)
    ids, redirects = assign_ids(records, labels, previous, today)
    state = record_state(records, rules, frequencies).assign(**pair_counts(records, pairs))
    totals = [
        RuleTotals(
            p.rule,
            int(state[f"within_{p.rule}"].sum()),
            int(state[f"across_{p.rule}"].sum()),
            p.junk,
            p.skipped_blocks,
            int(state[f"common_{p.rule}"].sum()) if p.common is not None else None,
        )
        for p in pairs
    ]
    return Unified(
        source_map=records[["source", "source_key"]].assign(customer_id=ids.to_numpy()),
        profiles=merge_profiles(records, ids, rules.merge),
        redirects=redirects,
        state=state,
        report=report_frame(totals, np.bincount(np.bincount(labels))),
        frequencies=frequencies,
        counted=counted,
    )


def _fuzzy_partners(con: duckdb.DuckDBPyConnection, rule: MatchRule, rules: UnifyRules) -> pa.Table:
    """(source, source_key) of the records a new or changed record (`fresh_`) matches
    under a fuzzy rule now, among the records of its block (`cur`): scored as
    `match_rule` scores, in blocks within the size limit, without junk values. The veto
    is tested in the query (the hashes are equal iff the values are): at 1M customers it
    leaves a seventh of the candidate pairs to score."""
    block, text = f"block_{rule.name}", f"text_{rule.fuzzy.field}"
    guarded = [f for f in rule.exact if f in rules.junk_fields]
    differ = [f"f.hash_{v} <> c.hash_{v}" for v in rule.veto_if_all_differ]  # null: not
    common = ""
    if rule.common is not None:  # on a common value, one of require_any must agree
        flag = f"is_common_{rule.name}"
        common = f" AND {common_pass_sql(rule.common, flag, 'hash_{}', 'f', 'c')}"
    candidates = con.sql(
        f"""SELECT c.source, c.source_key, f.{text} AS l, c.{text} AS r
            FROM fresh_ f JOIN cur c USING ({block})
            WHERE (c.source <> f.source OR c.source_key <> f.source_key)
              AND f.{text} IS NOT NULL AND c.{text} IS NOT NULL
              AND {block} IN (SELECT {block} FROM cur GROUP BY 1
                              HAVING COUNT(*) <= {rules.max_block_size})
              {f" AND NOT COALESCE({' AND '.join(differ)}, FALSE)" if differ else ""}{common}
              {"".join(f" AND f.hash_{g} NOT IN (SELECT v FROM junk_is_{g})" for g in guarded)}"""
    ).to_arrow_table()
    hit = fuzzy_pair_mask(
        rule, *(candidates[side].to_numpy(zero_copy_only=False) for side in ("l", "r"))
    )
    return candidates.select(["source", "source_key"]).filter(pa.array(hit))


def unify_changes(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    rules: UnifyRules,
    today: pd.Timestamp,
    frequencies: pa.Table | None = None,
) -> Unified | None:
    """Unify again only the clusters that the changes since the last build can reach;
    None when they hold more than REUNIFY_MAX of the records (`unify_all` is cheaper).

    `con` holds the last build's state as `before_` (`record_state`) and its source map
    as `map_`. Seeds: the records new, changed or gone (by `record_hash`); those whose
    junk field value became junk or stopped being junk; those a new or changed record is
    linked to now (its block under an exact rule, its matches under a fuzzy one:
    `_fuzzy_partners`); and those of a fuzzy block whose size crossed the limit. Then
    every record of a seed's previous cluster. Why that is exact: a link between two
    unchanged records depends on nothing else that changed (junk status and block size
    are seeds), so it was there before and joined them in one previous cluster. A
    previous cluster without seeds keeps its records and links, and no link leads out
    of it: one to a changed record would have made its end a seed. The chosen records
    are matched as a whole unify matches them, given the junk values and fuzzy block
    sizes over all records, and keep their ids by `assign_ids`' rules. The `common` tests
    read the kept `frequencies`; a record whose flag they decide otherwise than the state
    recorded counts as changed (`_flipped`).
    """
    changed, junk_now = _seeds(con, table, rules, frequencies)
    redo = np.sort(con.sql("SELECT i FROM redo").fetchnumpy()["i"])
    log.info("unify: %d records new or changed, %d unified again", changed, len(redo))
    if len(redo) > REUNIFY_MAX * len(table):
        return None
    records = prepare_records(_frame(table.take(redo)))
    state = record_state(records, rules, frequencies)
    junk = {
        name: set(records[f"m_{name}"][state[f"hash_{name}"].isin(values)])
        for name, values in junk_now.items()
    }
    pairs = _pairs(
        records,
        rules,
        junk=junk,
        block_sizes=_block_sizes(con, rules, state),
        frequencies=frequencies,
    )
    labels = cluster(len(records), pairs)
    previous = con.sql("SELECT * FROM map_ SEMI JOIN retired USING (customer_id)").to_arrow_table()

    def taken(wanted: pa.Array) -> set[str]:
        con.register("wanted_", pa.table({"customer_id": wanted}))
        found = con.sql("SELECT customer_id FROM map_ SEMI JOIN wanted_ USING (customer_id)")
        return set(found.fetchnumpy()["customer_id"].tolist())

    ids, redirects = assign_ids(records, labels, previous, today, taken=taken)
    state = state.assign(**pair_counts(records, pairs))
    keys = "SELECT source, source_key FROM redo UNION SELECT source, source_key FROM gone"
    return Unified(
        source_map=records[["source", "source_key"]].assign(customer_id=ids.to_numpy()),
        profiles=merge_profiles(records, ids, rules.merge),
        redirects=redirects,
        state=state,
        report=_changed_report(con, rules, state, junk_now, labels, keys),
        frequencies=frequencies,
        retired=con.sql("SELECT customer_id FROM retired").to_arrow_table(),
        keys=con.sql(keys).to_arrow_table(),
    )


def _seeds(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    rules: UnifyRules,
    frequencies: pa.Table | None,
) -> tuple[int, dict[str, np.ndarray]]:
    """`unify_changes`' temporary tables: `gone` (state rows of records changed or
    gone), `cur` (the state now), `seeds`, `retired` (their previous ids) and `redo`
    (the records to unify again, by row of `table`). Returns the number of records new
    or changed, and the junk values (hashes) per junk field now."""
    con.register(
        "now_",
        table.select(["source", "source_key", "record_hash"]).append_column(
            "i", pa.array(np.arange(len(table)))
        ),
    )
    changed = [
        """SELECT n.i, source, source_key FROM now_ n LEFT JOIN before_ b
           USING (source, source_key) WHERE b.record_hash IS DISTINCT FROM n.record_hash"""
    ]
    changed += _flipped(con, rules, frequencies)
    con.execute(f"CREATE TEMP TABLE changed_ AS {' UNION '.join(changed)}")
    changed = np.sort(con.sql("SELECT i FROM changed_").fetchnumpy()["i"])
    fresh = record_state(prepare_records(_frame(table.take(changed))), rules, frequencies)
    con.register("fresh_", pa.Table.from_pandas(fresh, preserve_index=False))
    fields, texts = _state_fields(rules)
    kept = ", ".join(
        [
            *(f"block_{r.name}" for r in rules.rules),
            *(f"hash_{f}" for f in fields),
            *(f"text_{f}" for f in texts),
            *(f"is_common_{r.name}" for r in rules.rules if r.common is not None),
        ]
    )
    con.execute(
        f"""CREATE TEMP TABLE gone AS
              SELECT * FROM before_ ANTI JOIN (SELECT source, source_key FROM now_
                ANTI JOIN changed_ USING (source, source_key)) u USING (source, source_key);
            CREATE TEMP TABLE cur AS
              SELECT source, source_key, {kept} FROM before_ ANTI JOIN gone USING (source, source_key)
              UNION ALL SELECT source, source_key, {kept} FROM fresh_"""
    )
    seeds = ["SELECT source, source_key FROM gone", "SELECT source, source_key FROM fresh_"]
    junk_now = {}
    for name in rules.junk_fields:
        column, most = f"hash_{name}", rules.junk_max_records
        for when, where in (("was", "before_"), ("is", "cur")):
            con.execute(
                f"""CREATE TEMP TABLE junk_{when}_{name} AS SELECT {column} AS v FROM {where}
                    WHERE {column} IS NOT NULL GROUP BY 1 HAVING COUNT(*) > {most}"""
            )
        junk_now[name] = con.sql(f"SELECT v FROM junk_is_{name}").fetchnumpy()["v"]
        seeds.append(
            f"""SELECT source, source_key FROM cur WHERE {column} IN (SELECT v FROM
                (SELECT v FROM junk_was_{name} UNION ALL SELECT v FROM junk_is_{name})
                GROUP BY v HAVING COUNT(*) = 1)"""
        )
    for rule in rules.rules:
        block = f"block_{rule.name}"
        if rule.fuzzy is None:  # the block is a clique: all its records are partners
            seeds.append(
                f"SELECT source, source_key FROM cur WHERE {block} IN (SELECT {block} FROM fresh_)"
            )
            continue
        con.register(f"partners_{rule.name}", _fuzzy_partners(con, rule, rules))
        most = rules.max_block_size
        seeds += [
            f"SELECT source, source_key FROM partners_{rule.name}",
            # blocks whose size crossed the limit (only blocks records entered or left
            # change size): all their pairs appear or go
            f"""SELECT * FROM (
                WITH moved AS (SELECT {block} FROM gone UNION SELECT {block} FROM fresh_)
                SELECT source, source_key FROM cur WHERE {block} IN (
                  SELECT {block} FROM
                    (SELECT {block}, COUNT(*) > {most} AS over FROM before_
                     SEMI JOIN moved USING ({block}) GROUP BY 1) w
                    FULL JOIN (SELECT {block}, COUNT(*) > {most} AS over FROM cur
                     SEMI JOIN moved USING ({block}) GROUP BY 1) c USING ({block})
                  WHERE COALESCE(w.over, false) <> COALESCE(c.over, false)))""",
        ]
    con.execute(
        f"""CREATE TEMP TABLE seeds AS {" UNION ".join(seeds)};
            CREATE TEMP TABLE retired AS SELECT DISTINCT customer_id FROM map_
              SEMI JOIN seeds USING (source, source_key);
            CREATE TEMP TABLE redo AS SELECT i, source, source_key FROM now_ SEMI JOIN (
              SELECT source, source_key FROM seeds UNION
              SELECT source, source_key FROM map_ SEMI JOIN retired USING (customer_id)
            ) k USING (source, source_key)"""
    )
    return len(changed), junk_now


def _flipped(
    con: duckdb.DuckDBPyConnection, rules: UnifyRules, frequencies: pa.Table | None
) -> list[str]:
    """SQL of the records of `now_` (i, source, source_key) unchanged since the state whose
    `common` flag the kept `frequencies` decide otherwise than the state recorded. Their
    links may change as a changed record's do, so they count as changed, and only the
    clusters a flip can reach are unified again. The lake's own writers never flip one
    (an erasure drops only values no record left carries; a recount unifies every record):
    this keeps an incremental unify equal to a whole one whatever the kept counts."""
    specs = [r for r in rules.rules if r.common is not None]
    if not specs or frequencies is None:
        return []
    con.register("freq_", frequencies)
    kept = ", ".join(
        [*(f"h_{f}" for f in frequency_fields(rules)), *(f"is_common_{r.name}" for r in specs)]
    )
    con.execute(
        f"""CREATE TEMP TABLE flags_ AS SELECT row_number() OVER () AS k_, source, source_key,
              record_hash, {kept} FROM before_"""
    )
    joins = "".join(
        f" JOIN ({common_sql(r.common, 'flags_', 'freq_', 'k_')}) c{j} USING (k_)"
        for j, r in enumerate(specs)
    )
    differs = " OR ".join(
        f"c{j}.is_common IS DISTINCT FROM b.is_common_{r.name}" for j, r in enumerate(specs)
    )
    return [
        f"""SELECT n.i, source, source_key FROM now_ n JOIN flags_ b USING (source, source_key)
            {joins} WHERE n.record_hash = b.record_hash AND ({differs})"""
    ]


def _block_sizes(
    con: duckdb.DuckDBPyConnection, rules: UnifyRules, state: pd.DataFrame
) -> dict[str, np.ndarray]:
    """Per fuzzy rule, the size over all records (`cur`) of each record's block."""
    sizes = {}
    for rule in (r for r in rules.rules if r.fuzzy is not None):
        block = f"block_{rule.name}"
        con.register("subset_", pa.table({block: pa.array(state[block])}))
        counts = con.sql(
            f"""SELECT {block} AS b, COUNT(*) AS n FROM cur SEMI JOIN subset_ USING ({block})
                GROUP BY 1"""
        ).df()
        whole = state[block].map(dict(zip(counts["b"], counts["n"], strict=True)))
        sizes[rule.name] = whole.fillna(0).to_numpy(np.int64)
    return sizes


def _changed_report(
    con: duckdb.DuckDBPyConnection,
    rules: UnifyRules,
    state: pd.DataFrame,
    junk_now: dict[str, np.ndarray],
    labels: np.ndarray,
    keys: str,
) -> pd.DataFrame:
    """The report over all records: the previous build's pair counts of the records not
    unified again (`keys`: those unified again or gone) plus the new ones (`state`);
    junk values and oversized blocks over `cur`; the clusters not unified again and the
    new ones (`labels`)."""
    scopes = [f"{s}_{r.name}" for r in rules.rules for s in ("within", "across")]
    scopes += [f"common_{r.name}" for r in rules.rules if r.common is not None]
    kept = con.sql(
        f"SELECT {', '.join(f'SUM({c})' for c in scopes)} FROM before_ ANTI JOIN ({keys}) k "
        "USING (source, source_key)"
    ).fetchall()[0]
    total = {c: int(k or 0) + int(state[c].sum()) for c, k in zip(scopes, kept, strict=True)}
    totals = []
    for rule in rules.rules:
        guarded = [f for f in rule.exact if f in rules.junk_fields]
        skipped = 0
        if rule.fuzzy is not None:
            block = f"block_{rule.name}"
            usable = "".join(f" AND hash_{f} NOT IN (SELECT v FROM junk_is_{f})" for f in guarded)
            skipped = con.sql(
                f"""SELECT COUNT(*) FROM (SELECT {block} FROM cur WHERE {block} IS NOT NULL
                    {usable} GROUP BY 1 HAVING COUNT(*) > {rules.max_block_size})"""
            ).fetchall()[0][0]
        junk_counts = {f: len(junk_now[f]) for f in guarded if len(junk_now[f])}
        totals.append(
            RuleTotals(
                rule.name,
                total[f"within_{rule.name}"],
                total[f"across_{rule.name}"],
                junk_counts,
                int(skipped),
                total[f"common_{rule.name}"] if rule.common is not None else None,
            )
        )
    clean = con.sql(
        "SELECT COUNT(*) AS n FROM map_ ANTI JOIN retired USING (customer_id) GROUP BY customer_id"
    ).fetchnumpy()["n"]
    sizes_now = np.concatenate([clean.astype(np.int64), np.bincount(labels)])
    return report_frame(totals, np.bincount(sizes_now))


def read_redirects(lake: Lake) -> pd.DataFrame:
    """gold/customer_id_redirects (retired_id -> surviving_id), empty before any merge."""
    if lake.exists("gold", "customer_id_redirects"):
        return lake.read_pandas("gold", "customer_id_redirects")
    return pd.DataFrame(columns=["retired_id", "surviving_id"])


def follow_redirects(ids: pd.Series, redirects: pd.DataFrame) -> pd.Series:
    """Map retired customer_ids to their surviving id (chains followed to the end)."""
    step = dict(zip(redirects["retired_id"], redirects["surviving_id"], strict=True))
    out = ids.copy()
    for _ in range(len(step) + 1):
        moved = out.map(step)
        if moved.isna().all():
            break
        out = moved.fillna(out)
    return out


# ---------------------------------------------------------------- lake edges


@dataclass
class UnifySummary:
    report: pd.DataFrame
    customers: int
    records: int
    redirects: int
    seconds: float
    unified: int = 0  # records matched and merged again (all of them, or the changes')

    def rows(self) -> list[dict]:
        return self.report.to_dict("records")


def read_records(lake: Lake, settings: Settings) -> pa.Table:
    """The records to unify (pipelines/sql/gold/unify_records*.sql), each with
    `record_hash`, a hash of the whole record as read (DuckDB's, in the same query):
    what the next build compares. Names and addresses are those valid now, so the hash
    also sees one become valid."""
    names = []
    if lake.exists("silver", "custtable") and lake.exists("silver", "contact"):
        names.append("gold/unify_records")
    if lake.exists("silver", "generic_transactions"):
        names.append("gold/unify_records_generic")
    con = connect(lake, [sql_text(settings, n) for n in names])
    hashed = "*, CAST(hash(*COLUMNS(*)) >> 1 AS BIGINT) AS record_hash"
    parts = [run_sql(con, settings, n, select=hashed) for n in names]
    con.close()
    if not parts:
        raise FileNotFoundError(f"no silver customer tables under {lake.uri('silver')}")
    return pa.concat_tables(parts)


def recorded_state(lake: Lake, digest: str, comparable: bool = True) -> dict | None:
    """The inputs the state was last written for, if it was made with these rules; with
    `comparable`, only a state `unify_changes` can compare records with (DuckDB's: the
    Spark engine's holds keys only, see KEYS_ONLY)."""
    record = last_record(lake, STATE)
    made = record[1].get(STATE_KEY) if record is not None else None
    if made == digest or (not comparable and made == digest + KEYS_ONLY):
        return record[0]
    return None


def current_summary(lake: Lake, digest: str, inputs: dict, started: float) -> UnifySummary | None:
    """The summary of the last unify when it was made (by either engine) from `inputs`
    with these rules: nothing is to be done. None when a unify is due."""
    if recorded_state(lake, digest, comparable=False) != inputs:
        return None
    if not lake.exists("gold", "customer_source_map"):
        return None
    return UnifySummary(
        lake.read_pandas("gold", "unify_report"),
        lake.count("gold", "customer_profile"),
        lake.count("gold", "customer_source_map"),
        0,
        time.perf_counter() - started,
    )


def frequencies_kept(lake: Lake, rules: UnifyRules, digest: str, records: int) -> bool:
    """Whether value frequencies kept by a build with these rules (`FREQUENCIES`) serve a
    build of `records` records: not when the records have grown or shrunk past the rules'
    `recount_frequencies_share` since (the build then counts them again and unifies all
    records: every decision may flip, and a whole unify is what an incremental one
    equals). Reads the kept records' total only: the Spark engine reads the table itself."""
    record = last_record(lake, FREQUENCIES)
    if record is None or record[1].get(STATE_KEY) != digest:
        return False
    total = lake.read(*FREQUENCIES, columns=["count"], filter=ds.field("field") == RECORDS_TOTAL)
    counted = pc.sum(total["count"]).as_py() or 0
    if abs(records - counted) > rules.recount_frequencies_share * counted:
        log.info("unify: %d records, frequencies counted on %d: counted again", records, counted)
        return False
    return True


def kept_frequencies(lake: Lake, rules: UnifyRules, digest: str, records: int) -> pa.Table | None:
    """The value frequencies kept by a build with these rules, when they serve a build of
    `records` records (`frequencies_kept`); None otherwise."""
    return lake.read(*FREQUENCIES) if frequencies_kept(lake, rules, digest, records) else None


def mark_state_rewriting(lake: Lake) -> None:
    """An empty commit of the state recording no inputs, before the outputs are written:
    the state reads as stale until its rewrite commits (the last write of a unify), so a
    unify stopped half way is followed by a whole unify, whichever engine runs it."""
    if lake.exists(*STATE):
        being_rewritten = stamp({}, **{STATE_KEY: "being rewritten"})
        lake.delete_and_append(*STATE, deletes={}, metadata=being_rewritten)


@writes_lake("build unify")
def build_unify(settings: Settings) -> UnifySummary:
    """silver -> unify: the source map, profiles, redirects and report; only the
    clusters that changes reach are unified again when the state allows it
    (`unify_changes`). See `_write` for a build stopped half way."""
    started = time.perf_counter()
    lake = Lake(settings.lake)
    rules = load_rules(settings.path(settings.unify_rules))
    digest = state_digest(rules)
    inputs = lake_versions(lake)
    inputs.pop("gold/customer_source_map", None)  # our own output
    done = current_summary(lake, digest, inputs, started)
    if done is not None:
        return done
    recorded = recorded_state(lake, digest)
    table = read_records(lake, settings)
    today = pd.Timestamp.now(tz="UTC").floor("us")
    kept = kept_frequencies(lake, rules, digest, len(table)) if frequency_fields(rules) else None
    unified = None
    comparable = kept is not None or not frequency_fields(rules)  # the state's frequencies
    if recorded is not None and comparable and lake.exists("gold", "customer_source_map"):
        con = duckdb_connection()
        register(con, lake, "before_", *STATE)
        register(con, lake, "map_", "gold", "customer_source_map")
        unified = unify_changes(con, table, rules, today, kept)
        con.close()
    if unified is None:
        previous = (
            lake.read("gold", "customer_source_map")
            if lake.exists("gold", "customer_source_map")
            else None
        )
        unified = unify_all(table, rules, previous, today, kept)
    records = len(table)
    del table
    _write(lake, unified, stamp(inputs), digest, new_frequencies=kept is None)
    return UnifySummary(
        unified.report,
        customers=lake.count("gold", "customer_profile"),
        records=records,
        redirects=len(unified.redirects),
        seconds=time.perf_counter() - started,
        unified=len(unified.source_map),
    )


def _write(
    lake: Lake,
    unified: Unified,
    meta: dict[str, str],
    digest: str,
    new_frequencies: bool = False,
) -> None:
    """The map and profiles (replaced, or their retired ids' rows replaced), redirects
    appended, the report; the state last. Before any of it the state is marked as being
    rewritten (an empty commit), so a build stopped half way is followed by a whole
    unify, not by one that compares with a state the outputs no longer match."""
    tables = {
        "customer_source_map": validate_arrow(
            pa.Table.from_pandas(unified.source_map, preserve_index=False),
            CustomerSourceMap,
            "gold/customer_source_map",
        ),
        "customer_profile": validate_arrow(
            pa.Table.from_pandas(unified.profiles, preserve_index=False),
            CustomerProfile,
            "gold/customer_profile",
        ),
    }
    state = pa.Table.from_pandas(unified.state, preserve_index=False)
    mark_state_rewriting(lake)
    for name, rows in tables.items():
        if unified.retired is None:
            lake.write(rows, "gold", name, mode="overwrite", metadata=meta)
        else:
            replace_rows(lake, ("gold", name), unified.retired, rows, meta)
    if len(unified.redirects):
        lake.write(CustomerIdRedirects.validate(unified.redirects), "gold", "customer_id_redirects")
    lake.write(unified.report, "gold", "unify_report", mode="overwrite")
    meta = {**meta, STATE_KEY: digest}
    if new_frequencies and unified.frequencies is not None:  # before the state they go with
        count = {**meta, COUNT_KEY: uuid.uuid4().hex}
        if unified.counted is not None:
            lake.write(unified.counted, *COUNTED, mode="overwrite", metadata=count)
        lake.write(unified.frequencies, *FREQUENCIES, mode="overwrite", metadata=count)
    if unified.retired is None:
        lake.write(state, *STATE, mode="overwrite", metadata=meta)
    else:
        replace_rows(lake, STATE, unified.keys, state, meta)
    for parts in lake.tables(*STATE[:2]):
        if parts not in (STATE[1:], FREQUENCIES[1:], COUNTED[1:]):  # an older unify's rule state
            lake.delete_folder("state", *parts)
