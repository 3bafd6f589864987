"""A reference for the model's test figures, supplied by whoever made the data.

A generated lake knows each person's true chance of buying again; a retailer may have a
model of record to compare against. Either writes `reference.json` in the truth folder
naming a function ("module:function"). Training calls it for the test customers and
reports the model's headroom against it; the pipelines never import the generator.

The function takes (truth folder, lake root, customer ids, cutoff, window in days) and
returns the churn probability per customer id (a Series), or None.
"""

from __future__ import annotations

import importlib
import json
import logging

import pandas as pd

from c360ml.config import Settings

log = logging.getLogger(__name__)

MANIFEST = "reference.json"


def reference_churn_probability(
    settings: Settings, customer_ids: pd.Series, cutoff: pd.Timestamp, window_days: int
) -> pd.Series | None:
    """The reference's churn probability per test customer, or None without one.

    Optional: any problem is logged and the reference figures are left out of the run.
    """
    manifest = settings.truth / MANIFEST
    if not manifest.exists():
        return None
    try:
        module, _, name = json.loads(manifest.read_text())["churn_probability"].partition(":")
        function = getattr(importlib.import_module(module), name)
        return function(settings.truth, settings.lake, customer_ids, cutoff, window_days)
    except (ImportError, AttributeError, OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("reference (oracle) figures skipped: %s", exc)
        return None
