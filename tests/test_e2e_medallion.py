"""End to end on a small generated lake: landing -> bronze -> silver -> unify -> gold,
checked against the generator's truth, then an increment with an erasure."""

from __future__ import annotations

import pandas as pd
import pytest

from c360ml.medallion.build import build_silver
from c360ml.medallion.unify import pair_quality
from c360ml.storage.lake import Lake
from c360ml.synth import generate_increment
from tests.conftest import assert_gold_equals_a_rebuild, build_all, generated_lake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return generated_lake(tmp_path_factory.mktemp("e2e"), customers=800, seed=7)


def truth(settings, name):
    return pd.read_parquet(settings.truth / f"{name}.parquet")


def test_gold_orders_reconcile_with_truth(lake):
    lk = Lake(lake.lake)
    persons = truth(lake, "persons")[["person_id", "kind"]]
    purchases = truth(lake, "purchases").merge(persons, on="person_id")
    gold = lk.read_pandas("gold", "orders")
    quarantined = lk.read_pandas("quarantine", "gold", "orders")
    person_orders = set(purchases.loc[purchases.kind != "organisation", "order_id"])
    assert set(gold.order_id) == person_orders
    org_orders = set(purchases.loc[purchases.kind == "organisation", "order_id"])
    org_reason = quarantined.set_index("order_id").loc[list(org_orders), "quarantine_reason"]
    assert set(org_reason) == {"customer is not a person party"}
    assert set(quarantined.order_id) - org_orders == set(
        quarantined.loc[quarantined.quarantine_reason.str.startswith("anonymous"), "order_id"]
    )
    both = gold.merge(purchases, on="order_id", suffixes=("", "_truth"))
    # A sales order's total is the sum of its lines; a line late to the sink (still in
    # truth/_pending) is not in the lake yet, so that order is compared after it arrives.
    late = pd.read_parquet(lake.truth / "_pending" / "salesline.parquet")
    late_orders = set("SO:" + late.dataareaid + "-" + late.salesid)
    both = both[~both.order_id.isin(late_orders)]
    agree = both[~both.is_cancelled & ~both.cancelled]
    assert (both.is_cancelled != both.cancelled).mean() < 0.002
    assert agree.net_amount.sum() == pytest.approx(agree.net_amount_truth.sum(), abs=0.01)
    assert (agree.net_amount - agree.net_amount_truth).abs().max() < 0.005


def test_profiles_match_truth_identity(lake):
    lk = Lake(lake.lake)
    keys = truth(lake, "person_keys")
    source_map = lk.read_pandas("gold", "customer_source_map")
    quality = pair_quality(source_map, keys)
    assert quality["precision"] >= 0.99 and quality["recall"] >= 0.95
    profiles = lk.read_pandas("gold", "customer_profile")
    assert len(profiles) == source_map.customer_id.nunique()
    persons_with_records = (
        keys[keys.source != "generic"]
        .merge(source_map, on=["source", "source_key"])
        .person_id.nunique()
    )
    assert abs(len(profiles) - persons_with_records) <= 0.02 * persons_with_records


def test_build_twice_adds_no_versions(lake):
    lk = Lake(lake.lake)
    layers = ("bronze", "silver", "gold")
    before = {(ly, p): lk.version(ly, *p) for ly in layers for p in lk.tables(ly)}
    build_all(lake)
    assert {(ly, p): lk.version(ly, *p) for ly in layers for p in lk.tables(ly)} == before


def test_increment_applies_changes_and_erasure(lake):
    lk = Lake(lake.lake)
    ids_before = lk.read_pandas("gold", "customer_source_map")
    summary = generate_increment(lake)
    assert summary.rows()
    build_all(lake)
    for result in build_silver(lake).items:
        assert result.balanced, result
    erased = truth(lake, "erased")
    assert len(erased) >= 1
    keys = truth(lake, "person_keys")
    gone = keys[keys.person_id.isin(erased.person_id) & (keys.source != "generic")]
    source_map = lk.read_pandas("gold", "customer_source_map")
    assert not set(gone.source_key) & set(source_map.source_key)
    contacts = lk.read_pandas("silver", "contact")
    assert not set(gone.source_key) & set(contacts.contactid)
    # Ids are stable for every record still present, unless a merge redirected them.
    both = ids_before.merge(source_map, on=["source", "source_key"], suffixes=("_0", "_1"))
    moved = both[both.customer_id_0 != both.customer_id_1]
    redirects = (
        lk.read_pandas("gold", "customer_id_redirects")
        if lk.exists("gold", "customer_id_redirects")
        else pd.DataFrame(columns=["retired_id", "surviving_id"])
    )
    follow = dict(zip(redirects.retired_id, redirects.surviving_id, strict=True))
    unexplained = moved[moved.customer_id_0.map(follow) != moved.customer_id_1]
    assert len(unexplained) <= 0.01 * len(both)


def test_unify_of_the_changes_clusters_as_a_whole_unify(lake, tmp_path):
    """After an increment, unify matches and merges again only the clusters the changes
    reach (state/unify/records); clusters, profiles and report are those of unifying
    every record again."""
    import shutil

    from c360ml.medallion.build import build_unify
    from c360ml.medallion.ingest import ingest_landing

    generate_increment(lake)
    ingest_landing(lake)
    build_silver(lake)
    legacy = ("state", "unify", "name_postal_code_pairs")  # an older unify's state
    Lake(lake.lake).write(pd.DataFrame({"left_key": ["K1"]}), *legacy)
    summary = build_unify(lake)
    assert 0 < summary.unified < summary.records / 2  # only the changes' clusters
    kept = [("unify", t) for t in ("counted", "frequencies", "records")]  # `common`'s, and
    assert sorted(Lake(lake.lake).tables("state", "unify")) == kept  # the records' state
    fresh = lake.model_copy(update={"lake_root": tmp_path / "lake"})
    shutil.copytree(lake.lake, fresh.lake)
    shutil.rmtree(fresh.lake / "state" / "unify" / "records")  # frequencies kept, as both use
    shutil.rmtree(fresh.lake / "gold" / "customer_source_map")  # so unify runs again
    assert build_unify(fresh).unified == summary.records

    def profiles(settings):
        """Profiles keyed by their records (ids differ: the fresh unify has no history)."""
        lk = Lake(settings.lake)
        m = lk.read_pandas("gold", "customer_source_map")
        keys = (
            (m.source + ":" + m.source_key)
            .groupby(m.customer_id)
            .agg(lambda k: " ".join(sorted(k)))
        )
        p = lk.read_pandas("gold", "customer_profile")
        p.index = p.customer_id.map(keys)
        return p.drop(columns="customer_id").sort_index()

    pd.testing.assert_frame_equal(profiles(lake), profiles(fresh))
    report = [Lake(s.lake).read_pandas("gold", "unify_report") for s in (lake, fresh)]
    pd.testing.assert_frame_equal(*report)
    build_all(lake)  # the rest of the build, for the tests after this one


def test_unify_stopped_half_way_is_followed_by_a_whole_unify(lake, monkeypatch):
    """A unify that stops after writing the map but before the profiles: the next one
    does not trust the state (which the map no longer matches) and unifies everything,
    so map and profiles hold the same customers again."""
    import c360ml.medallion.unify as unify
    from c360ml.medallion.ingest import ingest_landing

    generate_increment(lake)
    ingest_landing(lake)
    build_silver(lake)
    real = unify.replace_rows

    def stop_at_profiles(lk, where, *args):
        if where == ("gold", "customer_profile"):
            raise KeyboardInterrupt
        return real(lk, where, *args)

    monkeypatch.setattr(unify, "replace_rows", stop_at_profiles)
    with pytest.raises(KeyboardInterrupt):
        unify.build_unify(lake)
    monkeypatch.undo()
    summary = unify.build_unify(lake)
    assert summary.unified == summary.records
    lk = Lake(lake.lake)
    mapped = set(lk.read_pandas("gold", "customer_source_map").customer_id)
    assert mapped == set(lk.read_pandas("gold", "customer_profile").customer_id)
    build_all(lake)  # the rest of the build, for the tests after this one


def test_patched_gold_equals_a_rebuild(lake, tmp_path):
    """After an increment, gold recomputes only the affected orders (and their status
    history) and support cases' status history, and keeps the other rows: the tables
    equal a build from scratch."""
    from c360ml.medallion.build import build_gold, build_unify
    from c360ml.medallion.ingest import ingest_landing

    generate_increment(lake)
    ingest_landing(lake)
    order_id, line = pos_line_changed_alone(Lake(lake.lake))
    for step in (build_silver, build_unify):
        step(lake)
    written = {t["table"]: t["written"] for t in build_gold(lake).rows()}
    lines = Lake(lake.lake).read_pandas("quarantine", "gold", "order_lines")
    assert lines.set_index(["order_id", "line"]).loc[(order_id, line), "qty"] < 0
    orders, cases = (Lake(lake.lake).count("gold", t) for t in ("orders", "support_cases"))
    for table, entities in [
        ("gold/orders", orders),
        ("gold/order_lines", orders),
        ("gold/order_status_history", orders),
        ("gold/case_status_history", cases),
    ]:
        assert written[table].startswith("patched"), written
        assert 0 < int(written[table].split("(")[1].split()[0]) < 0.2 * entities
    assert_gold_equals_a_rebuild(lake, tmp_path)


def pos_line_changed_alone(lake: Lake) -> tuple[str, int]:
    """A new bronze version of one POS line (its quantity negated) whose transaction
    nothing else touches (anonymous, not in the increment: no account or header change): the
    lines' patch must recompute it too. Returns its order id and line number."""
    import pyarrow as pa
    import pyarrow.compute as pc

    where = ("bronze", "d365", "retailtransactionsalestrans")
    headers = lake.read("bronze", "d365", "retailtransactiontable")
    latest = pc.equal(headers["_ingested_at"], pc.max(headers["_ingested_at"]))  # the increment
    touched = headers.filter(latest)["transactionid"]
    old = headers.filter(pc.invert(pc.is_in(headers["transactionid"], touched)))
    alone = old.filter(pc.is_null(pc.utf8_trim_whitespace(old["custaccount"])))["transactionid"]
    lines = lake.read(*where)
    line = lines.filter(
        pc.and_(pc.is_in(lines["transactionid"], alone), pc.greater(lines["qty"], 0))
    )
    line = line.slice(0, 1)
    now = pa.scalar(pd.Timestamp.now(tz="UTC"), line.schema.field("_ingested_at").type)
    for name, value in [
        ("qty", pc.negate(line["qty"])),
        ("versionnumber", pc.add(line["versionnumber"], 1_000_000)),
        ("_ingested_at", pa.array([now])),
    ]:
        line = line.set_column(line.schema.get_field_index(name), name, value)
    lake.write(line, *where, mode="append")
    return f"POS:{line['transactionid'][0]}", int(line["linenum"][0].as_py())
