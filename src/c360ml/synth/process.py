"""The behavioural process behind the synthetic purchases: latent traits, daily simulation.

Why a daily discrete process: it is simple to simulate vectorised over persons (one numpy
step per day), and the oracle (`oracle.py`) can filter the hidden alive/dropped state
exactly with the same step functions (`season`, `hazard`), which live here so the
simulation and the oracle cannot drift apart.

Order of events within day d for an alive person who entered before d:
1. dropout with probability 1 - exp(-h(d)), h from covariates known at the end of d - 1;
2. if still alive: a purchase with probability 1 - exp(-lam * season(d)) and a support
   case with probability 1 - exp(-case_rate);
3. returns scheduled for day d happen (alive or not) and, with today's cases, update the
   decayed counts used from d + 1 on.
A person's first purchase is on its entry day (the account is created at checkout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from c360ml.synth.params import CH_CALL_CENTER, CH_ONLINE, CH_STORE, LakeShape, ProcessParams

NEVER = np.iinfo(np.int32).max  # dropout day of a person still alive at the end
KIND_PERSON, KIND_ORGANISATION, KIND_CONTACT_ONLY = 0, 1, 2
KIND_NAMES = {
    KIND_PERSON: "person",
    KIND_ORGANISATION: "organisation",
    KIND_CONTACT_ONLY: "contact_only",
}


@dataclass
class Traits:
    """Latent and structural attributes of a block of persons (arrays of equal length)."""

    person_id: np.ndarray  # int64, global
    kind: np.ndarray  # int8: KIND_*
    has_contact: np.ndarray  # bool: a Dataverse contact exists
    n_accounts: np.ndarray  # int8: Commerce accounts (0, 1 or 2)
    entry_day: np.ndarray  # int32: day index of account creation (may be < 0)
    created_sec: np.ndarray  # int32: second of the entry day the account was created
    lam: np.ndarray  # float64: daily purchase rate
    h0: np.ndarray  # float64: baseline daily dropout hazard
    discount: np.ndarray  # float64: share of orders with a discount
    store: np.ndarray  # float64: share of orders in a store (POS)
    return_prob: np.ndarray  # float64: probability an order is returned
    case_rate: np.ndarray  # float64: daily support-case rate while alive
    basket: np.ndarray  # float64: mean extra lines per order (Poisson)

    def __len__(self) -> int:
        return len(self.person_id)

    def columns(self) -> dict[str, np.ndarray]:
        return dict(vars(self))


@dataclass
class SimResult:
    """What happened to a block of persons; indices are positions in the Traits block."""

    dropout_day: np.ndarray  # int32 per person, NEVER if alive through the horizon
    buy_idx: np.ndarray  # purchases: person position
    buy_day: np.ndarray  # purchases: day index
    buy_channel: np.ndarray  # int8 CH_*
    buy_cancelled: np.ndarray  # bool: cancelled (sales order) or voided (POS)
    buy_first: np.ndarray  # bool: the forced first purchase at account creation
    buy_return_day: np.ndarray  # int32 day of its return, -1 if not returned
    case_idx: np.ndarray  # support cases: person position
    case_day: np.ndarray  # support cases: day index


def season(day_of_year: np.ndarray, p: ProcessParams) -> np.ndarray:
    """Purchase-rate multiplier by day of year: a December peak and a Black Friday spike."""
    doy = np.asarray(day_of_year, dtype=float)

    def bump(centre: float, width: float) -> np.ndarray:
        dist = np.abs(doy - centre)
        dist = np.minimum(dist, 365.0 - dist)  # wrap around the new year
        return np.exp(-0.5 * (dist / width) ** 2)

    return (
        p.season_base
        + p.season_xmas * bump(349, p.season_xmas_width)
        + p.season_bf * bump(332, p.season_bf_width)
    )


def season_for_days(start: np.datetime64, n_days: int, p: ProcessParams) -> np.ndarray:
    """season() for day indexes 0..n_days-1 counted from `start` (a UTC date)."""
    dates = start + np.arange(n_days).astype("timedelta64[D]")
    doy = (dates - dates.astype("datetime64[Y]")).astype(int) + 1
    return season(doy, p)


def static_hazard(t: Traits, p: ProcessParams) -> np.ndarray:
    """The part of the hazard fixed per person: h0 and the observable trait effects."""
    return t.h0 * np.exp(p.beta_discount * (t.discount - 0.25) + p.beta_store * (t.store - 0.5))


def hazard(
    base: np.ndarray,
    cases: np.ndarray,
    returns: np.ndarray,
    tenure_days: np.ndarray,
    p: ProcessParams,
) -> np.ndarray:
    """Daily dropout hazard from the static part and the observable dynamic covariates."""
    tenure = np.maximum(tenure_days, 0) / 365.0
    return base * np.exp(
        p.beta_case * cases + p.beta_return * returns + p.beta_tenure * np.log1p(tenure)
    )


def shock_log_hazard(shocks: list[tuple[int, np.ndarray]], d: int) -> np.ndarray | float:
    """Extra log-hazard of day d from every regime change begun by then (`synth.shock`):
    `shocks` holds (first day, extra log-hazard per person). The simulation adds it as a
    competing risk after the fact; the oracle multiplies the hazard by its exp."""
    out: np.ndarray | float = 0.0
    for first_day, extra in shocks:
        if d >= first_day:
            out = out + extra
    return out


def shock_purchase_factor(factors: list[tuple[int, np.ndarray]], d: int) -> np.ndarray | float:
    """Share of a person's not-returned orders still placed on day d, from every regime
    change begun by then (`synth.shock`: (first day, factor per person)); 1.0 without."""
    out: np.ndarray | float = 1.0
    for first_day, factor in factors:
        if d >= first_day:
            out = out * factor
    return out


def cancel_prob(store: np.ndarray, p: ProcessParams) -> np.ndarray:
    """Probability a purchase event ends cancelled or voided (channel mix of the person)."""
    return store * p.void_pos + (1 - store) * p.cancel_sales


def draw_traits(
    rng: np.random.Generator,
    person_ids: np.ndarray,
    n_existing: int,
    n_hist_days: int,
    n_days: int,
    p: ProcessParams,
    shape: LakeShape,
) -> Traits:
    """Latent traits of persons; ids < n_existing enter by the end of history, others later."""
    n = len(person_ids)
    u = rng.random((4, n))
    kind = np.full(n, KIND_PERSON, dtype=np.int8)
    kind[u[0] < shape.organisation_share] = KIND_ORGANISATION
    kind[u[0] > 1 - shape.contact_only_share] = KIND_CONTACT_ONLY
    is_person = kind == KIND_PERSON
    has_contact = (kind == KIND_CONTACT_ONLY) | (is_person & (u[1] < shape.contact_share))
    n_accounts = np.where(kind == KIND_CONTACT_ONLY, 0, 1).astype(np.int8)
    n_accounts[is_person & (u[2] < shape.two_account_share)] = 2

    existing = person_ids < n_existing
    pre = existing & (u[3] < shape.pre_start_share)
    entry = np.where(
        existing,
        rng.integers(0, n_hist_days, n),
        rng.integers(n_hist_days, max(n_days, n_hist_days + 1), n),
    )
    entry = np.where(pre, rng.integers(-730, 0, n), entry).astype(np.int32)

    lam = rng.gamma(p.lam_shape, p.lam_mean / p.lam_shape, n)
    lam[kind == KIND_CONTACT_ONLY] = 0.0
    case_rate = rng.gamma(p.case_rate_shape, p.case_rate_mean / p.case_rate_shape, n)
    case_rate[~has_contact] = 0.0  # cases are recorded against contacts only
    return Traits(
        person_id=person_ids.astype(np.int64),
        kind=kind,
        has_contact=has_contact,
        n_accounts=n_accounts,
        entry_day=entry,
        created_sec=rng.integers(1, 80_000, n).astype(np.int32),
        lam=lam,
        h0=rng.gamma(p.h0_shape, p.h0_mean / p.h0_shape, n),
        discount=rng.beta(p.discount_a, p.discount_b, n),
        store=rng.beta(p.store_a, p.store_b, n),
        return_prob=rng.beta(p.return_a, p.return_b, n),
        case_rate=case_rate,
        basket=rng.gamma(p.basket_shape, p.basket_mean / p.basket_shape, n),
    )


def simulate(
    rng: np.random.Generator, t: Traits, seasonality: np.ndarray, p: ProcessParams
) -> SimResult:
    """Run the daily process for every day of `seasonality` (vectorised over persons).

    Poisson-style thresholds (cumulative intensity vs an Exp(1) draw) replace a uniform
    draw per person and day: the same law (a day has a purchase iff the cumulative
    intensity crosses the threshold that day), but random numbers are drawn only for
    events, which keeps a 1M-person run fast.
    """
    n, n_days = len(t), len(seasonality)
    base = static_hazard(t, p)
    gc, gr = np.exp(-1 / p.case_decay_days), np.exp(-1 / p.return_decay_days)
    cum_h, cum_l, cum_k = np.zeros(n), np.zeros(n), np.zeros(n)
    thr_h, thr_l, thr_k = rng.exponential(size=(3, n))
    cases, rets = np.zeros(n), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    dropout = np.full(n, NEVER, dtype=np.int32)
    entry = t.entry_day.astype(np.int64)
    first_by_day = _first_buyers_by_day(t, n_days)
    returns_due: dict[int, list[np.ndarray]] = {}
    buys: list[dict[str, np.ndarray]] = []
    case_events: list[tuple[np.ndarray, np.ndarray]] = []
    for d in range(n_days):
        active = alive & (entry < d)
        h = hazard(base, cases, rets, d - entry, p)
        cum_h += np.where(active, h, 0.0)
        died = active & (cum_h >= thr_h)
        if died.any():
            alive &= ~died
            active &= ~died
            dropout[died] = d
        cum_l += (t.lam * seasonality[d]) * active
        buy = np.flatnonzero(cum_l >= thr_l)
        thr_l[buy] = cum_l[buy] + rng.exponential(size=len(buy))
        cum_k += t.case_rate * active
        case = np.flatnonzero(cum_k >= thr_k)
        thr_k[case] = cum_k[case] + rng.exponential(size=len(case))
        first = first_by_day.get(d)
        if first is not None:
            buy = np.concatenate([first, buy])
        if len(buy):
            day_buys = _draw_orders(rng, t, buy, d, p, n_first=0 if first is None else len(first))
            buys.append(day_buys)
            ret = day_buys["return_day"] >= 0
            for day, who in _split_by(day_buys["return_day"][ret], buy[ret]):
                returns_due.setdefault(int(day), []).append(who)
        cases *= gc
        rets *= gr
        if len(case):
            cases[case] += 1.0
            case_events.append((case, np.full(len(case), d, dtype=np.int32)))
        due = returns_due.pop(d, None)
        if due:
            np.add.at(rets, np.concatenate(due), 1.0)
    return SimResult(
        dropout_day=dropout,
        **_concat_buys(buys),
        case_idx=_cat([c[0] for c in case_events], np.int64),
        case_day=_cat([c[1] for c in case_events], np.int32),
    )


def _first_buyers_by_day(t: Traits, n_days: int) -> dict[int, np.ndarray]:
    """Persons whose account (and first purchase) falls on each simulated day."""
    idx = np.flatnonzero((t.lam > 0) & (t.entry_day >= 0) & (t.entry_day < n_days))
    return {int(day): who for day, who in _split_by(t.entry_day[idx], idx)}


def _draw_orders(
    rng: np.random.Generator, t: Traits, buyers: np.ndarray, d: int, p: ProcessParams, n_first: int
) -> dict[str, np.ndarray]:
    """Channel, cancellation and return of today's orders (returns only of valid orders)."""
    u = rng.random((5, len(buyers)))
    store = u[0] < t.store[buyers]
    channel = np.where(
        store, CH_STORE, np.where(u[1] < p.call_center_share, CH_CALL_CENTER, CH_ONLINE)
    ).astype(np.int8)
    cancelled = u[2] < np.where(store, p.void_pos, p.cancel_sales)
    returned = ~cancelled & (u[3] < t.return_prob[buyers])
    span = p.return_delay_max - p.return_delay_min + 1
    delay = p.return_delay_min + np.floor(u[4] * span).astype(np.int32)
    return {
        "buy_idx": buyers.astype(np.int64),
        "buy_day": np.full(len(buyers), d, dtype=np.int32),
        "buy_channel": channel,
        "buy_cancelled": cancelled,
        "buy_first": np.arange(len(buyers)) < n_first,
        "return_day": np.where(returned, d + delay, -1).astype(np.int32),
    }


def _concat_buys(buys: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = ("buy_idx", "buy_day", "buy_channel", "buy_cancelled", "buy_first")
    dtypes = (np.int64, np.int32, np.int8, bool, bool)
    out = {k: _cat([b[k] for b in buys], dt) for k, dt in zip(keys, dtypes, strict=True)}
    out["buy_return_day"] = _cat([b["return_day"] for b in buys], np.int32)
    return out


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def _split_by(keys: np.ndarray, values: np.ndarray):
    """(key, values with that key) pairs, keys ascending."""
    if not len(keys):
        return []
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    cuts = np.flatnonzero(np.diff(k)) + 1
    return zip(k[np.r_[0, cuts]], np.split(v, cuts), strict=True)
