"""Buy-till-you-die models: BG/NBD and Pareto/NBD fitted by maximum likelihood with scipy.

Why our own fits: these are the anchors a data scientist tries first on a purchase log, and
the maintained implementation (pymc-marketing) pulls PyMC while lifetimes is unmaintained.
The likelihoods are the published closed forms (Fader, Hardie & Lee 2005 for BG/NBD; Fader &
Hardie's notes on the Pareto/NBD), evaluated in log space. The tests pin the fits to the
published parameters on the CDNOW sample.

A customer is summarised at a cutoff by the repeat-purchase frequency x (distinct purchase
days after the first), the recency t_x (first to last purchase day) and the age T (first
purchase day to the cutoff), all in one time unit; nothing after the cutoff is read. Per
customer the fitted model gives P(alive) at the cutoff, the probability of no purchase in
the next w units, and the expected number of purchases in them.

Pareto/NBD's integrals are written as I(y; p, q) = ∫_y^∞ (α+τ)^-p (β+τ)^-q dτ, whose Gauss
hypergeometric form is taken through Euler's transformation to 2F1(1, ·; ·; z): its terms are
positive and it stays finite where the untransformed 2F1 overflows (large x, or α ≫ β).
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple, dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special

log = logging.getLogger(__name__)

FREQUENCY = "frequency"  # x: repeat purchase days
RECENCY = "recency"  # t_x: first to last purchase day
AGE = "age"  # T: first purchase day to the cutoff
_DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD: purchase rate λ ~ Gamma(r, α); dropout after each purchase with p ~ Beta(a, b)."""

    r: float
    alpha: float  # in the unit of the summary it was fitted on (scales with it)
    a: float
    b: float


@dataclass(frozen=True)
class ParetoNbdParams:
    """Pareto/NBD: purchase rate λ ~ Gamma(r, α); dropout rate μ ~ Gamma(s, β)."""

    r: float
    alpha: float  # in the unit of the summary it was fitted on (scales with it)
    s: float
    beta: float  # same unit as alpha


def summarise_purchases(
    purchases: pd.DataFrame,
    cutoff: pd.Timestamp,
    *,
    customer_col: str = "customer_id",
    ts_col: str = "ts",
    unit: pd.Timedelta = _DAY,
) -> pd.DataFrame:
    """Frequency, recency and age per customer from purchases at or before `cutoff`.

    Purchases are counted by UTC calendar day (several orders on one day are one purchase,
    as in the BTYD literature); the age runs from the start of the first purchase day to the
    cutoff itself. Customers without a purchase by the cutoff are absent.
    """
    for col in (customer_col, ts_col):
        if col not in purchases.columns:
            raise KeyError(f"summarise_purchases: purchases have no column {col!r}")
    cutoff = pd.Timestamp(cutoff)
    ts = pd.to_datetime(purchases[ts_col], utc=True)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    keep = (ts <= cutoff).to_numpy()
    days = ts[keep].dt.floor("D")
    frame = pd.DataFrame({"c": purchases[customer_col].to_numpy()[keep], "d": days.to_numpy()})
    frame = frame.drop_duplicates()
    grouped = frame.groupby("c", sort=True)["d"]
    first, last, n = grouped.min(), grouped.max(), grouped.size()
    first = first.dt.tz_localize("UTC") if first.dt.tz is None else first
    last = last.dt.tz_localize("UTC") if last.dt.tz is None else last
    out = pd.DataFrame(
        {
            FREQUENCY: (n - 1).astype(np.int64),
            RECENCY: (last - first) / unit,
            AGE: (cutoff - first) / unit,
        }
    )
    out.index.name = customer_col
    return out


def _check_summary(x: np.ndarray, t_x: np.ndarray, age: np.ndarray) -> None:
    if np.any(x < 0) or np.any(t_x < 0):
        raise ValueError("BTYD summary: frequency and recency must be >= 0")
    if np.any(t_x > age + 1e-9):
        raise ValueError("BTYD summary: recency exceeds age for some customer")
    if np.any((x == 0) & (t_x > 0)):
        raise ValueError("BTYD summary: a customer with frequency 0 has recency > 0")


def _arrays(x, t_x, age) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, t_x, age = (np.asarray(v, dtype=float) for v in (x, t_x, age))
    _check_summary(x, t_x, age)
    return x, t_x, age


# ---- BG/NBD -------------------------------------------------------------------------------


def bgnbd_log_likelihood(p: BgNbdParams, x, t_x, age) -> np.ndarray:
    """Per-customer log-likelihood (Fader, Hardie & Lee 2005, eq. 6), in log space."""
    x, t_x, age = np.asarray(x, float), np.asarray(t_x, float), np.asarray(age, float)
    r, alpha, a, b = p.r, p.alpha, p.a, p.b
    rx = r + x
    common = (
        special.gammaln(rx)
        - special.gammaln(r)
        + r * np.log(alpha)
        + special.betaln(a, b + x)
        - special.betaln(a, b)
    )
    alive = -rx * np.log(alpha + age)
    with np.errstate(divide="ignore", invalid="ignore"):
        died = np.where(
            x > 0,
            np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - rx * np.log(alpha + t_x),
            -np.inf,
        )
    return common + np.logaddexp(alive, died)


def _bgnbd_log_odds_dead(p: BgNbdParams, x, t_x, age) -> np.ndarray:
    """log(P(dead)/P(alive)); -inf for a customer who never repeated (BG/NBD keeps them alive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            x > 0,
            np.log(p.a)
            - np.log(np.maximum(p.b + x - 1, 1e-300))
            + (p.r + x) * (np.log(p.alpha + age) - np.log(p.alpha + t_x)),
            -np.inf,
        )


def bgnbd_predict(p: BgNbdParams, x, t_x, age, window: float) -> pd.DataFrame:
    """P(alive), P(no purchase in the next `window`) and expected purchases in it, per customer.

    Alive at the cutoff, a customer's posterior is λ ~ Gamma(r+x, α+T) and p ~ Beta(a, b+x),
    and a purchase must come before any dropout (BG/NBD drops out only after a purchase), so
    P(no purchase | alive) = ((α+T)/(α+T+w))^(r+x). The expectation is FHL 2005 eq. 10 with
    Euler's transformation of its 2F1 (no (α+T)^(r+x) factor to overflow).
    """
    x, t_x, age = _arrays(x, t_x, age)
    p_alive = special.expit(-_bgnbd_log_odds_dead(p, x, t_x, age))
    log_q = np.log(p.alpha + age) - np.log(p.alpha + age + window)
    p_buy_if_alive = -np.expm1((p.r + x) * log_q)
    z = window / (p.alpha + age + window)
    c = p.a + p.b + x - 1
    hyp = special.hyp2f1(p.a + p.b - 1 - p.r, p.a - 1, c, z)
    # (1 - (1-z)^(a-1) 2F1(...)) / (a - 1): a = 1 exactly is a removable singularity.
    a1 = p.a - 1 if abs(p.a - 1) > 1e-9 else 1e-9
    expected_if_alive = c / a1 * (1 - np.exp(a1 * np.log1p(-z)) * hyp)
    return pd.DataFrame(
        {
            "p_alive": p_alive,
            "p_no_purchase": 1 - p_alive * p_buy_if_alive,
            "expected_purchases": p_alive * expected_if_alive,
        }
    )


# ---- Pareto/NBD ---------------------------------------------------------------------------


def _log_tail_integral(alpha: float, beta: float, y, p, q) -> np.ndarray:
    """log I(y; p, q) = log ∫_y^∞ (α+τ)^-p (β+τ)^-q dτ, for p + q > 1.

    With the larger of α, β as the base, I = (base+y)^(1-p-q)/(p+q-1) · 2F1(p+q-1, q'; p+q; z),
    z = |α-β|/(base+y) in [0, 1); Euler's transformation turns the 2F1 into
    (1-z)^(1-q') 2F1(1, p'; p+q; z), where (p', q') are the exponents of (base, other).
    """
    y = np.asarray(y, float)
    p = np.broadcast_to(np.asarray(p, float), y.shape)
    q = np.broadcast_to(np.asarray(q, float), y.shape)
    if alpha >= beta:
        big, small, pb, qs = alpha, beta, p, q
    else:
        big, small, pb, qs = beta, alpha, q, p
    z = (big - small) / (big + y)
    return (
        -pb * np.log(big + y)
        + (1 - qs) * np.log(small + y)
        - np.log(p + q - 1)
        + np.log(special.hyp2f1(1.0, pb, p + q, z))
    )


def _log_diff(log_hi: np.ndarray, log_lo: np.ndarray) -> np.ndarray:
    """log(exp(log_hi) - exp(log_lo)) for log_hi >= log_lo (rounding clipped; equal -> -inf)."""
    with np.errstate(divide="ignore"):
        return log_hi + np.log1p(-np.exp(np.minimum(log_lo - log_hi, 0.0)))


def _pareto_terms(p: ParetoNbdParams, x, t_x, age) -> tuple[np.ndarray, np.ndarray]:
    """log of the alive-at-T and the dropped-out-in-(t_x, T] parts of the likelihood."""
    rx = p.r + x
    const = special.gammaln(rx) - special.gammaln(p.r) + p.r * np.log(p.alpha)
    const = const + p.s * np.log(p.beta)
    alive = const - rx * np.log(p.alpha + age) - p.s * np.log(p.beta + age)
    died = (
        const
        + np.log(p.s)
        + _log_diff(
            _log_tail_integral(p.alpha, p.beta, t_x, rx, p.s + 1),
            _log_tail_integral(p.alpha, p.beta, age, rx, p.s + 1),
        )
    )
    return alive, died


def pareto_nbd_log_likelihood(p: ParetoNbdParams, x, t_x, age) -> np.ndarray:
    """Per-customer log-likelihood: alive at T, or dropped out at some τ in (t_x, T]."""
    x, t_x, age = np.asarray(x, float), np.asarray(t_x, float), np.asarray(age, float)
    alive, died = _pareto_terms(p, x, t_x, age)
    return np.logaddexp(alive, died)


def pareto_nbd_predict(p: ParetoNbdParams, x, t_x, age, window: float) -> pd.DataFrame:
    """P(alive), P(no purchase in the next `window`) and expected purchases in it, per customer.

    Alive at T the posterior is λ ~ Gamma(r+x, α+T), μ ~ Gamma(s, β+T); a purchase in the
    window needs the first purchase before both the window's end and the dropout, so
    P(purchase | alive) = ∫_0^w E[λ e^-λu] E[e^-μu] du = (r+x)(α+T)^(r+x)(β+T)^s ·
    (I(T; r+x+1, s) - I(T+w; r+x+1, s)), the same integral as the likelihood's.
    """
    x, t_x, age = _arrays(x, t_x, age)
    alive, died = _pareto_terms(p, x, t_x, age)
    p_alive = np.exp(alive - np.logaddexp(alive, died))
    rx = p.r + x
    log_buy = (
        np.log(rx)
        + rx * np.log(p.alpha + age)
        + p.s * np.log(p.beta + age)
        + _log_diff(
            _log_tail_integral(p.alpha, p.beta, age, rx + 1, p.s),
            _log_tail_integral(p.alpha, p.beta, age + window, rx + 1, p.s),
        )
    )
    p_buy_if_alive = np.minimum(np.exp(log_buy), 1.0)
    # E[(1 - e^-μw)/μ] under Gamma(s, β+T); s = 1 is the logarithmic limit.
    log_q = np.log(p.beta + age) - np.log(p.beta + age + window)
    s1 = p.s - 1
    if abs(s1) > 1e-9:
        mean_life = (p.beta + age) * -np.expm1(s1 * log_q) / s1
    else:
        mean_life = (p.beta + age) * -log_q
    expected_if_alive = rx / (p.alpha + age) * mean_life
    return pd.DataFrame(
        {
            "p_alive": p_alive,
            "p_no_purchase": 1 - p_alive * p_buy_if_alive,
            "expected_purchases": p_alive * expected_if_alive,
        }
    )


# ---- fitting -------------------------------------------------------------------------------


def _distinct(x, t_x, age) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (x, t_x, T) rows with their counts: a log has far fewer than customers."""
    x, t_x, age = _arrays(x, t_x, age)
    if x.size == 0:
        raise ValueError("BTYD fit: no customers in the summary")
    rows, counts = np.unique(np.column_stack([x, t_x, age]), axis=0, return_counts=True)
    return rows[:, 0], rows[:, 1], rows[:, 2], counts.astype(float)


def _fit(loglik, cls, x, t_x, age, start: np.ndarray, scales: tuple[int, ...]) -> tuple:
    """Maximise the summed log-likelihood over log-parameters (all four are positive).

    Bounds keep the search finite: where the data show no heterogeneity or no dropout the
    likelihood's supremum lies at infinity (r, α -> ∞ at a fixed r/α; s -> 0), and an
    unbounded search walks there for thousands of steps. Shapes stay in [e^-9, e^9]; scales
    (α, β, positions `scales`) within e^±12 of the mean age; at a bound, the fit is the limit.
    """
    xs, ts, ages, w = _distinct(x, t_x, age)
    n = w.sum()
    mid = np.log(max(float(np.mean(ages)), 1e-6))
    bounds = [(mid - 12, mid + 12) if i in scales else (-9.0, 9.0) for i in range(4)]
    theta0 = np.clip(np.log(start), [b[0] for b in bounds], [b[1] for b in bounds])

    def nll(theta: np.ndarray) -> float:
        params = cls(*np.exp(theta))
        with np.errstate(all="ignore"):
            value = -(w * loglik(params, xs, ts, ages)).sum() / n
        return float(value) if np.isfinite(value) else 1e10

    best = optimize.minimize(
        nll, theta0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000}
    )
    # Nelder-Mead from L-BFGS-B's point: the finite-difference gradient stalls on flat ridges.
    polish = optimize.minimize(
        nll,
        best.x,
        method="Nelder-Mead",
        bounds=bounds,
        options={"xatol": 1e-7, "fatol": 1e-11, "maxiter": 4000},
    )
    if polish.fun <= best.fun:
        best = polish
    params = cls(*(float(v) for v in np.exp(best.x)))
    if not np.isfinite(best.fun) or best.fun >= 1e10:
        raise RuntimeError(f"BTYD fit of {cls.__name__} did not converge: {best.message}")
    log.debug("%s fitted: %s (mean -loglik %.6f)", cls.__name__, params, best.fun)
    return params, -best.fun * n


def fit_bgnbd(x, t_x, age, start: BgNbdParams | None = None) -> BgNbdParams:
    """Maximum-likelihood BG/NBD parameters for a population's (x, t_x, T)."""
    start = start or BgNbdParams(1.0, float(np.mean(age)) or 1.0, 1.0, 1.0)
    args = (x, t_x, age, np.array(astuple(start)), (1,))
    return _fit(bgnbd_log_likelihood, BgNbdParams, *args)[0]


def fit_pareto_nbd(x, t_x, age, start: ParetoNbdParams | None = None) -> ParetoNbdParams:
    """Maximum-likelihood Pareto/NBD parameters for a population's (x, t_x, T)."""
    scale = float(np.mean(age)) or 1.0
    start = start or ParetoNbdParams(1.0, scale, 1.0, scale)
    args = (x, t_x, age, np.array(astuple(start)), (1, 3))
    return _fit(pareto_nbd_log_likelihood, ParetoNbdParams, *args)[0]


# ---- per-cutoff features --------------------------------------------------------------------

BTYD_FEATURES = (
    "bgnbd_p_alive",
    "bgnbd_p_no_purchase",
    "bgnbd_expected_purchases",
    "pareto_nbd_p_alive",
    "pareto_nbd_p_no_purchase",
    "pareto_nbd_expected_purchases",
    "purchase_days_per_30d_tenure",  # (x + 1) per 30 days since the first purchase day
    "recency_over_tenure",  # t_x / T: 1 = bought lately relative to how long they have been here
)


@dataclass(frozen=True)
class BtydFit:
    """Both models fitted on one population's purchase days at one cutoff."""

    bgnbd: BgNbdParams
    pareto_nbd: ParetoNbdParams
    customers: int  # customers the fits saw
    seconds: float  # wall time of the two fits


def fit_population(summary: pd.DataFrame) -> BtydFit:
    """BG/NBD and Pareto/NBD fitted on a population's `summarise_purchases` (in days)."""
    started = time.perf_counter()
    x, t_x, age = (summary[c].to_numpy(float) for c in (FREQUENCY, RECENCY, AGE))
    bg, pn = fit_bgnbd(x, t_x, age), fit_pareto_nbd(x, t_x, age)
    return BtydFit(bg, pn, len(summary), time.perf_counter() - started)


def predict_population(fit: BtydFit, summary: pd.DataFrame, window_days: int) -> pd.DataFrame:
    """`BTYD_FEATURES` (float64) per customer of `summary` (its index) from fitted models."""
    x, t_x, age = (summary[c].to_numpy(float) for c in (FREQUENCY, RECENCY, AGE))
    out = pd.DataFrame(index=summary.index)
    for prefix, pred in (
        ("bgnbd", bgnbd_predict(fit.bgnbd, x, t_x, age, float(window_days))),
        ("pareto_nbd", pareto_nbd_predict(fit.pareto_nbd, x, t_x, age, float(window_days))),
    ):
        for col in pred.columns:
            out[f"{prefix}_{col}"] = pred[col].to_numpy()
    tenure = np.maximum(age, 1.0)  # a first purchase on the cutoff's day: one day's tenure
    out["purchase_days_per_30d_tenure"] = (x + 1) * 30.0 / tenure
    out["recency_over_tenure"] = t_x / tenure
    return out[list(BTYD_FEATURES)]


def btyd_features(
    purchases: pd.DataFrame,
    cutoffs: list[pd.Timestamp],
    window_days: int,
    *,
    customer_col: str = "customer_id",
    ts_col: str = "ts",
) -> pd.DataFrame:
    """BG/NBD and Pareto/NBD quantities per customer at each cutoff, plus tenure ratios.

    At each cutoff t both models are fitted afresh on every customer's purchase days up to t
    (unsupervised: no label is read), in days, and predict for the window (t, t + w]. So a
    row at t depends on purchases at or before t only, as every feature must.
    Returns customer_id, cutoff_time and `BTYD_FEATURES`, for customers with a purchase by t.
    """
    frames = []
    for cutoff in cutoffs:
        summary = summarise_purchases(purchases, cutoff, customer_col=customer_col, ts_col=ts_col)
        if summary.empty:
            continue
        fit = fit_population(summary)
        out = predict_population(fit, summary, window_days).reset_index()
        out.insert(1, "cutoff_time", pd.Timestamp(cutoff))
        log.info("BTYD at %s: %d customers, %s", cutoff, len(out), fit)
        frames.append(out[[customer_col, "cutoff_time", *BTYD_FEATURES]])
    if not frames:
        return pd.DataFrame(columns=[customer_col, "cutoff_time", *BTYD_FEATURES])
    return pd.concat(frames, ignore_index=True)


# ---- as candidate features of a FeatureSet ----------------------------------------------------
#
# The spec's `btyd: {enabled: true}` adds BTYD_FEATURES to the candidates; the FeatureSet
# carries which of them it keeps and the window under META_KEY. At a cutoff t (training's
# and scoring's alike) both models are refitted on the purchase days up to t of the
# population the features are computed for (the active population at t, or training's
# sample of it): unsupervised, so refitting at scoring uses no label, and the same
# population gives the same values whoever computes them. The refresh, which computes
# features a chunk of customers at a time, fits once on every chunk's purchase summaries
# (never per chunk: the values would depend on the chunking).

META_KEY = "btyd"  # FeatureSet.meta key: {"names": [...], "window_days": w, "fit": ...}
FIT_POPULATION = "the population the features are computed for at the cutoff, purchase days <= t"


def to_meta(window_days: int, names: list[str] | tuple[str, ...] = BTYD_FEATURES) -> dict:
    """What a FeatureSet carries for its BTYD features."""
    return {"names": list(names), "window_days": int(window_days), "fit": FIT_POPULATION}


def feature_names(meta: dict) -> list[str]:
    """The BTYD features a FeatureSet's meta carries (none without the section)."""
    return list((meta.get(META_KEY) or {}).get("names", []))


def purchase_days_sql(epoch_us) -> str:
    """Distinct (customer_id, UTC purchase day as days since the epoch) of the as-of view's
    `orders` relation (is_purchase at the view's cutoff, order_ts <= it). `epoch_us`: the
    dialect's spelling (`Dialect.epoch_us`)."""
    day = f"CAST(FLOOR({epoch_us('order_ts')} / 86400000000) AS BIGINT)"
    return f"SELECT DISTINCT customer_id, {day} AS day FROM orders WHERE is_purchase"


def days_as_purchases(days: pd.DataFrame) -> pd.DataFrame:
    """`purchase_days_sql` rows as customer_id, ts (the day's midnight, UTC)."""
    ts = pd.to_datetime(days["day"].to_numpy(np.int64) * 86_400, unit="s", utc=True)
    return pd.DataFrame({"customer_id": days["customer_id"].to_numpy(object), "ts": ts})


def population_features(
    summary: pd.DataFrame,
    ids: pd.Index,
    names: list[str],
    window_days: int,
    fit: BtydFit | None = None,
) -> tuple[pd.DataFrame, BtydFit | None]:
    """`names` (float32) of `ids` from the population's `summary`, indexed like ids, and the
    fit used: `fit`, or one made on `summary` (the customers of `ids` that have a purchase).
    A customer without a purchase by the cutoff has missing values."""
    summary = summary[summary.index.isin(ids)]
    out = pd.DataFrame(index=pd.Index(ids, name="customer_id"))
    if summary.empty:
        for name in names:
            out[name] = np.float32(np.nan)
        return out, fit
    fit = fit or fit_population(summary)
    values = predict_population(fit, summary, window_days).reindex(out.index)
    for name in names:
        out[name] = values[name].to_numpy(dtype=np.float32)
    return out, fit
