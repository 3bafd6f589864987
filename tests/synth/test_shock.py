"""A regime change carried by an increment (`generate --increment --shock DATE:KIND`): the
past stays as published, exposed store customers drop out sooner from DATE, what they no
longer do is gone from truth and landing, and the oracle knows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from c360ml.cli import main
from c360ml.synth import generate_increment, generate_lake, oracle
from c360ml.synth.params import SHOCKS
from c360ml.synth.shock import parse_shock
from tests.synth.conftest import make_settings

SHOCK = "2026-01-01"  # the first increment's first day (history ends 2025-12-31)
T = pd.Timestamp(SHOCK, tz="UTC")


def _lake(root: Path, shock: str | None):
    settings = make_settings(root)
    generate_lake(settings, customers=3000, seed=5, future_days=365)
    generate_increment(settings, shock=shock)
    return settings


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same seed twice: without and with a competitor opening on the shock day."""
    base = _lake(tmp_path_factory.mktemp("no_shock"), None)
    shocked = _lake(tmp_path_factory.mktemp("shock"), f"{SHOCK}:competitor")
    truths = [oracle.load_truth(s.truth, include_pending=True) for s in (base, shocked)]
    return base, shocked, truths


def _meta(settings) -> dict:
    return json.loads((settings.truth / "generator.json").read_text())


def test_the_shock_changes_only_the_future_of_exposed_persons(pair):
    base, shocked, (tb, ts) = pair
    entry = _meta(shocked)["shocks"][0]
    assert entry["kind"] == "competitor" and entry["date"] == SHOCK and entry["increment"] == 1
    day = entry["day"]
    exposure = pd.read_parquet(shocked.truth / "shocks.parquet").set_index("person_id")
    assert len(exposure) == entry["exposed"] > 0
    db = tb["persons"].set_index("person_id").dropout_day.fillna(np.inf)
    ds = ts["persons"].set_index("person_id").dropout_day.fillna(np.inf)
    exposed = db.index.isin(exposure.index)
    assert (ds[~exposed] == db[~exposed]).all()  # nobody else is touched
    assert (ds <= db).all() and (ds[db < day] == db[db < day]).all()  # the past stays
    earlier = ds < db
    assert earlier.sum() == entry["dropouts_brought_forward"] > 50
    assert (ds[earlier] >= day).all()
    # Purchases before the shock are the same rows; after it, nothing by the dropped.
    pb, ps = tb["purchases"], ts["purchases"]
    assert _before(ps, T).equals(_before(pb, T))
    first = pd.Timestamp(_meta(shocked)["start"], tz="UTC")

    def day_of(ts: pd.Series) -> np.ndarray:
        return ((ts - first) // pd.Timedelta(days=1)).to_numpy()

    assert not (~ps.is_return & (day_of(ps.ts) >= ps.person_id.map(ds))).any()
    cases = ts["cases"]
    assert not (day_of(cases.ts) >= cases.person_id.map(ds)).any()
    # The withdrawn orders left no row in the published increment or the parked future.
    gone = set(pb.order_id.dropna()) - set(ps.order_id.dropna())
    assert len(gone) == entry["purchases_withdrawn"] > 100
    ids = {o.split("-", 1)[1] if o.startswith("SO:") else o[4:] for o in gone}
    sync = shocked.lake / "landing" / "d365" / _meta(shocked)["syncs"][-1]
    text = "".join(f.read_text() for f in sync.rglob("*.csv"))
    pending = shocked.truth / "_pending"
    for name, column in (("salestable", "salesid"), ("retailtransactiontable", "transactionid")):
        left = set(pd.read_parquet(pending / f"{name}.parquet", columns=[column])[column])
        assert not left & ids, name
    assert not any(i in text for i in ids)


def test_exposed_store_customers_drop_out_sooner(pair):
    base, shocked, (tb, ts) = pair
    day = _meta(shocked)["shocks"][0]["day"]
    persons = tb["persons"].set_index("person_id")
    exposure = pd.read_parquet(shocked.truth / "shocks.parquet").set_index("person_id")
    alive = persons[(persons.entry_day < day) & ~(persons.dropout_day < day)]
    store = alive[alive.index.isin(exposure.index) & (alive.store > 0.5)].index

    def gone_in_six_months(truth) -> float:
        d = truth["persons"].set_index("person_id").dropout_day.reindex(store)
        return float((d < day + 182).mean())

    # A store-heavy customer's hazard is at least exp(2.5 * 0.5) = 3.5 times its own.
    assert gone_in_six_months(ts) > 2 * gone_in_six_months(tb) > 0


def test_the_oracle_knows_the_shock(pair):
    """Same persons, same history before the shock: the oracle that knows it expects fewer
    purchases in the next 90 days from the exposed, the same from everyone else, and the
    drop it expects matches the drop that happened."""
    base, shocked, (tb, ts) = pair
    persons = tb["persons"]
    vb, vs = oracle.valid_purchases(tb["purchases"]), oracle.valid_purchases(ts["purchases"])
    recent = vb[(vb.ts < T) & (vb.ts >= T - pd.Timedelta(days=90))].person_id.unique()
    ids = persons.person_id[persons.person_id.isin(recent)].to_numpy()
    exposure = pd.read_parquet(shocked.truth / "shocks.parquet").set_index("person_id")
    extra = exposure.log_hazard.reindex(ids).fillna(0.0).to_numpy()
    knows = oracle.oracle_purchase_probability(shocked.truth, ids, T, 90)
    blind = oracle.oracle_purchase_probability(base.truth, ids, T, 90)
    assert np.allclose(knows[extra == 0], blind[extra == 0])
    hit = extra > 0.5
    assert hit.sum() > 200 and (knows[hit] < blind[hit]).all()

    def bought(v) -> np.ndarray:
        window = v[(v.ts >= T) & (v.ts < T + pd.Timedelta(days=90))]
        return np.isin(ids[hit], window.person_id.unique())

    realised_drop = bought(vb).mean() - bought(vs).mean()
    expected_drop = blind[hit].mean() - knows[hit].mean()
    assert expected_drop > 0.02 and realised_drop > 0.02
    assert abs(realised_drop - expected_drop) < 0.03


@pytest.fixture(scope="module")
def recession(pair, tmp_path_factory):
    """The same seed as `pair`, a recession from the shock day instead of a competitor."""
    shocked = _lake(tmp_path_factory.mktemp("recession"), f"{SHOCK}:recession")
    return shocked, oracle.load_truth(shocked.truth, include_pending=True)


def test_a_recession_reaches_everyone_from_its_day_and_not_before(pair, recession):
    """Everyone is exposed; before the day nothing differs; from it, dropouts only come
    sooner, and orders that would not be returned thin out by about the declared factor
    while every returned order (and its return) is still there."""
    (_, _, (tb, _)), (shocked, ts) = pair, recession
    kind, entry = SHOCKS["recession"], _meta(shocked)["shocks"][0]
    day = entry["day"]
    assert entry["kind"] == "recession" and entry["regions"] is None
    assert entry["purchase_factor"] == kind.purchase_factor < 1 < kind.hazard_factor
    exposure = pd.read_parquet(shocked.truth / "shocks.parquet")
    assert len(exposure) == entry["exposed"] == len(tb["persons"])
    assert np.allclose(exposure.log_hazard, np.log(kind.hazard_factor))
    db = tb["persons"].set_index("person_id").dropout_day.fillna(np.inf)
    ds = ts["persons"].set_index("person_id").dropout_day.fillna(np.inf)
    assert (ds <= db).all() and (ds[db < day] == db[db < day]).all()
    assert (ds < db).sum() == entry["dropouts_brought_forward"] > 30
    pb, ps = tb["purchases"], ts["purchases"]
    assert _before(ps, T).equals(_before(pb, T))
    # Orders after the day by persons alive in both lakes over the next 180 days.
    stay = db.index[(ds >= day + 180).to_numpy()]
    window = (T, T + pd.Timedelta(days=180))

    def orders(frame) -> pd.DataFrame:
        hit = frame.ts.between(*window, inclusive="left") & ~frame.is_return
        return frame[hit & frame.person_id.isin(stay)]

    returned = set(pb.origin_order_id[pb.is_return].dropna())
    before, after = orders(pb), orders(ps)
    kept = before.order_id.isin(returned)
    assert kept.sum() > 50 and before.order_id[kept].isin(after.order_id).all()
    assert set(after.order_id) <= set(before.order_id)  # thinned, never invented
    others = before[~kept]
    share = others.order_id.isin(after.order_id).mean()
    sd = np.sqrt(kind.purchase_factor * (1 - kind.purchase_factor) / len(others))
    assert len(others) > 2000 and abs(share - kind.purchase_factor) < 4 * sd, share
    assert entry["purchases_skipped"] > 0
    # what went is gone from the source rows too
    gone = set(pb.order_id[pb.ts >= T]) - set(ps.order_id)
    ids = {o.split("-", 1)[1] if o.startswith("SO:") else o[4:] for o in gone}
    pending = shocked.truth / "_pending"
    for name, column in (("salestable", "salesid"), ("retailtransactiontable", "transactionid")):
        left = set(pd.read_parquet(pending / f"{name}.parquet", columns=[column])[column])
        assert not left & ids, name


def test_the_oracle_knows_the_recession(pair, recession):
    """The oracle that knows the recession expects fewer purchases from everyone in the
    next 90 days, and the drop it expects is the drop that happened (the same persons, the
    same history, the shock the only difference)."""
    (base, _, (tb, _)), (shocked, ts) = pair, recession
    vb, vs = oracle.valid_purchases(tb["purchases"]), oracle.valid_purchases(ts["purchases"])
    recent = vb[(vb.ts < T) & (vb.ts >= T - pd.Timedelta(days=90))].person_id.unique()
    ids = np.sort(recent)
    knows = oracle.oracle_purchase_probability(shocked.truth, ids, T, 90)
    blind = oracle.oracle_purchase_probability(base.truth, ids, T, 90)
    assert len(ids) > 800 and (knows < blind).all()

    def bought(v) -> np.ndarray:
        window = v[(v.ts >= T) & (v.ts < T + pd.Timedelta(days=90))]
        return np.isin(ids, window.person_id.unique())

    realised_drop = bought(vb).mean() - bought(vs).mean()
    expected_drop = blind.mean() - knows.mean()
    assert expected_drop > 0.03 and realised_drop > 0.03
    assert abs(realised_drop - expected_drop) < 0.025, (realised_drop, expected_drop)
    # calibrated where it counts: the recession lake's outcomes against its oracle
    assert abs(bought(vs).mean() - knows.mean()) < 0.025


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-01",
        "2026-02-30:competitor",
        "2026-03-01:meteor",
        "competitor:2026-03-01",
        "2026-03-01:recession*0",
        "2026-03-01:recession*x",
    ],
)
def test_a_malformed_shock_names_the_option_and_the_form(text):
    with pytest.raises(ValueError, match=r"--shock expects DATE:KIND .*e\.g\. 2026-03-01:"):
        parse_shock(text)


def test_a_severity_scales_the_shock_on_the_log_scale():
    date, kind = parse_shock("2026-03-01:recession*3")
    assert date == "2026-03-01" and kind.name == "recession*3"
    assert kind.hazard_factor == pytest.approx(1.5**3)
    assert kind.purchase_factor == pytest.approx(0.8**3)
    assert parse_shock("2026-03-01:competitor*2")[1].beta_store == pytest.approx(5.0)
    assert parse_shock("2026-03-01:recession")[1] is parse_shock("2026-03-01:recession*1")[1]


def test_a_shock_cannot_rewrite_what_was_published(tmp_path, capsys):
    settings = make_settings(tmp_path)
    generate_lake(settings, customers=200, seed=3)
    generate_increment(settings)  # published up to 2026-01-08
    with pytest.raises(ValueError, match="before this increment's first day 2026-01-08"):
        generate_increment(settings, shock="2026-01-05:competitor")
    assert len(_meta(settings)["increments"]) == 1 and "shocks" not in _meta(settings)
    assert set(SHOCKS) == {"competitor", "recession"}
    code = main(["generate", "--shock", "2026-03-01:competitor"])
    out = capsys.readouterr().out
    assert code == 2 and "error: --shock needs --increment" in out


def test_an_increment_erasing_a_contact_only_person(tmp_path):
    """A person known only to Dataverse has no Commerce account to delete; the increment
    that erases one must still be written (it stopped with a pandas error before)."""
    settings = make_settings(tmp_path)
    generate_lake(settings, customers=1000, seed=42, future_days=120)
    persons = pd.read_parquet(settings.truth / "persons.parquet").set_index("person_id")
    for _ in range(15):
        generate_increment(settings)
        erased = pd.read_parquet(settings.truth / "erased.parquet").person_id
        if (persons.kind.reindex(erased) == "contact_only").any():
            break
    assert (persons.kind.reindex(erased) == "contact_only").any()
    assert len(_meta(settings)["increments"]) <= 15


def _before(purchases: pd.DataFrame, day: pd.Timestamp) -> pd.DataFrame:
    """The purchases before `day`, in a fixed order: a shock must leave them as they were."""
    cols = ["person_id", "order_id", "ts", "net_amount", "is_return"]
    early = purchases[purchases.ts < day][cols]
    return early.sort_values("order_id").reset_index(drop=True)
