"""The one module that imports Featuretools: EntitySet, DFS, feature and measure matrices.

Engines: the feature definitions are always Featuretools' (DFS, saved with the model).
Their values are computed by `c360ml.features.aggregates` in DuckDB, which this module
feeds a plain `Aggregate` per feature, over the as-of view of gold at the cutoff:
- "duckdb" (the default, for training and scoring alike): the view is SQL
  (`c360ml.features.asof`), run by DuckDB over the lake's gold tables (a `LakeGold`) or
  over frames (`GoldTables`), and the aggregates read it where it is built;
- "pandas": the view built in pandas (`c360ml.features.gold.view_as_of`), the reference
  the SQL view is tested against;
- "featuretools": the pandas view and Featuretools' calculate_feature_matrix for every
  feature, the reference the compiled aggregates are tested against.
A feature the aggregates cannot express is left to Featuretools in every engine (on the
view's rows, fetched into pandas for it).

Leakage design: features for cutoff t are computed on the as-of view at t — data after t
is never passed to either engine — and `calculate_feature_matrix` gets t as every row's
cutoff time, so Featuretools' own cutoff filtering applies as well. An event exactly at t
counts in features (Featuretools keeps time_index <= cutoff), and is outside the label
window (t, t + w].

Windows: each windowed aggregation is repeated per window with `use_previous` (saved with
the feature, unlike `training_window`) and a name suffix `_<w>d`; the unsuffixed feature
is over all history. Featuretools' `use_previous` keeps time >= t - w, so the window is
stored as w minus half a microsecond: at the microsecond resolution of gold timestamps
that is exactly the half-open (t - w, t] of DESIGN.md.

Matrix encoding: every feature is float32. Booleans become 0/1; aggregations over no rows
follow Featuretools (count/sum 0, others NaN). Categorical columns enter only as where-
clause counts (e.g. `COUNT(orders WHERE channel = online)_90d`): `derive_feature_set`
rejects any feature whose output is not numeric or boolean, so no category codes exist
whose meaning could drift between training and scoring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import featuretools as ft
import numpy as np
import pandas as pd
from featuretools.feature_base import AggregationFeature
from featuretools.primitives.utils import get_aggregation_primitives, get_transform_primitives

from c360ml import progress
from c360ml.features import btyd, custom
from c360ml.features.aggregates import (
    IS_PURCHASE,
    LINE_ID,
    PRIMITIVES,
    SUMMED,
    Aggregate,
    activity_frames,
    aggregate_view,
    compute_aggregates,
    encoded,
)
from c360ml.features.asof import AsOfSql, LakeGold
from c360ml.features.featureset import TARGET_DATAFRAME, FeatureSet
from c360ml.features.gold import (
    GoldTables,
    read_gold,
    restrict_to_customers,
    standardise_gold,
    view_as_of,
)
from c360ml.features.spec import (
    DfsSpec,
    TopValues,
    load_btyd_spec,
    load_churn_config,
    load_dfs_spec,
)
from c360ml.schemas import CustomerProfile, OrderLines, Orders, Products, SupportCases
from c360ml.timestamps import utc, utc_column

log = logging.getLogger(__name__)

CUSTOMER_ID = CustomerProfile.customer_id
CUTOFF_TIME = "cutoff_time"
MATRIX_DTYPE = "float32"
_HALF_MICROSECOND_S = 5e-7
SCHEMA_ROWS = 1000  # rows of each view relation `derive_feature_set` reads from a LakeGold
# Who computes a matrix (see the module docstring): "duckdb" (the SQL view and
# c360ml.features.aggregates; Featuretools only for a feature they cannot express),
# "pandas" (the pandas view, the same aggregates) or "featuretools" (the pandas view and
# Featuretools for all); the last two are the references the tests compare with.
ENGINES = ("duckdb", "pandas", "featuretools")
# Identifier columns of each EntitySet dataframe (categoricals with one value per entity).
ID_COLUMNS = {
    TARGET_DATAFRAME: (CUSTOMER_ID,),
    "orders": (Orders.order_id, Orders.customer_id),
    "order_lines": (OrderLines.order_id, OrderLines.item_id),
    "products": (Products.item_id,),
    "support_cases": (SupportCases.case_id, SupportCases.customer_id),
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Featuretools/woodwork chatter that says nothing about our data.

    UnusedPrimitiveWarning (a listed primitive found no column) and the libraries' own
    pandas deprecation notices are harmless here; anything else still surfaces.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ft.exceptions.UnusedPrimitiveWarning)
        for module in ("featuretools", "woodwork"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", message=".*Could not infer format.*")
        yield


def _ids_as_category(frame: pd.DataFrame, id_columns: tuple[str, ...]) -> pd.DataFrame:
    """The id columns as pandas categoricals in order of appearance.

    Woodwork would convert them itself, sorting millions of distinct id strings (about a
    third of the EntitySet's build time); an id's category order means nothing to any
    feature. Low-cardinality categoricals (channel, category, ...) are left to woodwork, so
    orders that do matter (e.g. mode's tie-break) are its sorted ones.
    """
    out = frame.copy()
    for column in id_columns:
        codes, uniques = pd.factorize(out[column], sort=False)
        out[column] = pd.Categorical.from_codes(codes, uniques)
    return out


def build_entityset(view: GoldTables) -> ft.EntitySet:
    """customers <- orders <- order_lines -> products, customers <- support_cases.

    Built from an as-of view, so statuses and is_purchase are those valid at its cutoff.
    Only immutable profile columns and event-timed activity enter; order_lines carry
    their order's time so windows apply to them too.
    """
    return _entityset(activity_frames(view))


def _entityset(frames: dict[str, pd.DataFrame]) -> ft.EntitySet:
    orders = frames["orders"]
    lines = frames["order_lines"].merge(
        orders[[Orders.order_id, Orders.order_ts]], on=Orders.order_id, how="inner"
    )
    customers, orders, lines, cases, products = (
        _ids_as_category(frame, ID_COLUMNS[name])
        for name, frame in (
            (TARGET_DATAFRAME, frames[TARGET_DATAFRAME]),
            ("orders", orders),
            ("order_lines", lines),
            ("support_cases", frames["support_cases"]),
            ("products", frames["products"]),
        )
    )
    cat, boolean, num = "Categorical", "Boolean", "Double"
    es = ft.EntitySet(id="c360")
    with _quiet():
        es.add_dataframe(
            dataframe=customers.reset_index(drop=True),
            dataframe_name=TARGET_DATAFRAME,
            index=CUSTOMER_ID,
            logical_types={CUSTOMER_ID: cat, CustomerProfile.created_ts: "Datetime"},
        )
        es.add_dataframe(
            dataframe=orders.reset_index(drop=True),
            dataframe_name="orders",
            index=Orders.order_id,
            time_index=Orders.order_ts,
            logical_types={
                Orders.order_id: cat,
                Orders.customer_id: cat,
                Orders.channel: cat,
                Orders.store: cat,
                Orders.gross_amount: num,
                Orders.discount_amount: num,
                Orders.net_amount: num,
                Orders.item_count: num,
                Orders.is_return: boolean,
                Orders.order_ts: "Datetime",
                Orders.is_cancelled: boolean,
                IS_PURCHASE: boolean,
            },
        )
        es.add_dataframe(
            dataframe=lines,
            dataframe_name="order_lines",
            index=LINE_ID,
            time_index=Orders.order_ts,
            logical_types={
                LINE_ID: "Integer",  # explicit: an empty frame infers nothing
                OrderLines.order_id: cat,
                OrderLines.item_id: cat,
                OrderLines.category: cat,
                OrderLines.qty: num,
                OrderLines.unit_price: num,
                OrderLines.net_amount: num,
                OrderLines.is_return: boolean,
                Orders.order_ts: "Datetime",
            },
        )
        es.add_dataframe(
            dataframe=products.reset_index(drop=True),
            dataframe_name="products",
            index=Products.item_id,
            logical_types={Products.item_id: cat, Products.category: cat},
        )
        es.add_dataframe(
            dataframe=cases.reset_index(drop=True),
            dataframe_name="support_cases",
            index=SupportCases.case_id,
            time_index=SupportCases.created_ts,
            logical_types={
                SupportCases.case_id: cat,
                SupportCases.created_ts: "Datetime",  # explicit: an empty column infers nothing
                SupportCases.customer_id: cat,
                SupportCases.case_type: cat,
                SupportCases.priority: cat,
                SupportCases.status: cat,
            },
        )
        es.add_relationship(TARGET_DATAFRAME, CUSTOMER_ID, "orders", Orders.customer_id)
        es.add_relationship("orders", Orders.order_id, "order_lines", OrderLines.order_id)
        es.add_relationship("products", Products.item_id, "order_lines", OrderLines.item_id)
        es.add_relationship(TARGET_DATAFRAME, CUSTOMER_ID, "support_cases", "customer_id")
    return es


def _primitive(entry: str | dict[str, dict[str, Any]], kind: str):
    """A primitive instance from the spec: a name, or {name: {constructor arguments}}."""
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"primitive entry must be a name or {{name: {{args}}}}: {entry!r}")
    ((name, args),) = entry.items()
    table = get_aggregation_primitives() if kind == "agg" else get_transform_primitives()
    if name not in table:
        raise ValueError(f"unknown {kind} primitive {name!r}")
    return table[name](**(args or {}))


def _primitive_name(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _add_interesting_values(es: ft.EntitySet, spec: DfsSpec, top=None) -> None:
    """The spec's interesting values; a `top` entry's from `top(dataframe, column, n)`
    (default: the most frequent values in the EntitySet's own rows)."""
    for df_name, cols in spec.interesting_values.items():
        values = {}
        for col, wanted in cols.items():
            if not isinstance(wanted, TopValues):
                values[col] = list(wanted)
            elif top is not None:
                values[col] = top(df_name, col, wanted.top)
            else:
                counts = es[df_name][col].value_counts(dropna=True)
                values[col] = [v for v in counts.index[: wanted.top] if counts[v] > 0]
        es.add_interesting_values(dataframe_name=df_name, values=values)


def _windowed(feature: AggregationFeature, days: int) -> AggregationFeature:
    """The same aggregation over (t - days, t], named `<name>_<days>d`."""
    return AggregationFeature(
        feature.base_features,
        feature.parent_dataframe_name,
        feature.primitive,
        relationship_path=feature.relationship_path,
        use_previous=ft.Timedelta(days * 86_400 - _HALF_MICROSECOND_S, "s"),
        where=feature.where,
        name=f"{feature.get_name()}_{days}d",
    )


def _matrix_ready(feature) -> bool:
    """Numeric or boolean single-column output (see the module docstring)."""
    schema = feature.column_schema
    numeric = schema.is_numeric or "numeric" in schema.semantic_tags
    return feature.number_output_features == 1 and (numeric or schema.is_boolean)


def _synthesize(es: ft.EntitySet, spec: DfsSpec) -> list:
    windowed = set(spec.windowed_primitives)
    with _quiet():
        base = ft.dfs(
            entityset=es,
            target_dataframe_name=TARGET_DATAFRAME,
            agg_primitives=[_primitive(p, "agg") for p in spec.agg_primitives],
            trans_primitives=[_primitive(p, "trans") for p in spec.trans_primitives],
            where_primitives=[_primitive(p, "agg") for p in spec.where_primitives],
            max_depth=spec.max_depth,
            allowed_paths=spec.allowed_paths,
            ignore_columns=spec.ignore_columns or None,
            primitive_options=spec.primitive_options or None,
            features_only=True,
        )
    features = []
    for feature in base:
        if not _matrix_ready(feature):
            log.info("skipping non-numeric feature %s", feature.get_name())
            continue
        features.append(feature)
        if isinstance(feature, AggregationFeature) and feature.primitive.name in windowed:
            features.extend(_windowed(feature, w) for w in spec.windows_days)
    drop = set(spec.drop_features)
    # Sorted by name: DFS's own order follows Python's per-process string hashing, and the
    # order decides column sampling and which of two near-duplicates is kept, so without
    # this the same lake would train a different model in each process.
    return sorted((f for f in features if f.get_name() not in drop), key=lambda f: f.get_name())


def derive_feature_set(gold: GoldTables | LakeGold | AsOfSql, spec_path: Path) -> FeatureSet:
    """Feature definitions from the DFS spec (features_only: no matrix is computed).

    The EntitySet is built on the latest view of gold, which only supplies column types,
    categories and the `top` interesting values; the definitions themselves hold no data.
    From a `LakeGold`, that view is SQL and only its schema, categories and top values
    leave DuckDB (`_schema_entityset`).
    """
    spec = load_dfs_spec(spec_path)
    if isinstance(gold, LakeGold | AsOfSql):
        es = _schema_entityset(gold, spec)
    else:
        gold = standardise_gold(gold)
        times = [
            gold.orders[Orders.order_ts].max(),
            gold.support_cases[SupportCases.created_ts].max(),
            gold.order_status["valid_from"].max(),
            gold.case_status["valid_from"].max(),
        ]
        known = [t for t in times if pd.notna(t)]
        view = view_as_of(gold, max(known) if known else pd.Timestamp.now(tz="UTC"))
        es = build_entityset(view)
        _add_interesting_values(es, spec)
    features = _synthesize(es, spec)
    if len(features) > spec.max_features:
        raise ValueError(
            f"{spec_path} yields {len(features)} features, above max_features="
            f"{spec.max_features}; narrow the primitives or windows"
        )
    names = [f.get_name() for f in features]
    sql = custom.load_sql_features(spec_path)  # a user's SQL features, after the DFS ones
    clash = sorted({f.name for f in sql} & set(names))
    if clash:
        raise ValueError(f"{spec_path}: sql feature name(s) {clash} are DFS feature names")
    names += [f.name for f in sql]
    meta = {
        "spec": str(spec_path),
        "featuretools_version": ft.__version__,
        "windows_days": spec.windows_days,
    }
    if sql:
        meta[custom.META_KEY] = custom.to_meta(sql)
    if load_btyd_spec(spec_path).enabled:  # BTYD candidates after the SQL ones
        clash = sorted(set(btyd.BTYD_FEATURES) & set(names))
        if clash:
            raise ValueError(f"{spec_path}: feature name(s) {clash} are BTYD feature names")
        window = load_churn_config(spec_path).prediction_window_days
        meta[btyd.META_KEY] = btyd.to_meta(window)
        names += list(btyd.BTYD_FEATURES)
    log.info(
        "derived %d features (+%d SQL, +%d BTYD) from %s",
        len(features),
        len(sql),
        len(btyd.feature_names(meta)),
        spec_path,
    )
    return FeatureSet(
        names=names,
        dtypes=dict.fromkeys(names, MATRIX_DTYPE),
        definitions_json=_without_id_values(ft.save_features(features)),
        meta=meta,
    )


def _without_id_values(definitions_json: str) -> str:
    """Feature definitions without the category values of the EntitySet's id columns.

    Featuretools saves every categorical column's categories with the definitions: for
    the ids, every customer, order and case id the features were derived on (megabytes
    at a few thousand customers), which would make each model artifact a copy of the
    lake's ids, kept after a person's erasure. No feature reads them (a where-clause
    carries its own value), so they are emptied; the low-cardinality categories stay.
    """
    definitions = json.loads(definitions_json)
    for name, frame in definitions["entityset"]["dataframes"].items():
        for column in frame["column_typing_info"]:
            if column["name"] in ID_COLUMNS.get(name, ()):
                column["physical_type"]["cat_values"] = []
    return json.dumps(definitions)


def _schema_entityset(gold: LakeGold | AsOfSql, spec: DfsSpec) -> ft.EntitySet:
    """The EntitySet `derive_feature_set` needs, from the SQL view of gold at its latest
    event: a few of its rows (for woodwork's types and datetime formats), each categorical
    column with the categories all its rows hold (woodwork would give the full frame the
    same, sorted), and the `top` interesting values counted in SQL."""
    with contextlib.ExitStack() as stack:
        sql = gold if isinstance(gold, AsOfSql) else stack.enter_context(AsOfSql(gold))
        sql.restrict(None)
        sql.build_view(sql.latest_time() or pd.Timestamp.now(tz="UTC"))
        frames = sql.frames(rows=SCHEMA_ROWS)
        for name, frame in frames.items():
            ids = ID_COLUMNS.get(name, ())
            for column in frame.columns:
                if frame[column].dtype == object and column not in ids:
                    values = sorted(sql.distinct(name, column))
                    frame[column] = frame[column].astype(pd.CategoricalDtype(values))
        es = _entityset(frames)
        _add_interesting_values(es, spec, top=sql.top_values)
    return es


def _ft_matrix(es: ft.EntitySet, ids: pd.Index, t: pd.Timestamp, features: list) -> pd.DataFrame:
    """Featuretools' matrix of `features` for `ids` at t, indexed by customer_id."""
    if not len(ids):  # e.g. a chunk with no active profile: Featuretools needs a cutoff row
        return pd.DataFrame(index=ids, columns=[f.get_name() for f in features], dtype="float64")
    cutoff = pd.DataFrame({CUSTOMER_ID: ids.to_numpy(), "time": utc(t)})
    with _quiet():
        matrix = ft.calculate_feature_matrix(
            features, entityset=es, cutoff_time=cutoff, n_jobs=1, verbose=False
        )
    return matrix.reindex(ids)


class _FramesView:
    """The pandas as-of view at t as activity frames (the "pandas" and "featuretools"
    engines), and the gold it was cut from (`current`: what a user's SQL feature may read
    as `current_*`)."""

    def __init__(self, frames: dict[str, pd.DataFrame], current: GoldTables) -> None:
        self._frames, self._current = frames, current

    def aggregates(self, t: pd.Timestamp, requests: list) -> list[pd.DataFrame]:
        return compute_aggregates(self._frames, t, requests)

    def frames(self) -> dict[str, pd.DataFrame]:
        return self._frames

    def current(self) -> GoldTables:
        return self._current

    def purchases(self) -> pd.DataFrame:
        """customer_id, ts of the view's purchases (what the BTYD features are fitted on)."""
        orders = self._frames["orders"]
        bought = orders[orders[IS_PURCHASE].fillna(False).astype(bool).to_numpy()]
        return pd.DataFrame(
            {"customer_id": bought[Orders.customer_id], "ts": bought[Orders.order_ts]}
        )


class _SqlView:
    """The SQL as-of view an AsOfSql has built (the "duckdb" engine): the aggregates read
    it in DuckDB; its rows reach pandas only for what they cannot compute."""

    def __init__(self, sql: AsOfSql) -> None:
        self.sql = sql

    def aggregates(self, t: pd.Timestamp, requests: list) -> list[pd.DataFrame]:
        return aggregate_view(self.sql.con, t, requests, self.sql.dialect)

    def frames(self) -> dict[str, pd.DataFrame]:
        return self.sql.frames()

    def current(self) -> GoldTables:
        return self.sql.current()

    def purchases(self) -> pd.DataFrame:
        """customer_id, ts of the view's purchase days (distinct, from DuckDB)."""
        return btyd.days_as_purchases(
            self.sql.query(btyd.purchase_days_sql(self.sql.dialect.epoch_us))
        )


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown feature engine {engine!r}; expected one of {ENGINES}")


def _gold_frames(gold: GoldTables | LakeGold) -> GoldTables:
    """Gold as frames for the pandas engines (a LakeGold is read, its customers only)."""
    if isinstance(gold, LakeGold):
        return read_gold(gold.lake, customers=gold.customers)
    return standardise_gold(gold)


@contextlib.contextmanager
def _views(gold, engine: str) -> Iterator:
    """A function (t, ids or None) -> the as-of view at t of those customers, for `engine`.
    The SQL engine keeps one DuckDB connection (gold registered once) for every view; an
    open AsOfSql is used as it is."""
    _check_engine(engine)
    if engine == "duckdb":
        if isinstance(gold, AsOfSql):
            yield partial(_sql_view, gold)
            return
        with AsOfSql(gold) as sql:
            yield partial(_sql_view, sql)
        return
    if isinstance(gold, AsOfSql):
        raise ValueError(f"engine {engine!r} needs gold as frames, not an AsOfSql")
    frames = _gold_frames(gold)
    yield partial(_frames_view, frames)


def _sql_view(sql: AsOfSql, t: pd.Timestamp, ids: pd.Index | None) -> _SqlView:
    if ids is not None:
        sql.restrict(ids)
    sql.build_view(t)
    return _SqlView(sql)


def _frames_view(gold: GoldTables, t: pd.Timestamp, ids: pd.Index | None) -> _FramesView:
    mine = gold if ids is None else restrict_to_customers(gold, ids)
    return _FramesView(activity_frames(view_as_of(mine, t)), mine)


def _matrices(view, t: pd.Timestamp, requests: list, engine: str) -> list[pd.DataFrame]:
    """For each (ids, features) request, the matrix of those features for those ids at t,
    from the view at t (one view serves every request)."""
    _check_engine(engine)
    compiled = engine != "featuretools"
    plans = [[_aggregate(f) if compiled else None for f in fs] for _, fs in requests]
    planned = [[p for p in ps if p is not None] for ps in plans]
    sql = [(ids, ps) for (ids, _), ps in zip(requests, planned, strict=True) if ps]
    computed = iter(view.aggregates(t, sql) if sql else [])
    es = None
    out = []
    for (ids, features), ps, mine in zip(requests, plans, planned, strict=True):
        parts = [next(computed)] if mine else []
        rest = [f for f, p in zip(features, ps, strict=True) if p is None]
        if rest:
            if compiled:
                log.info("featuretools computes %d feature(s) the SQL cannot", len(rest))
            es = es or _entityset(view.frames())
            parts.append(_ft_matrix(es, ids, t, rest))
        if not parts:  # a set of SQL or BTYD features only
            parts = [pd.DataFrame(index=pd.Index(ids, name=CUSTOMER_ID))]
        out.append(pd.concat(parts, axis=1)[[f.get_name() for f in features]])
    return out


def _aggregate(feature) -> Aggregate | None:
    """The feature in the plain terms of `c360ml.features.aggregates`, or None when it is
    not a per-customer aggregation that module knows (Featuretools then computes it)."""
    name = feature.get_name()
    base = feature.base_features[0] if feature.base_features else None
    if isinstance(feature, ft.TransformFeature):
        if feature.dataframe_name == TARGET_DATAFRAME and _days_since(feature):
            return Aggregate(name, None, TARGET_DATAFRAME, base.get_name(), time_since=True)
        return None
    if (
        not isinstance(feature, AggregationFeature)
        or feature.parent_dataframe_name != TARGET_DATAFRAME
    ):
        return None
    if isinstance(base, AggregationFeature):  # stacked: an aggregate of each order's lines
        inner = _terms(base, base.get_name())
        if (
            inner is None
            or base.parent_dataframe_name != "orders"
            or inner.where
            or inner.window_ns is not None
        ):
            return None
        plan = _terms(feature, name)
        return None if plan is None or plan.column else replace(plan, per_order=inner)
    return _terms(feature, name)


def _days_since(feature) -> bool:
    base = feature.base_features[0]
    return (
        feature.primitive.name == "time_since"
        and feature.primitive.unit == "days"
        and isinstance(base, ft.IdentityFeature)
    )


def _terms(feature: AggregationFeature, name: str) -> Aggregate | None:
    """An aggregation of one child table's column (or of TIME_SINCE of it)."""
    base = feature.base_features[0]
    where = _conditions(feature.where)
    window = _window_ns(feature.use_previous)
    if feature.primitive.name not in PRIMITIVES or where is None or window is False:
        return None
    default = feature.default_value
    default = None if default is None or pd.isna(default) else float(default)
    terms = {"table": base.dataframe_name, "where": where, "window_ns": window, "default": default}
    if isinstance(base, ft.IdentityFeature):
        column = base.get_name()
        if column == LINE_ID and feature.primitive.name != "count":
            return None  # the lines' index exists in pandas only (the SQL view has none)
        return Aggregate(name, feature.primitive.name, column=column, **terms)
    if isinstance(base, ft.TransformFeature) and _days_since(base):
        column = base.base_features[0].get_name()
        return Aggregate(name, feature.primitive.name, column=column, time_since=True, **terms)
    if isinstance(base, AggregationFeature):
        return Aggregate(name, feature.primitive.name, **terms)
    return None


def _conditions(where) -> tuple[tuple[str, Any], ...] | None:
    """A where-clause of `column = value` terms joined by AND; None for anything else."""
    if where is None:
        return ()
    if not isinstance(where, ft.TransformFeature):
        return None
    if where.primitive.name == "equal_scalar":
        base = where.base_features[0]
        return (
            ((base.get_name(), where.primitive.value),)
            if isinstance(base, ft.IdentityFeature)
            else None
        )
    if where.primitive.name == "and":
        parts = [_conditions(b) for b in where.base_features]
        return None if any(p is None for p in parts) else sum(parts, ())
    return None


def _window_ns(use_previous) -> int | None | bool:
    """A fixed-length window in ns (None: all history; False: one we cannot express, such
    as a number of observations or calendar months)."""
    if use_previous is None:
        return None
    if not use_previous.has_no_observations() or not use_previous.is_absolute():
        return False
    t = pd.Timestamp("2000-01-01", tz="UTC")
    return (t - (t - use_previous)).value


def _feature_part(matrix: pd.DataFrame, ids: pd.Index, t: pd.Timestamp, fs: FeatureSet):
    """customer_id, cutoff_time, then fs.names as the model reads them (`encoded`), for one
    cutoff."""
    summed = summed_names(fs.definitions_json)
    part = pd.DataFrame({n: encoded(matrix[n], n in summed) for n in fs.names})
    part.insert(0, CUTOFF_TIME, t)
    part.insert(0, CUSTOMER_ID, ids.to_numpy())
    return part


@lru_cache(maxsize=8)
def summed_names(definitions_json: str) -> frozenset[str]:
    """The features of a feature set's Featuretools definitions that are sums, means or
    deviations (`aggregates.SUMMED`), whose encoding rounds them."""
    with _quiet():
        loaded = ft.load_features(definitions_json)
    return frozenset(
        f.get_name()
        for f in loaded
        if isinstance(f, AggregationFeature) and f.primitive.name in SUMMED
    )


def _load(fs: FeatureSet) -> list:
    """The Featuretools features of fs (its SQL features are computed apart)."""
    with _quiet():
        loaded = ft.load_features(fs.definitions_json)
    by_name = {f.get_name(): f for f in loaded}
    sql = {f.name for f in custom.definitions(fs.meta)} | set(btyd.feature_names(fs.meta))
    missing = [n for n in fs.names if n not in by_name and n not in sql]
    if missing:
        raise ValueError(f"feature definitions lack {missing[:5]}")
    return [by_name[n] for n in fs.names if n not in sql]


def _with_sql(
    matrix: pd.DataFrame, view, ids: pd.Index, t: pd.Timestamp, fs: FeatureSet
) -> pd.DataFrame:
    """The Featuretools matrix with fs's SQL features (c360ml.features.custom) beside it."""
    sql = custom.definitions(fs.meta)
    if not sql:
        return matrix
    extra = custom.compute_sql_features(view.frames(), ids, t, sql, view.current())
    return pd.concat([matrix, extra.set_axis(matrix.index)], axis=1)


def _with_btyd(
    matrix: pd.DataFrame, view, ids: pd.Index, t: pd.Timestamp, fs: FeatureSet
) -> pd.DataFrame:
    """The matrix with fs's BTYD features beside it: both models fitted on the purchase
    days up to t of `ids` (the population at t), then each customer's quantities."""
    names = btyd.feature_names(fs.meta)
    if not names:
        return matrix
    summary = btyd.summarise_purchases(view.purchases(), t)
    window = fs.meta[btyd.META_KEY]["window_days"]
    extra, fit = btyd.population_features(summary, ids, names, window)
    if fit is not None:
        log.info("BTYD at %s: fitted on %d customers in %.1f s", t, fit.customers, fit.seconds)
    return pd.concat([matrix, extra.set_axis(matrix.index)], axis=1)


def purchase_summary(gold: GoldTables | LakeGold | AsOfSql, t: pd.Timestamp) -> pd.DataFrame:
    """`btyd.summarise_purchases` of every customer of gold's as-of view at t (for the
    refresh, whose chunks' summaries make the one population the BTYD models are fitted on)."""
    t = utc(t)
    with _views(gold, "duckdb" if isinstance(gold, AsOfSql) else "pandas") as view_at:
        return btyd.summarise_purchases(view_at(t, None).purchases(), t)


def _population_groups(population: pd.DataFrame) -> Iterator[tuple[pd.Timestamp, pd.Index]]:
    missing = {CUSTOMER_ID, CUTOFF_TIME} - set(population.columns)
    if missing:
        raise ValueError(f"population lacks column(s) {sorted(missing)}")
    times = pd.to_datetime(population[CUTOFF_TIME], utc=True)
    for t, rows in population.groupby(times, sort=True)[CUSTOMER_ID]:
        yield utc(t), pd.Index(rows.unique())


def calculate_features(
    gold: GoldTables | LakeGold | AsOfSql,
    population: pd.DataFrame,
    fs: FeatureSet,
    engine: str = "duckdb",
    workers: int = 1,
) -> pd.DataFrame:
    """customer_id, cutoff_time, then fs.names in order (float32), one row per population row.

    One cutoff at a time on the as-of view of that cutoff, restricted to its customers;
    definitions come from fs.definitions_json (never re-derived, so training and scoring
    compute the same thing). `gold`: frames, or a lake's gold read by SQL (LakeGold, or an
    open AsOfSql over one). `workers` > 1 (SQL over a lake only): the cutoffs are shared
    among that many processes, each with a DuckDB of its own (the aggregates run on one
    thread each, see `c360ml.features.aggregates`); the values are the same.
    """
    groups = list(_population_groups(population))
    lake = _lake_of(gold) if engine == "duckdb" else None
    workers = min(workers, len(groups))
    with progress.track("features per cutoff", len(groups)) as advance:
        parts = None
        if workers > 1 and lake is not None:
            parts = _parallel_features(lake, groups, fs, workers, advance)
        if parts is None:
            parts, features = [], _load(fs)
            with _views(gold, engine) as view_at:
                for t, ids in groups:
                    parts.append(_cutoff_features(view_at, t, ids, fs, features, engine))
                    advance()
    result = pd.concat(parts, ignore_index=True)
    result[CUTOFF_TIME] = result[CUTOFF_TIME].dt.as_unit("us")
    keys = population[[CUSTOMER_ID, CUTOFF_TIME]].copy()
    keys[CUTOFF_TIME] = utc_column(keys[CUTOFF_TIME])
    return keys.merge(result, on=[CUSTOMER_ID, CUTOFF_TIME], how="left", validate="m:1")


def _cutoff_features(view_at, t, ids: pd.Index, fs: FeatureSet, features: list, engine: str):
    view = view_at(t, ids)
    (matrix,) = _matrices(view, t, [(ids, features)], engine)
    matrix = _with_btyd(_with_sql(matrix, view, ids, t, fs), view, ids, t, fs)
    log.info("features at %s: %d customers x %d", t, len(ids), len(fs.names))
    return _feature_part(matrix, ids, t, fs)


def _lake_of(gold) -> LakeGold | None:
    """The LakeGold a computation reads (an AsOfSql's, with its sample), None for frames."""
    if isinstance(gold, AsOfSql):
        lake = gold.gold.lake if isinstance(gold.gold, LakeGold) else None
        return None if lake is None else LakeGold(lake, gold.sample)
    return gold if isinstance(gold, LakeGold) else None


def _parallel_features(
    gold: LakeGold, groups: list, fs: FeatureSet, workers: int, advance
) -> list[pd.DataFrame] | None:
    """calculate_features' parts, the cutoffs dealt round-robin to `workers` processes; None
    when the processes cannot start (a script without `if __name__ == "__main__":`, which
    each spawned process runs again): the caller then computes them in this process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    shares = [groups[k::workers] for k in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    root = str(gold.lake.root)
    context = multiprocessing.get_context("spawn")
    done: dict[pd.Timestamp, pd.DataFrame] = {}
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            jobs = [
                pool.submit(_features_job, root, gold.customers, share, fs.to_json(), threads)
                for share in shares
            ]
            for job in as_completed(jobs):
                for t, part in job.result():
                    done[t] = part
                    # said here: a worker process's log goes nowhere
                    log.info("features at %s: %d customers x %d", t, len(part), len(fs.names))
                    advance()
    except BrokenProcessPool as exc:
        log.warning("feature worker processes failed (%s); computing in this process", exc)
        return None
    return [done[t] for t, _ in groups]


def _features_job(
    root: str, customers: pd.Index | None, groups: list, fs_json: str, threads: int
) -> list[tuple[pd.Timestamp, pd.DataFrame]]:
    """A worker process's cutoffs (see `_parallel_features`)."""
    from c360ml.storage.lake import Lake

    fs = FeatureSet.from_json(fs_json)
    features = _load(fs)
    with AsOfSql(LakeGold(Lake(root), customers), threads=threads) as sql:
        view_at = partial(_sql_view, sql)
        return [(t, _cutoff_features(view_at, t, ids, fs, features, "duckdb")) for t, ids in groups]


def measure_features(es: ft.EntitySet, measures: list) -> list:
    """Featuretools features for named measures (see `c360ml.features.measures`)."""
    out = []
    for m in measures:
        child = es[m.dataframe]
        column = m.column or child.ww.index
        base = ft.IdentityFeature(child.ww[column])
        if m.transform:
            base = ft.TransformFeature(base, _primitive(m.transform, "trans"))
        where = None
        if m.where:
            conditions = [ft.IdentityFeature(child.ww[c]) == v for c, v in m.where.items()]
            where = conditions[0]
            for extra in conditions[1:]:
                where = where & extra
        use_previous = (
            ft.Timedelta(m.window_days * 86_400 - _HALF_MICROSECOND_S, "s")
            if m.window_days
            else None
        )
        out.append(
            AggregationFeature(
                base,
                TARGET_DATAFRAME,
                _primitive(m.primitive if not m.args else {m.primitive: m.args}, "agg"),
                use_previous=use_previous,
                where=where,
                name=m.name,
            )
        )
    return out


def calculate_snapshot(
    gold: GoldTables | LakeGold | AsOfSql,
    as_of: pd.Timestamp,
    measures: list | None,
    fs: FeatureSet | None,
    feature_ids: pd.Index,
    engine: str = "duckdb",
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The refresh's pass at one as_of: the measure matrix of every profile in gold
    (indexed by customer_id, sorted) and fs's features of `feature_ids` (as calculate_features
    returns them), either None when not asked.

    Both come from one as-of view: building it is much of a pass's cost, so a second pass
    would pay it again for nothing. Every value is an aggregation over one customer's
    rows, so the features equal those of calculate_features on a view restricted to
    `feature_ids` (a test checks). `gold` may be an open AsOfSql (the refresh's chunk,
    whose view at as_of it may already hold).
    """
    as_of = utc(as_of)
    with _views(gold, engine) as view_at:
        view = view_at(as_of, None)
        requests = []
        if measures:
            if isinstance(view, _SqlView):
                ids, empty = view.sql.profile_ids(), view.sql.frames(rows=False)
            else:
                frames = view.frames()
                ids = frames["customers"][CUSTOMER_ID].unique().astype(str)
                ids = pd.Index(np.sort(ids), name=CUSTOMER_ID)  # as profile_ids orders them
                empty = {name: frame.iloc[:0] for name, frame in frames.items()}
            requests.append((ids, measure_features(_entityset(empty), measures)))
        if fs is not None:
            requests.append((pd.Index(feature_ids.unique()), _load(fs)))
        matrices = iter(_matrices(view, as_of, requests, engine))
        measure_matrix = next(matrices) if measures else None
        features = None
        if fs is not None:
            ids = requests[-1][0]
            matrix = _with_sql(next(matrices), view, ids, as_of, fs)
            matrix = _with_btyd(matrix, view, ids, as_of, fs)
            features = _feature_part(matrix, ids, as_of, fs)
            features[CUTOFF_TIME] = features[CUTOFF_TIME].dt.as_unit("us")
    return measure_matrix, features


def compute_measures(
    gold: GoldTables | LakeGold, as_of: pd.Timestamp, measures: list, engine: str = "duckdb"
) -> pd.DataFrame:
    """Measure values for every profile at as_of, indexed by customer_id."""
    return calculate_snapshot(gold, as_of, measures, None, pd.Index([]), engine)[0]
