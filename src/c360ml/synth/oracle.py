"""The oracle: the best possible purchase probability under the generating process.

For person i, cutoff t and window w, `oracle_purchase_probability` returns
P(at least one valid purchase in [t, t + w days) | true parameters, history before t)
without knowing whether i is still alive: as BG/NBD does, P(alive at t | history) comes
from an exact forward filter over days (two states, alive/dropped; a day with a purchase
or a support case proves alive; a quiet day has likelihood (1 - p)(1 - q) if alive and 1
if dropped; the hazard depends only on observable covariates, rebuilt from the history,
and on the regime changes (`synth.shock`) the increments carried, from their day on: their
extra hazard, and for a kind that thins purchases, a day's order seen with probability
b (1 - (1 - f)(1 - (1 - c) r)) and a valid purchase with probability b (1 - c)(r + (1 - r) f)).
P(valid purchase in window | alive at t) is computed by Monte Carlo over the random future
covariates (support cases, returns still due from recent orders), each path evaluated
exactly (survival x no-valid-purchase recursion), so few paths suffice.
`omniscient_purchase_probability` replaces the filter by the true alive state.

Time is in whole UTC days: t is floored to midnight; the window is the w days from there.
Persons who enter at or after t (not yet customers) get NaN. "Valid" follows DESIGN.md:
not cancelled or voided, not a return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from c360ml.storage.lake import Lake
from c360ml.synth import process
from c360ml.synth.generate import read_meta
from c360ml.synth.params import ProcessParams
from c360ml.synth.shock import read_purchase_factors, read_shocks

DAY = 86_400
TRUTH_TABLES = ("persons", "person_keys", "purchases", "cases", "erased")


def load_truth(
    truth_dir: Path, include_pending: bool = False, persons=None
) -> dict[str, pd.DataFrame]:
    """The truth frames; `include_pending` adds the simulated, not yet published future.

    With `persons` (person ids), only their rows are read (the filter is applied while the
    parquet files are scanned), so memory follows the persons asked for, not the lake."""
    truth_dir = Path(truth_dir)
    read_meta(truth_dir)  # a clear error if there is no generated lake
    where = None
    if persons is not None:
        where = pc.field("person_id").isin(pa.array(np.asarray(persons, dtype=np.int64)))
    out: dict[str, pd.DataFrame] = {}
    for name in TRUTH_TABLES:
        path = truth_dir / f"{name}.parquet"
        if name == "erased" and not path.exists():
            out[name] = pd.DataFrame({"person_id": pd.Series(dtype="int64")})
            continue
        frame = pq.read_table(path, filters=where)
        pend = truth_dir / "_pending" / f"{name}.parquet"
        if include_pending and pend.exists():
            frame = pa.concat_tables([frame, pq.read_table(pend, filters=where)])
        out[name] = frame.to_pandas()
    return out


def valid_purchases(purchases: pd.DataFrame) -> pd.DataFrame:
    """Purchases in DESIGN.md's sense: not cancelled/voided, not a return, net > 0."""
    ok = ~purchases.cancelled & ~purchases.is_return & (purchases.net_amount > 0)
    return purchases[ok]


def oracle_purchase_probability(
    truth_dir: Path,
    person_ids,
    t,
    window_days: int,
    n_sims: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """P(valid purchase in the window | parameters, observable history) per person id."""
    return _probability(truth_dir, person_ids, t, window_days, n_sims, seed, omniscient=False)


CHUNK_PERSONS = 10_000  # persons simulated at once (bounds the Monte Carlo's paths)


def churn_probability(
    truth_dir: Path, lake_root: Path, customer_ids: pd.Series, cutoff, window_days: int
) -> pd.Series | None:
    """True churn probability per gold customer: the reference training compares its
    test figures with (`c360ml.model.reference`; the generator names this function).

    Maps customer_id -> person_id through gold/customer_source_map and the truth's
    person_keys.parquet; a customer merged from several persons churns only if none of
    them buys, so its probability is the product of the persons' no-purchase chances.
    """
    keys_path = Path(truth_dir) / "person_keys.parquet"
    if not keys_path.exists():
        return None
    # Only the test customers' rows of the map and of the truth are read.
    source_map = Lake(lake_root).read_pandas(
        "gold",
        "customer_source_map",
        columns=["source", "source_key", "customer_id"],
        filter=ds.field("customer_id").isin(pa.array(customer_ids.astype(str).unique())),
    )
    keys = pd.read_parquet(
        keys_path,
        columns=["person_id", "source", "source_key"],
        filters=[("source_key", "in", source_map["source_key"].unique().tolist())],
    )
    link = source_map.merge(keys, on=["source", "source_key"])[["customer_id", "person_id"]]
    link = link.drop_duplicates()
    persons = link["person_id"].drop_duplicates().to_numpy()
    parts = []
    for k, start in enumerate(range(0, len(persons), CHUNK_PERSONS)):
        chunk = persons[start : start + CHUNK_PERSONS]
        part = oracle_purchase_probability(truth_dir, chunk, cutoff, window_days, seed=k)
        if not isinstance(part, pd.Series):
            part = pd.Series(np.asarray(part, dtype=np.float64), index=chunk)
        parts.append(part)
    p = pd.concat(parts) if parts else pd.Series(dtype=np.float64)
    no_purchase = np.log(np.clip(1.0 - link["person_id"].map(p).astype(float), 1e-12, 1))
    churn = np.exp(no_purchase.groupby(link["customer_id"].to_numpy()).sum(min_count=1))
    return churn.dropna()


def omniscient_purchase_probability(
    truth_dir: Path,
    person_ids,
    t,
    window_days: int,
    n_sims: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """As the oracle, but knowing whether each person is still alive at t."""
    return _probability(truth_dir, person_ids, t, window_days, n_sims, seed, omniscient=True)


def _day_index(ts: pd.Series, start_epoch: int) -> np.ndarray:
    secs = (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return (secs.to_numpy(dtype=np.int64) - start_epoch) // DAY


def _probability(truth_dir, person_ids, t, window_days, n_sims, seed, omniscient) -> np.ndarray:
    truth_dir = Path(truth_dir)
    meta = read_meta(truth_dir)
    p = ProcessParams(**meta["params"])
    start = int(meta["start_epoch"])
    t_day = (
        int(
            (
                pd.Timestamp(t).tz_localize("UTC")
                if pd.Timestamp(t).tz is None
                else pd.Timestamp(t)
            ).timestamp()
            - start
        )
        // DAY
    )
    if t_day + window_days > meta["n_days"]:
        raise ValueError("the window reaches past the simulated horizon of this lake")
    if t_day < 1:
        raise ValueError("t must be after the start of the simulated history")
    ids = np.asarray(person_ids, dtype=np.int64)
    truth = load_truth(truth_dir, include_pending=True, persons=ids)
    persons = truth["persons"].set_index("person_id").reindex(ids)
    if persons["lam"].isna().any():
        missing = ids[persons["lam"].isna().to_numpy()][:5]
        raise KeyError(f"unknown person ids, e.g. {missing.tolist()}")
    traits = _traits(persons)
    seasonality = process.season_for_days(np.datetime64(meta["start"], "D"), meta["n_days"], p)
    pos = pd.Series(np.arange(len(ids)), index=ids)
    hist = _history(truth, pos, start, t_day)
    shocks = read_shocks(truth_dir, meta, ids)  # regime changes the increments carried
    factors = read_purchase_factors(truth_dir, meta, ids)
    alive_prob, cases, rets = _filter(traits, hist, seasonality, t_day, p, shocks, factors)
    if omniscient:
        dropout = persons["dropout_day"].fillna(np.iinfo(np.int32).max).to_numpy()
        alive_prob = (dropout >= t_day).astype(float)
    rng = np.random.default_rng(seed)
    due = _returns_due(rng, traits, hist, t_day, window_days, n_sims, p)
    q = _window_probability(
        rng, traits, cases, rets, due, seasonality, t_day, window_days, n_sims, p, shocks, factors
    )
    out = alive_prob * q
    out[traits.entry_day >= t_day] = np.nan
    return out


def _traits(persons: pd.DataFrame) -> process.Traits:
    cols = {
        f: persons[f].to_numpy() for f in process.Traits.__dataclass_fields__ if f != "person_id"
    }
    return process.Traits(person_id=persons.index.to_numpy(), **cols)


def _history(truth: dict, pos: pd.Series, start: int, t_day: int) -> dict[str, np.ndarray]:
    """Observable events before t of the selected persons, as (person position, day) arrays."""
    pur = truth["purchases"]
    pur = pur[pur.person_id.isin(pos.index)]
    day = _day_index(pur.ts, start)
    before = day < t_day
    pur, day = pur[before], day[before]
    who = pos.reindex(pur.person_id).to_numpy()
    cas = truth["cases"]
    cas = cas[cas.person_id.isin(pos.index)]
    cday = _day_index(cas.ts, start)
    cas, cday = cas[cday < t_day], cday[cday < t_day]
    ret = pur.is_return.to_numpy()
    returned_ids = set(pur.origin_order_id[ret].dropna())
    orders = ~ret
    return {
        "buy_pos": who[orders],
        "buy_day": day[orders],
        "buy_valid": ~pur.cancelled.to_numpy()[orders],
        "buy_returned": pur.order_id[orders].isin(returned_ids).to_numpy(),
        "ret_pos": who[ret],
        "ret_day": day[ret],
        "case_pos": pos.reindex(cas.person_id).to_numpy(),
        "case_day": cday,
    }


def _by_day(pos: np.ndarray, day: np.ndarray, n_days: int) -> list[np.ndarray]:
    order = np.argsort(day, kind="stable")
    bounds = np.searchsorted(day[order], np.arange(n_days + 1))
    return [pos[order][bounds[d] : bounds[d + 1]] for d in range(n_days)]


def _filter(traits, hist, seasonality, t_day, p, shocks=(), factors=()):
    """Forward filter of P(alive) through day t-1, with the decayed case/return counts."""
    n = len(traits)
    base = process.static_hazard(traits, p)
    entry = traits.entry_day.astype(np.int64)
    gc, gr = np.exp(-1 / p.case_decay_days), np.exp(-1 / p.return_decay_days)
    buys = _by_day(hist["buy_pos"], hist["buy_day"], t_day)
    cases_by = _by_day(hist["case_pos"], hist["case_day"], t_day)
    rets_by = _by_day(hist["ret_pos"], hist["ret_day"], t_day)
    q_quiet = np.exp(-traits.case_rate)
    # an order is kept by a thinning shock if it is returned ((1 - c) r) or drawn to stay (f)
    returned = (1 - process.cancel_prob(traits.store, p)) * traits.return_prob
    alive = np.ones(n)
    cases, rets = np.zeros(n), np.zeros(n)
    for d in range(t_day):
        active = entry < d
        shocked = base * np.exp(process.shock_log_hazard(list(shocks), d))
        surv = np.exp(-process.hazard(shocked, cases, rets, d - entry, p))
        prior = alive * surv
        f = process.shock_purchase_factor(list(factors), d)
        seen_order = (1 - np.exp(-traits.lam * seasonality[d])) * (1 - (1 - f) * (1 - returned))
        quiet = prior * (1 - seen_order) * q_quiet
        post = quiet / (quiet + (1 - prior))
        seen = np.zeros(n, dtype=bool)
        seen[buys[d]] = True
        seen[cases_by[d]] = True
        alive = np.where(active, np.where(seen, 1.0, post), alive)
        cases *= gc
        rets *= gr
        np.add.at(cases, cases_by[d], 1.0)
        np.add.at(rets, rets_by[d], 1.0)
    return alive, cases, rets


def _returns_due(rng, traits, hist, t_day, window, n_sims, p):
    """Sampled returns (person, sim, day offset) of recent valid orders not yet returned."""
    span = p.return_delay_max - p.return_delay_min + 1
    recent = (
        hist["buy_valid"] & ~hist["buy_returned"] & (hist["buy_day"] >= t_day - p.return_delay_max)
    )
    who, day = hist["buy_pos"][recent], hist["buy_day"][recent]
    age = (t_day - 1) - day
    elapsed = np.clip(age - p.return_delay_min + 1, 0, span)  # delays already ruled out
    r = traits.return_prob[who]
    p_later = r * (span - elapsed) / span / (1 - r * elapsed / span)
    u = rng.random((len(who), n_sims))
    hit = u < p_later[:, None]
    k = np.floor(rng.random((len(who), n_sims)) * (span - elapsed)[:, None]).astype(np.int64)
    delay = p.return_delay_min + elapsed[:, None] + k
    offset = day[:, None] + delay - t_day
    keep = hit & (offset >= 0) & (offset < window)
    j, s = np.nonzero(keep)
    return who[j], s, offset[j, s]


def _window_probability(
    rng, traits, cases0, rets0, due, seasonality, t_day, window, n_sims, p, shocks=(), factors=()
):
    """P(valid purchase in the window | alive at t), averaged over sampled futures."""
    n = len(traits)
    base = process.static_hazard(traits, p)[:, None]
    entry = traits.entry_day.astype(np.int64)[:, None]
    c = process.cancel_prob(traits.store, p)[:, None]
    r = traits.return_prob[:, None]
    lam = traits.lam[:, None]
    q = 1 - np.exp(-traits.case_rate)[:, None]
    gc, gr = np.exp(-1 / p.case_decay_days), np.exp(-1 / p.return_decay_days)
    cases = np.repeat(cases0[:, None], n_sims, axis=1)
    rets = np.repeat(rets0[:, None], n_sims, axis=1)
    who, sim, off = due
    alive_quiet = np.ones((n, n_sims))  # alive, no valid purchase yet
    dead_quiet = np.zeros((n, n_sims))  # dropped before any valid purchase
    for k in range(window):
        d = t_day + k
        extra = process.shock_log_hazard([(f, e[:, None]) for f, e in shocks], d)
        surv = np.exp(-process.hazard(base * np.exp(extra), cases, rets, d - entry, p))
        dead_quiet += alive_quiet * (1 - surv)
        buy = 1 - np.exp(-lam * seasonality[d])
        f = process.shock_purchase_factor([(g, e[:, None]) for g, e in factors], d)
        alive_quiet *= surv * (1 - buy * (1 - c) * (r + (1 - r) * f))
        cases *= gc
        rets *= gr
        cases += rng.random((n, n_sims)) < q
        today = off == k
        np.add.at(rets, (who[today], sim[today]), 1.0)
    return 1 - (alive_quiet + dead_quiet).mean(axis=1)
