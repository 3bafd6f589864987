"""BG/NBD and Pareto/NBD fits: pinned to the published CDNOW figures, checked by simulation.

The CDNOW sample (2,357 customers of the Q1-1997 cohort, in weeks, calibration to 1997-09-30)
is read from the lifetimes wheel's files (a dev dependency for its data only; it is never
imported). Published figures have three decimals, so 0.243 stands for [0.2425, 0.2435]:
a relative tolerance of 3e-3 covers that rounding (2e-3 on the smallest, r) plus the
optimiser's stopping tolerance, and a wrong likelihood moves the estimates by far more.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pandas as pd
import pytest
from scipy import integrate

from c360ml.features import btyd
from c360ml.features.btyd import BgNbdParams, ParetoNbdParams


def _cdnow() -> pd.DataFrame:
    try:
        dist = importlib.metadata.distribution("lifetimes")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("lifetimes is not installed: `make install` installs the dev extra")
    return pd.read_csv(dist.locate_file("lifetimes/datasets/cdnow_customers_summary.csv"))


@pytest.fixture(scope="module")
def cdnow() -> pd.DataFrame:
    data = _cdnow()
    assert len(data) == 2357
    return data


@pytest.fixture(scope="module")
def bg(cdnow) -> BgNbdParams:
    return btyd.fit_bgnbd(cdnow["frequency"], cdnow["recency"], cdnow["T"])


@pytest.fixture(scope="module")
def pareto(cdnow) -> ParetoNbdParams:
    return btyd.fit_pareto_nbd(cdnow["frequency"], cdnow["recency"], cdnow["T"])


def test_bgnbd_fit_matches_published_cdnow(bg, cdnow):
    # Fader, Hardie & Lee (2005): r, α, a, b = 0.243, 4.414, 0.793, 2.426; LL = -9582.4.
    assert bg.r == pytest.approx(0.243, rel=3e-3)
    assert bg.alpha == pytest.approx(4.414, rel=3e-3)
    assert bg.a == pytest.approx(0.793, rel=3e-3)
    assert bg.b == pytest.approx(2.426, rel=3e-3)
    ll = btyd.bgnbd_log_likelihood(bg, cdnow["frequency"], cdnow["recency"], cdnow["T"]).sum()
    assert ll == pytest.approx(-9582.4, abs=0.1)


def test_pareto_nbd_fit_matches_published_cdnow(pareto, cdnow):
    # Fader & Hardie's Pareto/NBD note: r, α, s, β = 0.553, 10.578, 0.606, 11.669; LL = -9595.0.
    assert pareto.r == pytest.approx(0.553, rel=3e-3)
    assert pareto.alpha == pytest.approx(10.578, rel=3e-3)
    assert pareto.s == pytest.approx(0.606, rel=3e-3)
    assert pareto.beta == pytest.approx(11.669, rel=3e-3)
    freq, rec, age = cdnow["frequency"], cdnow["recency"], cdnow["T"]
    ll = btyd.pareto_nbd_log_likelihood(pareto, freq, rec, age).sum()
    assert ll == pytest.approx(-9595.0, abs=0.1)


def test_bgnbd_conditional_expectation_published(bg):
    # FHL 2005 §5: x=2, t_x=30.43, T=38.86 expects 1.226 purchases in the next 39 weeks.
    out = btyd.bgnbd_predict(bg, [2], [30.43], [38.86], window=39.0)
    assert out["expected_purchases"].iloc[0] == pytest.approx(1.226, abs=2e-3)


def test_one_time_buyer_by_hand(bg, pareto):
    t_age, w = 30.0, 13.0
    out = btyd.bgnbd_predict(bg, [0], [0.0], [t_age], window=w)
    # BG/NBD: never repeated -> alive; P(no purchase) = ((α+T)/(α+T+w))^r.
    assert out["p_alive"].iloc[0] == 1.0
    expected = ((bg.alpha + t_age) / (bg.alpha + t_age + w)) ** bg.r
    assert out["p_no_purchase"].iloc[0] == pytest.approx(expected, rel=1e-12)
    # E[Y(w)] for a never-repeater, from the paper's (α+T)^(r+x) form of eq. 10 directly.
    from scipy import special

    z = w / (bg.alpha + t_age + w)
    direct = (
        (bg.a + bg.b - 1)
        / (bg.a - 1)
        * (1 - (1 - z) ** bg.r * special.hyp2f1(bg.r, bg.b, bg.a + bg.b - 1, z))
    )
    assert out["expected_purchases"].iloc[0] == pytest.approx(direct, rel=1e-10)

    # Pareto/NBD, x = 0: P(alive) by integrating over λ and μ numerically (no 2F1 involved).
    p = pareto
    out = btyd.pareto_nbd_predict(p, [0], [0.0], [t_age], window=w)
    alive = (p.alpha / (p.alpha + t_age)) ** p.r * (p.beta / (p.beta + t_age)) ** p.s
    # dropped out at τ in (0, T]: ∫ (α/(α+τ))^r s β^s (β+τ)^-(s+1) dτ
    died, _ = integrate.quad(
        lambda tau: (
            (p.alpha / (p.alpha + tau)) ** p.r * p.s * p.beta**p.s / (p.beta + tau) ** (p.s + 1)
        ),
        0.0,
        t_age,
        epsabs=0,
        epsrel=1e-12,
    )
    assert out["p_alive"].iloc[0] == pytest.approx(alive / (alive + died), rel=1e-9)


@pytest.mark.parametrize(
    "params",
    [
        ParetoNbdParams(0.553, 10.578, 0.606, 11.669),
        ParetoNbdParams(2.0, 1e5, 0.8, 3.0),  # α ≫ β: the untransformed 2F1 misbehaves here
        ParetoNbdParams(1.5, 2.0, 3.0, 5e4),  # β ≫ α
        ParetoNbdParams(0.5, 7.0, 1.0, 7.0),  # α = β, s = 1
    ],
)
@pytest.mark.parametrize("x,t_x,age", [(0, 0.0, 40.0), (3, 20.0, 40.0), (60, 39.0, 40.0)])
def test_pareto_nbd_against_quadrature(params, x, t_x, age):
    p, w = params, 13.0
    rx = p.r + x
    # Everything divided by the alive-at-T term, so large x does not underflow.
    alive_scale = rx * np.log(p.alpha + age) + p.s * np.log(p.beta + age)

    def died_density(tau):
        log = alive_scale - rx * np.log(p.alpha + tau) - (p.s + 1) * np.log(p.beta + tau)
        return p.s * np.exp(log)

    died = integrate.quad(died_density, t_x, age, epsabs=0, epsrel=1e-11, limit=200)[0]
    p_alive = 1.0 / (1.0 + died)

    def buy_density(u):
        a_, b_ = p.alpha + age, p.beta + age
        return rx / (a_ + u) * (a_ / (a_ + u)) ** rx * (b_ / (b_ + u)) ** p.s

    p_buy = integrate.quad(buy_density, 0.0, w, epsabs=0, epsrel=1e-11, limit=200)[0]
    out = btyd.pareto_nbd_predict(p, [x], [t_x], [age], window=w)
    assert out["p_alive"].iloc[0] == pytest.approx(p_alive, rel=1e-7)
    assert out["p_no_purchase"].iloc[0] == pytest.approx(1 - p_alive * p_buy, rel=1e-7, abs=1e-12)
    ll = btyd.pareto_nbd_log_likelihood(p, [x], [t_x], [age])[0]
    assert np.isfinite(ll)


def _simulate(model: str, params, ages: np.ndarray, window: float, rng) -> pd.DataFrame:
    """Purchase histories drawn from the model: summary at T and the count in (T, T+w]."""
    n = ages.size
    lam = rng.gamma(params.r, 1.0 / params.alpha, n)
    end = ages + window
    if model == "bg":
        drop = rng.beta(params.a, params.b, n)
        death = np.full(n, np.inf)
    else:
        death = rng.exponential(1.0 / rng.gamma(params.s, 1.0 / params.beta, n))
    x, t_x, future = np.zeros(n), np.zeros(n), np.zeros(n)
    now, alive = np.zeros(n), np.ones(n, bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        now[idx] += rng.exponential(1.0 / lam[idx])
        stop = (now[idx] > end[idx]) | (now[idx] > death[idx])
        alive[idx[stop]] = False
        buy = idx[~stop]
        past = now[buy] <= ages[buy]
        x[buy[past]] += 1
        t_x[buy[past]] = now[buy[past]]
        future[buy[~past]] += 1
        if model == "bg":
            alive[buy[rng.random(buy.size) < drop[buy]]] = False
    return pd.DataFrame({"x": x, "t_x": t_x, "age": ages, "future": future})


@pytest.mark.parametrize("model", ["bg", "pareto"])
def test_predictions_match_simulation(model, bg, pareto):
    """Monte Carlo from the fitted model: the predictions are calibrated, overall and by x."""
    rng = np.random.default_rng(7)
    params, predict = (
        (bg, btyd.bgnbd_predict) if model == "bg" else (pareto, btyd.pareto_nbd_predict)
    )
    window = 13.0
    sim = _simulate(model, params, rng.uniform(20.0, 60.0, 200_000), window, rng)
    pred = predict(params, sim["x"], sim["t_x"], sim["age"], window=window)
    none = (sim["future"] == 0).to_numpy()
    for mask in (np.ones(len(sim), bool), sim["x"] == 0, sim["x"].between(1, 3), sim["x"] >= 4):
        mask = np.asarray(mask)
        observed = none[mask].mean()
        se = np.sqrt(observed * (1 - observed) / mask.sum())
        assert pred["p_no_purchase"][mask].mean() == pytest.approx(observed, abs=4 * se + 1e-3)
        fut = sim["future"][mask]
        se_mean = fut.std() / np.sqrt(mask.sum())
        assert pred["expected_purchases"][mask].mean() == pytest.approx(
            fut.mean(), abs=4 * se_mean + 1e-3
        )
    # A wrong P(alive) would not be calibrated: those predicted mostly dead rarely buy.
    dead = (pred["p_alive"] < 0.3).to_numpy()
    assert dead.sum() > 1000
    assert (~none[dead]).mean() < 0.15


def test_summarise_purchases_by_day_up_to_cutoff():
    ts = pd.to_datetime(
        [
            "2024-01-01 09:00",
            "2024-01-01 18:00",
            "2024-01-08 10:00",
            "2024-01-30 00:00",
            "2024-01-05 00:00",
        ],
        utc=True,
    )
    purchases = pd.DataFrame({"customer_id": ["A", "A", "A", "A", "B"], "ts": ts})
    out = btyd.summarise_purchases(purchases, pd.Timestamp("2024-01-15", tz="UTC"))
    # A: two orders on 1 Jan are one purchase day; 30 Jan is after the cutoff.
    assert out.loc["A"].tolist() == [1, 7.0, 14.0]
    assert out.loc["B"].tolist() == [0, 0.0, 10.0]
    weeks = btyd.summarise_purchases(
        purchases, pd.Timestamp("2024-01-15", tz="UTC"), unit=pd.Timedelta(weeks=1)
    )
    assert weeks.loc["A", btyd.AGE] == pytest.approx(2.0)


def test_bad_summaries_are_refused():
    with pytest.raises(ValueError, match="recency exceeds age"):
        btyd.bgnbd_predict(BgNbdParams(1, 1, 1, 1), [1], [5.0], [4.0], window=1.0)
    with pytest.raises(ValueError, match="frequency 0 has recency > 0"):
        btyd.fit_pareto_nbd([0, 1], [2.0, 1.0], [3.0, 3.0])
    with pytest.raises(KeyError, match="no column 'ts'"):
        btyd.summarise_purchases(pd.DataFrame({"customer_id": []}), pd.Timestamp("2024-01-01"))


def test_btyd_features_per_cutoff_read_nothing_after_it():
    rng = np.random.default_rng(3)
    n = 400
    start = pd.Timestamp("2024-01-01", tz="UTC")
    purchases = pd.DataFrame(
        {
            "customer_id": [f"c{i % 80}" for i in range(n)],
            "ts": start + pd.to_timedelta(rng.integers(0, 360, n), "D"),
        }
    )
    cutoffs = [start + pd.Timedelta(days=120), start + pd.Timedelta(days=240)]
    out = btyd.btyd_features(purchases, cutoffs, 30)
    assert list(out.columns) == ["customer_id", "cutoff_time", *btyd.BTYD_FEATURES]
    # Uniform buyers who never drop out: the MLE lies at infinity (no heterogeneity, no
    # dropout); the bounded fit stops at a bound and its predictions stay proper.
    values = out[list(btyd.BTYD_FEATURES)].to_numpy(float)
    assert np.isfinite(values).all()
    probabilities = out.filter(regex="p_alive|p_no_purchase").to_numpy(float)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    first = out[out.cutoff_time == cutoffs[0]].set_index("customer_id")
    # Only customers with a purchase by the cutoff; the row equals a fit on that history alone.
    assert set(first.index) == set(purchases[purchases.ts <= cutoffs[0]].customer_id)
    summary = btyd.summarise_purchases(purchases, cutoffs[0])
    args = [summary[c] for c in (btyd.FREQUENCY, btyd.RECENCY, btyd.AGE)]
    pred = btyd.bgnbd_predict(btyd.fit_bgnbd(*args), *args, window=30.0)
    np.testing.assert_allclose(first.loc[summary.index, "bgnbd_p_alive"], pred["p_alive"])
    np.testing.assert_allclose(
        first.loc[summary.index, "recency_over_tenure"], summary[btyd.RECENCY] / summary[btyd.AGE]
    )
    # Changing purchases after the first cutoff leaves its rows unchanged (no leakage).
    later = purchases.ts > cutoffs[0]
    moved = purchases.assign(ts=purchases.ts.where(~later, purchases.ts + pd.Timedelta(days=3)))
    again = btyd.btyd_features(moved, cutoffs[:1], 30).set_index("customer_id")
    pd.testing.assert_frame_equal(again.loc[first.index], first)
