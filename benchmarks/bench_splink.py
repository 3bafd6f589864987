"""Splink 5.0 (DuckDB backend) as the probabilistic-linkage peer of c360ml's unify.

Same input as ours: the records of `c360ml.medallion.unify.read_records` after `prepare_records`
(the same normalised e-mail, phone, names, postal code). Identifier values that our
junk guard excludes (shared by more than `junk_max_records` records: a store's phone, a
placeholder e-mail) are set to null here too; otherwise a block on phone would compare
every pair of a 10,000-record store-phone block. Model: Fellegi-Sunter with
comparisons on e-mail, phone, first name, last name and postal code; lambda from the
e-mail block (assumed recall 0.7), u by random sampling, m by EM on two blockings;
pairs from blocking rules like ours (e-mail; phone; postal code + last initial) scored,
kept at match probability >= 0.9 and clustered by Splink's connected components.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

THRESHOLD = 0.9  # match probability: a stated choice (90%), not tuned to the truth


def splink_input(records: pd.DataFrame, junk_max: int, junk_fields: list[str]) -> pd.DataFrame:
    from c360ml.medallion.unify import _fold, junk_values

    frame = pd.DataFrame(
        {
            "record": records["record"].to_numpy(),
            "email": records["m_email"],
            "phone": records["m_phone"],
            "first_name": _fold(records["first_name"]),
            "last_name": records["m_last_name"],
            "postal_code": records["m_postal_code"],
            "last_initial": records["m_last_initial"],
        }
    )
    for name in junk_fields:
        junk = junk_values(records, name, junk_max)
        frame.loc[frame[name].isin(junk), name] = None
    return frame


def run_splink(records: pd.DataFrame, rules) -> dict:
    """Train, predict and cluster; returns timings and a cluster label per record."""
    import splink.comparison_library as cl
    from splink import Linker, SettingsCreator, block_on
    from splink.internals.duckdb.database_api import DuckDBAPI

    logging.getLogger("splink").setLevel(logging.WARNING)
    times = {}
    started = time.perf_counter()
    frame = splink_input(records, rules.junk_max_records, list(rules.junk_fields))
    blocking = [
        block_on("email"),
        block_on("phone"),
        block_on("postal_code", "last_initial"),
    ]
    settings = SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="record",
        comparisons=[
            cl.ExactMatch("email").configure(term_frequency_adjustments=False),
            cl.ExactMatch("phone"),
            cl.NameComparison("first_name"),
            cl.NameComparison("last_name"),
            cl.ExactMatch("postal_code"),
        ],
        blocking_rules_to_generate_predictions=blocking,
        retain_intermediate_calculation_columns=False,
    )
    db_api = DuckDBAPI()
    linker = Linker(db_api.register(frame), settings)
    times["setup_s"] = time.perf_counter() - started

    started = time.perf_counter()
    linker.training.estimate_probability_two_random_records_match([block_on("email")], recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("postal_code", "last_initial")
    )
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("email"))
    times["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    predictions = linker.inference.predict(threshold_match_probability=THRESHOLD)
    times["predict_s"] = time.perf_counter() - started
    started = time.perf_counter()
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=THRESHOLD
    ).as_pandas_dataframe()
    times["cluster_s"] = time.perf_counter() - started
    pairs = predictions.as_duckdbpyrelation().count("*").fetchall()[0][0]

    order = clusters.set_index("record").reindex(records["record"].to_numpy())
    labels = pd.factorize(order["cluster_id"])[0]
    missing = labels < 0  # not in any pair: a singleton
    labels[missing] = labels.max() + 1 + np.arange(missing.sum())
    return {
        **{k: round(v, 2) for k, v in times.items()},
        "total_s": round(sum(times.values()), 2),
        "records": len(frame),
        "pairs_at_threshold": int(pairs),
        "threshold_match_probability": THRESHOLD,
        "labels": labels,
    }
