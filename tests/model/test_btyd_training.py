"""A model trained with the spec's BTYD candidate features on (`btyd: {enabled: true}`)
carries them, and the chunked refresh computes them at a cutoff as training did: both
models fitted once on the population at the cutoff, whatever the chunks."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from c360ml.features import FeatureSet, btyd
from c360ml.model.pipeline import bundle_of, fit_builtin, prepare_training
from c360ml.model.scoring import ModelBundle
from c360ml.model.train import TrainConfig
from c360ml.refresh import btyd_step, snapshot_profiles
from tests.conftest import generated_lake

from .test_pipeline import AS_OF, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("btyd_training")
    lake = generated_lake(folder, customers=500, seed=7)
    spec = yaml.safe_load((ROOT / "features" / "retention.yaml").read_text())
    spec["churn"]["cutoff_count"] = 4
    spec["btyd"] = {"enabled": True}
    (folder / "retention.yaml").write_text(yaml.safe_dump(spec))
    settings = lake.model_copy(
        update={"feature_spec": folder / "retention.yaml", "refresh_workers": 1}
    )
    config = TrainConfig(nthread=1, max_trees=40, early_stopping_rounds=10, bootstrap_resamples=20)
    data = prepare_training(settings, AS_OF, config=config)
    bundle = bundle_of(data, fit_builtin(data))
    bundle.save(folder / "bundle")
    return settings, data, ModelBundle.load(folder / "bundle")


def test_the_model_carries_its_btyd_features(trained):
    _, data, bundle = trained
    assert set(btyd.BTYD_FEATURES) <= set(data.candidates.names)
    fs = FeatureSet.from_json(bundle.feature_set_json)
    kept = btyd.feature_names(fs.meta)
    assert kept and set(kept) <= set(fs.names) and set(kept) <= set(bundle.feature_names)
    assert fs.meta[btyd.META_KEY]["window_days"] == data.cfg.prediction_window_days
    labels = [bundle.feature_labels[n]["label"] for n in kept]
    assert all(label != n for label, n in zip(labels, kept, strict=True))


def test_the_chunked_refresh_computes_training_values_at_the_cutoff(trained):
    settings, data, bundle = trained
    fs = FeatureSet.from_json(bundle.feature_set_json)
    kept = btyd.feature_names(fs.meta)
    t = data.plan.test_cutoff
    at_t = data.matrix[pd.to_datetime(data.matrix["cutoff_time"], utc=True) == t]
    training = at_t.set_index("customer_id")[kept].sort_index()

    def snap(size: int, workers: int) -> pd.DataFrame:
        update = {"refresh_chunk_customers": size, "refresh_workers": workers}
        out = snapshot_profiles(settings.model_copy(update=update), t, False, fs)
        assert list(out.features.columns) == ["customer_id", "as_of", *fs.names]
        assert out.btyd is not None and out.btyd.customers == len(training)
        return out

    chunked = snap(200, 2)
    assert "2 process(es)" in chunked.note and not chunked.note.startswith("1 chunks")
    scored = chunked.features.set_index("customer_id")[kept].sort_index()
    assert list(scored.index) == list(training.index)  # the same population at t
    pd.testing.assert_frame_equal(scored, training, check_exact=True)
    assert scored.notna().all().all() and scored.nunique().min() > 10
    # One chunk fits the same models: no value depends on the chunking.
    whole = snap(10**6, 1)
    assert whole.btyd.bgnbd == chunked.btyd.bgnbd
    assert whole.btyd.pareto_nbd == chunked.btyd.pareto_nbd
    # The fit has its own line in the refresh summary.
    step = btyd_step(chunked.btyd)
    assert step.step == "BTYD fit" and step.rows == len(training) and step.seconds > 0
    assert "BG/NBD r " in step.note and "Pareto/NBD r " in step.note
