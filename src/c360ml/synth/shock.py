"""Regime changes an increment can carry: `generate --increment --shock DATE:KIND`.

Why a competing risk applied to the parked future: the first run simulated the whole
future up front (`generate.py`), and everything already published must stay as it was. A
shock raises the dropout hazard of its exposed persons from its day D on, from h(d) to
exp(e(d)) h(d). Under the daily process that is the same law as keeping the simulated path
and adding an independent second dropout risk of hazard (exp(e(d)) - exp(e_before(d))) h(d)
(e_before: the shocks already applied): a person dies at the first day either risk fires,
and until then its path (purchases, cases, returns, hence h) is the one simulated. So the
shock draws that second dropout day along each exposed person's own path (its covariates
rebuilt from the truth, as the oracle does), and where it comes first, the person's pending
purchases and support cases from that day on are withdrawn (returns of earlier orders still
happen), from the truth and from every pending source row they made. The oracle reads the
shocks from generator.json and truth/shocks.parquet and multiplies the hazard by exp(e).

A kind with a purchase_factor f < 1 (a recession) also thins the parked future: from D on,
each pending order of an exposed person that is not returned (and is not the first order,
which opens the account) is withdrawn with probability 1 - f, with its source rows. Why
returned orders are kept: a return raises the dropout hazard (beta_return), so withdrawing
one would change the person's covariate path, and with it the dropout law the competing
risk above is drawn on; keeping them leaves every path (cases, returns) as simulated, so
both constructions stay exact and commute. Under that law a day's order event is still
seen with probability b k, k = 1 - (1 - f)(1 - (1 - c) r), and is a valid purchase with
probability b (1 - c)(r + (1 - r) f) (b: the day's order probability, c: cancellation, r:
the return probability), which is what the oracle uses. One approximation: an order whose
return would fall past the simulated horizon is not known to be returned, so it is thinned
like the rest; that touches only orders of the horizon's last 30 days.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from c360ml.synth import process
from c360ml.synth.params import SHOCKS, ProcessParams, ShockKind

log = logging.getLogger(__name__)

DAY = 86_400
SHOCKS_FILE = "shocks.parquet"  # truth: person_id, shock, first_day, log_hazard (exposed only)
THIN_SEED = 3_000_000  # rng stream of a shock's purchase thinning (dropouts: 2_000_000)
_FORM = re.compile(r"^(\d{4}-\d{2}-\d{2}):([a-z_]+)(?:\*(\d+(?:\.\d+)?))?$")
# pending source tables that hold an order's or a case's rows, and the column naming it
_ORDER_TABLES = {
    "salestable": "salesid",
    "salesline": "salesid",
    "retailtransactiontable": "transactionid",
    "retailtransactionsalestrans": "transactionid",
}


def parse_shock(text: str) -> tuple[str, ShockKind]:
    """`DATE:KIND` or `DATE:KIND*SEVERITY` -> (ISO date, kind); one line naming the option
    and the form otherwise."""
    kinds = ", ".join(sorted(SHOCKS))
    match = _FORM.match(text.strip()) if isinstance(text, str) else None
    date = match and match.group(1)
    try:
        valid = bool(date) and datetime.fromisoformat(date) is not None
    except ValueError:
        valid = False
    severity = float(match.group(3)) if match and match.group(3) else 1.0
    if not valid or match.group(2) not in SHOCKS or severity <= 0:
        raise ValueError(
            f"--shock expects DATE:KIND or DATE:KIND*SEVERITY (a UTC date YYYY-MM-DD, one of: "
            f"{kinds}, and a positive number), e.g. 2026-03-01:competitor; got {text!r}"
        )
    return date, SHOCKS[match.group(2)].scaled(severity)


def _epoch(date: str) -> int:
    return int(datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp())


def _days(ts: pd.Series, start_epoch: int) -> np.ndarray:
    secs = (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return (np.asarray(secs, dtype=np.int64) - start_epoch) // DAY


def _read(truth: Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A truth table with its parked (pending) rows."""
    parts = [truth / f"{name}.parquet", truth / "_pending" / f"{name}.parquet"]
    return pd.concat(
        [pq.read_table(p, columns=columns).to_pandas() for p in parts if p.exists()],
        ignore_index=True,
    )


def home_regions(purchases: pd.DataFrame) -> pd.Series:
    """person_id -> region (city part of the store name) of most of its store purchases."""
    store = purchases[(purchases.channel == "store") & ~purchases.is_return]
    store = store[store.order_id.str.startswith("POS:", na=False)]
    region = store.order_id.str.slice(4).str.split("-", n=1).str[0]
    counts = pd.DataFrame({"person_id": store.person_id, "region": region}).value_counts()
    counts = counts.reset_index().sort_values(
        ["person_id", "count", "region"], ascending=[True, False, True]
    )
    return counts.drop_duplicates("person_id").set_index("person_id")["region"]


def read_shocks(truth: Path, meta: dict, person_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(first day, extra log-hazard per person of `person_ids`) of every applied shock."""
    path = Path(truth) / SHOCKS_FILE
    if not meta.get("shocks") or not path.exists():
        return []
    rows = pq.read_table(path).to_pandas()
    out = []
    for k, shock in enumerate(meta["shocks"]):
        mine = rows[rows.shock == k].set_index("person_id")["log_hazard"]
        out.append((int(shock["day"]), mine.reindex(person_ids).fillna(0.0).to_numpy()))
    return out


def read_purchase_factors(
    truth: Path, meta: dict, person_ids: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """(first day, purchase_factor per person of `person_ids`) of every applied shock that
    thins purchases (1.0 for persons it does not expose)."""
    path = Path(truth) / SHOCKS_FILE
    thinning = [s for s in meta.get("shocks", []) if s.get("purchase_factor", 1.0) != 1.0]
    if not thinning or not path.exists():
        return []
    rows = pq.read_table(path, columns=["person_id", "shock"]).to_pandas()
    out = []
    for shock in thinning:
        mine = rows.person_id[rows.shock == shock["n"]]
        hit = np.isin(np.asarray(person_ids, dtype=np.int64), mine.to_numpy())
        out.append((int(shock["day"]), np.where(hit, float(shock["purchase_factor"]), 1.0)))
    return out


def apply_shock(
    truth: Path, meta: dict, date: str, kind: ShockKind, not_before: int, seed: int
) -> dict:
    """Apply one shock to the parked future of the truth; returns its generator.json entry.

    `not_before`: epoch of the first instant not yet published (a shock cannot rewrite
    what a sync already delivered)."""
    start = int(meta["start_epoch"])
    n_days = int(meta["n_days"])
    first = _epoch(date)
    if first < not_before:
        raise ValueError(
            f"--shock date {date} is before this increment's first day "
            f"{datetime.fromtimestamp(not_before, UTC):%Y-%m-%d} (already published)"
        )
    day = (first - start) // DAY
    if day >= n_days:
        raise ValueError(f"--shock date {date} is past the simulated future of this lake")
    k = len(meta.get("shocks", []))
    p = ProcessParams(**meta["params"])
    persons = pq.read_table(truth / "persons.parquet").to_pandas()
    purchases = _read(
        truth,
        "purchases",
        ["person_id", "order_id", "ts", "channel", "is_return", "origin_order_id"],
    )
    cases = _read(truth, "cases", ["person_id", "incident_id", "ts"])
    if kind.regions is None:
        exposed = np.ones(len(persons), dtype=bool)
    else:
        region = home_regions(purchases).reindex(persons.person_id)
        exposed = region.isin(kind.regions).to_numpy()
    log_hazard = np.log(kind.hazard_factor) + kind.beta_store * persons.store.to_numpy()
    extra_all = np.where(exposed, log_hazard, 0.0)
    # the second dropout risk along each exposed person's simulated path
    orig = persons.dropout_day.fillna(process.NEVER).to_numpy(dtype=np.int64)
    cand = np.flatnonzero(exposed & (orig > day))
    ids = persons.person_id.to_numpy()[cand]
    before = read_shocks(truth, meta, ids)
    new_drop = _second_dropout(
        persons.iloc[cand], ids, orig[cand], extra_all[cand], before, purchases, cases, day, p,
        start, n_days, np.random.default_rng([seed, 2_000_000 + k]),
    )  # fmt: skip
    changed = new_drop < orig[cand]
    drop = pd.Series(new_drop[changed], index=ids[changed])
    removed = _withdraw(truth, drop, start)
    skipped = 0
    if kind.purchase_factor != 1.0:
        who = persons.person_id[exposed]
        entry_day = persons.set_index("person_id").entry_day
        rng = np.random.default_rng([seed, THIN_SEED + k])
        skipped = _thin(truth, who, entry_day, day, kind.purchase_factor, start, rng)
    if len(drop):
        at = persons.person_id.map(drop)
        hit = at.notna().to_numpy()
        persons.loc[hit, "dropout_day"] = at[hit].astype(np.int64).to_numpy()
        persons.loc[hit, "dropout_ts"] = pd.to_datetime(
            (start + at[hit].astype(np.int64) * DAY) * 1_000_000_000, utc=True
        ).to_numpy()
        table = pa.Table.from_pandas(persons, preserve_index=False)
        old = pq.read_schema(truth / "persons.parquet")
        pq.write_table(table.cast(old), truth / "persons.parquet")
    rows = pa.table(
        {
            "person_id": pa.array(persons.person_id.to_numpy()[exposed], type=pa.int64()),
            "shock": pa.array(np.full(int(exposed.sum()), k), type=pa.int64()),
            "first_day": pa.array(np.full(int(exposed.sum()), day), type=pa.int64()),
            "log_hazard": pa.array(extra_all[exposed], type=pa.float64()),
        }
    )
    path = truth / SHOCKS_FILE
    pq.write_table(pa.concat_tables([pq.read_table(path), rows]) if path.exists() else rows, path)
    entry = {
        "n": k,
        "date": date,
        "day": int(day),
        "kind": kind.name,
        "description": kind.description,
        "regions": None if kind.regions is None else list(kind.regions),
        "beta_store": kind.beta_store,
        "hazard_factor": kind.hazard_factor,
        "purchase_factor": kind.purchase_factor,
        "exposed": int(exposed.sum()),
        "dropouts_brought_forward": int(len(drop)),
        **removed,
        "purchases_skipped": int(skipped),
    }
    log.info("shock %s from %s: %s", kind.name, date, entry)
    return entry


def _second_dropout(
    persons, ids, orig, extra, before, purchases, cases, day, p, start, n_days, rng
) -> np.ndarray:
    """First day >= `day` the shock's extra risk fires for each candidate (NEVER if not)."""
    n = len(ids)
    out = np.full(n, process.NEVER, dtype=np.int64)
    if n == 0:
        return out
    traits = SimpleNamespace(
        h0=persons.h0.to_numpy(),
        discount=persons.discount.to_numpy(),
        store=persons.store.to_numpy(),
    )
    base = process.static_hazard(traits, p)
    entry = persons.entry_day.to_numpy(dtype=np.int64)
    pos = pd.Series(np.arange(n), index=ids)

    def by_day(frame: pd.DataFrame) -> dict[int, np.ndarray]:
        frame = frame[frame.person_id.isin(pos.index)]
        d = _days(frame.ts, start)
        who = pos.reindex(frame.person_id).to_numpy()
        return {int(k): who[d == k] for k in np.unique(d)}

    case_days = by_day(cases)
    return_days = by_day(purchases[purchases.is_return])
    gc, gr = np.exp(-1 / p.case_decay_days), np.exp(-1 / p.return_decay_days)
    c, r = np.zeros(n), np.zeros(n)
    cum, threshold = np.zeros(n), rng.exponential(size=n)
    for d in range(n_days):
        if d >= day:
            active = (entry < d) & (d < orig) & (out == process.NEVER)
            h = process.hazard(base, c, r, d - entry, p)
            e_old = process.shock_log_hazard(before, d)
            cum += np.where(active, (np.exp(e_old + extra) - np.exp(e_old)) * h, 0.0)
            out[active & (cum >= threshold)] = d
        c *= gc
        r *= gr
        if d in case_days:
            np.add.at(c, case_days[d], 1.0)
        if d in return_days:
            np.add.at(r, return_days[d], 1.0)
    return out


def _withdraw(truth: Path, drop: pd.Series, start: int) -> dict[str, int]:
    """Remove from the parked future what persons dropped early no longer do: purchases
    (and their returns) and support cases from their dropout day on, truth and source rows."""
    pend = truth / "_pending"
    counts = {"purchases_withdrawn": 0, "cases_withdrawn": 0}
    if drop.empty:
        return counts
    purchases = pq.read_table(pend / "purchases.parquet")
    frame = purchases.select(["person_id", "order_id", "ts", "is_return", "origin_order_id"])
    frame = frame.to_pandas()
    cutoff = frame.person_id.map(drop)
    late = (~frame.is_return & (_days(frame.ts, start) >= cutoff)).to_numpy()
    orders = set(frame.order_id[late].dropna())
    returns = frame.is_return & frame.origin_order_id.isin(orders)
    gone_orders = orders | set(frame.order_id[returns.to_numpy()].dropna())
    keep = ~(late | returns.to_numpy())
    pq.write_table(purchases.filter(pa.array(keep)), pend / "purchases.parquet")
    counts["purchases_withdrawn"] = int((~keep).sum())
    case_table = pq.read_table(pend / "cases.parquet")
    cf = case_table.select(["person_id", "incident_id", "ts"]).to_pandas()
    gone_cases = (_days(cf.ts, start) >= cf.person_id.map(drop)).to_numpy()
    pq.write_table(case_table.filter(pa.array(~gone_cases)), pend / "cases.parquet")
    counts["cases_withdrawn"] = int(gone_cases.sum())
    _remove_source_rows(pend, gone_orders, set(cf.incident_id[gone_cases]))
    return counts


def _thin(
    truth: Path,
    exposed: pd.Series,
    entry_day: pd.Series,
    day: int,
    factor: float,
    start: int,
    rng: np.random.Generator,
) -> int:
    """Withdraw each pending order of an exposed person from `day` on with probability
    1 - factor, unless it is returned or opens the account; returns how many went."""
    pend = truth / "_pending"
    purchases = pq.read_table(pend / "purchases.parquet")
    frame = purchases.select(["person_id", "order_id", "ts", "is_return", "origin_order_id"])
    frame = frame.to_pandas()
    returned = set(frame.origin_order_id[frame.is_return].dropna())
    published = truth / "purchases.parquet"
    if published.exists():  # a return already published names an order not yet (late rows)
        old = pq.read_table(published, columns=["is_return", "origin_order_id"]).to_pandas()
        returned |= set(old.origin_order_id[old.is_return].dropna())
    d = _days(frame.ts, start)
    candidate = (
        ~frame.is_return.to_numpy()
        & (d >= day)
        & frame.person_id.isin(exposed).to_numpy()
        & (d != frame.person_id.map(entry_day).to_numpy())  # the account-opening order
        & ~frame.order_id.isin(returned).to_numpy()
    )
    gone = candidate & (rng.random(len(frame)) >= factor)
    if not gone.any():
        return 0
    pq.write_table(purchases.filter(pa.array(~gone)), pend / "purchases.parquet")
    _remove_source_rows(pend, set(frame.order_id[gone].dropna()), set())
    return int(gone.sum())


def _remove_source_rows(pend: Path, gone_orders: set[str], gone_cases: set[str]) -> None:
    """Delete the pending source rows of withdrawn orders (SO:/POS: ids) and cases."""
    source_ids = {
        "salesid": {o.split("-", 1)[1] for o in gone_orders if o.startswith("SO:")},
        "transactionid": {o[4:] for o in gone_orders if o.startswith("POS:")},
        "incidentid": gone_cases,
    }
    for name, column in [*_ORDER_TABLES.items(), ("incident", "incidentid")]:
        path = pend / f"{name}.parquet"
        if not path.exists() or not source_ids[column]:
            continue
        rows = pq.read_table(path)
        hit = pc.is_in(rows.column(column), value_set=pa.array(sorted(source_ids[column])))
        hit = pc.fill_null(hit, False)
        if pc.any(hit).as_py():
            pq.write_table(rows.filter(pc.invert(hit)), path)


__all__ = [
    "SHOCKS_FILE",
    "apply_shock",
    "home_regions",
    "parse_shock",
    "read_purchase_factors",
    "read_shocks",
]
